r"""Runs every benchmark (the README's Benchmarks table) and prints their ratios in one markdown table.

  python scripts/benchmarks/run_all.py --cores 0 --out bench_out        # the README's command lines
  python scripts/benchmarks/run_all.py --quick --only cider,mask_predict_tiny
  python scripts/benchmarks/run_all.py --only clip --extra "clip=--steps 10"
  python scripts/benchmarks/run_all.py --accelerator --out accel_out  # one GPU: accelerator_suite.sh

Each benchmark runs as its own process (``BENCHMARKS``: the script and its README arguments; ``--quick``: tiny
settings instead, a smoke run) with ``--json``, and its row is what that file holds (``timing.write_result``):
ours, the peer's (PyTorch, pycocoevalcap), the ratio (> 1: ours is better) and the process's wall time; a
result's sub-results (clip's texts, the CPU times of cider and scst) are rows of their own. ``--cores`` runs
every one under ``taskset -c CORES``, so all are pinned alike (each script then takes its ``--threads`` first
cores of those). ``--accelerator`` runs the one-GPU suite's entries instead (``accelerator=True``: paper
configs in bfloat16 at large batches; ``scripts/benchmarks/accelerator_suite.sh``). A benchmark that fails is a
row with its error (the last error line of its stderr) and the exit status is 1. ``--out DIR``:
DIR/benchmarks.{md,json}, and each benchmark's DIR/<name>.json and DIR/<name>.log (stdout and stderr).
"""

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from bigen_jax import fileio  # pylint: disable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class Benchmark:
  script: str  # in scripts/benchmarks/
  args: str  # the README's command line
  quick: str  # tiny settings, for a smoke run
  accelerator: bool = False  # one GPU's suite (``--accelerator``), not the README's CPU table

  def with_flags(self, extra: str) -> "Benchmark":
    """The same benchmark with ``extra`` appended to both its command lines (a variant of one setting)."""
    return dataclasses.replace(self, args=f"{self.args} {extra}", quick=f"{self.quick} {extra}")


_TRAIN_PAPER = Benchmark("bench_train.py", "--config paper --batch 8 --steps 5 --warmup 2 --threads 1",
                         "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1")
# One GPU, all its host's cores (accelerator_suite.sh adds --peak_tflops to the training steps). Quick training
# batches of 8: divisible by the test session's 8 simulated CPU devices.
_GPU_TRAIN_PAPER = Benchmark("bench_train.py", "--config paper --dtype bfloat16 --batch 64 --steps 10 --notorch",
                             "--config tiny --dtype bfloat16 --batch 8 --steps 1 --warmup 1 --notorch",
                             accelerator=True)

BENCHMARKS = {
    "model": Benchmark("bench_model.py", "--config small --batch 8 --steps 15 --threads 1",
                       "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1"),
    "train": Benchmark("bench_train.py", "--config small --batch 8 --steps 15 --threads 1",
                       "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1"),
    "cider": Benchmark("bench_cider.py", "--images 5000 --refs 5", "--images 20 --refs 2 --steps 1 --batch 0"),
    "scst": Benchmark("bench_scst.py", "--steps 5",
                      "--config_arg tiny --batch 2 --images 10 --num_clusters 16 --steps 1 --warmup 1"),
    "mask_predict_small": Benchmark("bench_mask_predict.py", "--config small --batch 16 --num_steps 4 --threads 1",
                                    "--config tiny --batch 2 --num_steps 1 --num_clusters 16 --steps 1 --warmup 1 "
                                    "--threads 1"),
    "mask_predict_tiny": Benchmark("bench_mask_predict.py", "--config tiny --batch 4 --threads 1",
                                   "--config tiny --batch 4 --steps 1 --warmup 1 --threads 1"),
    "generator_demo": Benchmark("bench_generator.py", "--config demo --batch 8 --steps 10 --threads 1",
                                "--config tiny --batch 1 --steps 1 --warmup 1 --threads 1"),
    "generator_paper": Benchmark("bench_generator.py", "--config paper --batch 2 --steps 5 --threads 1",
                                 "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1"),
    "clip": Benchmark("bench_clip.py", "--config vit_b32 --batch 8 --steps 5 --threads 2",
                      "--config tiny --batch 2 --steps 1 --warmup 1 --threads 2"),
    "model_paper": Benchmark("bench_model.py", "--config paper --batch 8 --steps 5 --warmup 2 --threads 1",
                             "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1"),
    "train_paper": _TRAIN_PAPER,
    "train_paper_fused": _TRAIN_PAPER.with_flags("--fused_projections"),
    "optimizer_paper": Benchmark("bench_optimizer.py", "--config paper --threads 1",
                                 "--config tiny --steps 1 --warmup 1 --threads 1"),
    "mask_predict_paper": Benchmark("bench_mask_predict.py", "--config paper --num_clusters 10000 --batch 8 "
                                    "--num_steps 4 --steps 3 --warmup 1 --threads 1",
                                    "--config tiny --batch 2 --num_steps 1 --num_clusters 16 --steps 1 --warmup 1 "
                                    "--threads 1"),
    # needs make demo's output (records, vocabulary) in demo_out
    "pipeline": Benchmark("bench_pipeline.py", "--demo_out demo_out --rounds 3",
                          "--demo_out demo_out --steps 10 --warmup_steps 5 --log_every 5 --rounds 1"),
    "captions_small": Benchmark("bench_captions.py", "--config small --batch 16 --threads 1",
                                "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1"),
    "captions_paper": Benchmark("bench_captions.py", "--config paper --batch 2 --steps 3 --warmup 1 --threads 1",
                                "--config tiny --batch 2 --steps 1 --warmup 1 --threads 1"),
    "gpu_train_paper": _GPU_TRAIN_PAPER,
    "gpu_train_paper_fsdp": _GPU_TRAIN_PAPER.with_flags("--fsdp"),
    "gpu_mask_predict_paper": Benchmark("bench_mask_predict.py",
                                        "--config paper --num_clusters 10000 --batch 256 --num_steps 4 "
                                        "--dtype bfloat16",
                                        "--config tiny --num_clusters 16 --batch 2 --num_steps 4 --dtype bfloat16 "
                                        "--steps 1 --warmup 1", accelerator=True),
    "gpu_captions_paper": Benchmark("bench_captions.py", "--config paper --batch 256 --dtype bfloat16",
                                    "--config tiny --batch 2 --dtype bfloat16 --steps 1 --warmup 1",
                                    accelerator=True),
    "gpu_cider": Benchmark("bench_cider.py", "--images 5000 --refs 5 --batch 250",
                           "--images 20 --refs 2 --steps 1 --batch 10", accelerator=True),
    # Last: the budget cuts it first. The same step as gpu_train_paper with q, k, v as one matmul.
    "gpu_train_paper_fused": _GPU_TRAIN_PAPER.with_flags("--fused_projections"),
}

