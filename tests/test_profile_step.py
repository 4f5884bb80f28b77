"""``scripts/benchmarks/profile_step.py``: the training step's XLA ops, timed by the profiler, by kind."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmarks", "profile_step.py")

# Importing profile_step defines bench_train's absl flags, which other test modules' benchmark imports define too:
# its functions are checked in a subprocess.
KINDS = """
import profile_step as p
assert p.op_kind("ynn_fusion.12", "f32[512,768]{1,0}", "fusion") == "matmul"
assert p.op_kind("dot.3", "f32[768,3072]{1,0}", "dot") == "matmul"
assert p.op_kind("broadcast_add_fusion.7", "u32[8,17,768]{2,1,0}", "fusion") == "random bits"
assert p.op_kind("while.4", "(s32[], u32[2]{0})", "while") == "loop"
assert p.op_kind("copy.2985", "f32[2048,10000]{1,0}", "copy") == "copy/transpose"
assert p.op_kind("all-reduce.163", "(f32[32]{0}, f32[])", "all-reduce") == "collective"
assert p.op_kind("multiply_add_fusion.279", "f32[2048,10000]{1,0}", "fusion") == "elementwise/reduce"
print("kinds ok")
"""


def test_op_kinds():
  done = subprocess.run([sys.executable, "-c", KINDS], cwd=os.path.dirname(SCRIPT), capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0 and "kinds ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow  # ~50 s: two compiles of the step and a trace
def test_profiles_the_tiny_step(tmp_path):
  """The tiny config's step on one device: its ops found in the trace and the HLO, matmuls among them, the shares summing to
  100%, the listed ops the step's own (a kind and a result shape each)."""
  done = subprocess.run([sys.executable, SCRIPT, "--config", "tiny", "--batch", "8", "--steps", "3", "--warmup", "1",
                         "--notorch", "--top", "5", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False, env={**os.environ, "XLA_FLAGS": ""})
  assert done.returncode == 0, done.stderr[-3000:]
  kinds = dict(re.findall(r"^\| ([a-z/ ]+) \| [\d.]+ \| ([\d.]+)% \|$", done.stdout, re.M))
  assert "matmul" in kinds and float(kinds["matmul"]) > 0, done.stdout
  assert abs(sum(float(v) for v in kinds.values()) - 100.0) < 0.5
  assert "(mean of 3 traced steps)" in done.stdout
  ops = re.findall(r"^\| ([\w.\-]+) \| ([a-z/ ]+) \| (.+?) \| [\d.]+ \|$", done.stdout, re.M)
  assert len(ops) == 5 and all(shape for _, _, shape in ops), done.stdout