_ONLY = flags.DEFINE_list("only", None, f"Benchmarks to run (default: all of the README's, or of the accelerator "
                          f"suite's with --accelerator): {', '.join(BENCHMARKS)}.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings (a smoke run), not the README's.")
_ACCELERATOR = flags.DEFINE_bool("accelerator", False, "Run the one-GPU suite's benchmarks, not the README's.")
_CORES = flags.DEFINE_string("cores", None, "Run every benchmark under taskset -c CORES (e.g. 0 or 0,1).")
_EXTRA = flags.DEFINE_multi_string("extra", [], "NAME=ARGS: more arguments for benchmark NAME (later flags win).")
_OUT = flags.DEFINE_string("out", None, "Write benchmarks.{md,json} and each benchmark's JSON and log here.")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Seconds one benchmark may run (default: no limit).")
_BUDGET = flags.DEFINE_float("budget", None, "Seconds all benchmarks together may run: each is cut at what is left "
                             "and those after it are skipped (error rows); default: no limit.")

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_ERROR_LINE = re.compile(r"error|exception|fatal|killed", re.IGNORECASE)


def _error(stderr: str, returncode: int) -> str:
  """The last line of ``stderr`` that names an error (else its last line), with the exit status."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if _ERROR_LINE.search(line)]
  status = f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"
  line = (errors or lines or [""])[-1]
  return f"{status}: {line[:300]}" if line else status


def _rows(name: str, command: str, result: dict, wall_s: float) -> list[dict]:
  """The row of ``result`` and one per sub-result (a field holding a ratio)."""
  fields = ("ours", "peer", "ratio", "unit")
  rows = [{"benchmark": name, "command": command, **{k: result[k] for k in fields}, "wall_s": wall_s, "error": None}]
  for key, sub in result.items():
    if isinstance(sub, dict) and "ratio" in sub:
      rows.append({"benchmark": f"{name} ({key})", "command": None, **{k: sub[k] for k in fields}, "wall_s": None,
                   "error": None})
  return rows


def _command(name: str, args: list[str], prefix: list[str]) -> tuple[str, str]:
  """(the script's path from the repository root, the command line a row shows)."""
  script = os.path.join("scripts", "benchmarks", BENCHMARKS[name].script)
  return script, shlex.join([*prefix, "python", script, *args])


def _failed(name: str, command: str, wall_s: float | None, error: str) -> list[dict]:
  return [{"benchmark": name, "command": command, "ours": None, "peer": None, "ratio": None, "unit": None,
           "wall_s": wall_s, "error": error}]


def run_one(name: str, args: list[str], prefix: list[str], work_dir: str, timeout: float | None) -> list[dict]:
  """Runs benchmark ``name`` with ``args`` (after ``prefix``, e.g. taskset) and returns its rows; a failure is
  one row with its error. Writes work_dir/<name>.json (the script's) and work_dir/<name>.log."""
  script, command = _command(name, args, prefix)
  json_path = os.path.join(work_dir, f"{name}.json")
  if os.path.exists(json_path):
    os.remove(json_path)
  start = time.perf_counter()
  try:
    done = subprocess.run([*prefix, sys.executable, script, *args, "--json", json_path], cwd=_ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
  except subprocess.TimeoutExpired as e:
    stdout, stderr, returncode = e.stdout or "", e.stderr or "", None
    stdout, stderr = (s.decode(errors="replace") if isinstance(s, bytes) else s for s in (stdout, stderr))
  wall_s = time.perf_counter() - start
  fileio.write_atomic(os.path.join(work_dir, f"{name}.log"), f"$ {command}\n{stdout}\n--- stderr\n{stderr}")
  if returncode is None:
    error = f"timed out after {timeout:g} s"
  elif returncode != 0:
    error = _error(stderr, returncode)
  elif not os.path.exists(json_path):
    error = "exit 0 but no --json result written"
  else:
    with open(json_path) as f:
      return _rows(name, command, json.load(f), wall_s)
  return _failed(name, command, wall_s, error)


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def markdown(header: str, rows: list[dict]) -> str:
  """``header`` and the rows as a markdown table."""
  lines = [header, "", "| benchmark | command | ours | peer | ratio | wall |", "|---|---|---|---|---|---|"]
  for r in rows:
    command = f"`{r['command']}`" if r["command"] else ""
    wall = f"{r['wall_s']:.1f} s" if r["wall_s"] is not None else ""
    if r["error"]:
      cells = [f"**failed**: {r['error']}", "", ""]
    else:
      cells = [f"{r['ours']:.4g} {r['unit']}", "" if r["peer"] is None else f"{r['peer']:.4g} {r['unit']}",
               "" if r["ratio"] is None else f"{r['ratio']:.2f}x"]
    lines.append("| " + " | ".join(_cell(c) for c in [r["benchmark"], command, *cells, wall]) + " |")
  return "\n".join(lines) + "\n"


def _arguments(names: list[str], quick: bool, extra: list[str]) -> dict[str, list[str]]:
  """name -> its argument list: the registry's (``quick`` or the README's), then ``extra``'s for it."""
  out = {name: shlex.split(BENCHMARKS[name].quick if quick else BENCHMARKS[name].args) for name in names}
  for item in extra:
    name, sep, args = item.partition("=")
    if not sep or name not in BENCHMARKS:
      raise app.UsageError(f"--extra {item!r}: want NAME=ARGS with NAME one of {', '.join(BENCHMARKS)}")
    if name in out:
      out[name] += shlex.split(args)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  names = _ONLY.value or [name for name, b in BENCHMARKS.items() if b.accelerator == _ACCELERATOR.value]
  unknown = [name for name in names if name not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
  arguments = _arguments(names, _QUICK.value, _EXTRA.value)
  prefix = []
  if _CORES.value:
    if not shutil.which("taskset"):
      raise app.UsageError("--cores needs taskset (util-linux)")
    prefix = ["taskset", "-c", _CORES.value]
  pinning = f"pinned with `{shlex.join(prefix)}`" if prefix else "not pinned (each script's --threads only)"
  settings = "the accelerator suite's" if _ACCELERATOR.value else "the README"
  header = (f"Benchmarks, {'quick settings' if _QUICK.value else f'{settings} settings'}, {pinning}; "
            f"{len(os.sched_getaffinity(0))} cores visible; {time.strftime('%Y-%m-%d %H:%M:%S')}")
  with tempfile.TemporaryDirectory() as tmp:
    work_dir = _OUT.value or tmp
    os.makedirs(work_dir, exist_ok=True)
    rows = []
    deadline = None if _BUDGET.value is None else time.perf_counter() + _BUDGET.value
    for i, name in enumerate(names):
      timeout = _TIMEOUT.value
      left = None if deadline is None else deadline - time.perf_counter()
      if left is not None and left <= 0:
        new = _failed(name, _command(name, arguments[name], prefix)[1], None,
                      f"skipped: the --budget of {_BUDGET.value:g} s was spent")
      else:
        if left is not None:
          timeout = left if timeout is None else min(timeout, left)
        new = run_one(name, arguments[name], prefix, work_dir, timeout)
      rows += new
      status = f"failed: {new[0]['error']}" if new[0]["error"] else "ok"
      wall = "" if new[0]["wall_s"] is None else f" ({new[0]['wall_s']:.1f} s)"
      print(f"[{i + 1}/{len(names)}] {name}: {status}{wall}", file=sys.stderr, flush=True)
  table = markdown(header, rows)
  print(table, end="")
  if _OUT.value:
    fileio.write_atomic(os.path.join(_OUT.value, "benchmarks.md"), table)
    fileio.write_json_atomic(os.path.join(_OUT.value, "benchmarks.json"),
                             {"header": header, "quick": _QUICK.value, "cores": _CORES.value, "rows": rows})
  return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
  app.run(main)
