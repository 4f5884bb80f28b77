r"""Where the training step's time goes on this backend: ``bench_train.py``'s step (the trainer's own I2T update)
traced with ``jax.profiler``, each XLA op's time joined with the optimised HLO (shape, kind), summed by kind.

  python scripts/benchmarks/profile_step.py --config paper --batch 8 --steps 3 --threads 1
  python scripts/benchmarks/profile_step.py --config small --batch 8 --steps 10 --top 30 --out prof_out

Kinds: ``matmul`` (XLA CPU's YNNPACK fusions and Eigen dots; GPU/TPU: dot/convolution fusions and custom
calls), ``random bits`` (fusions producing uint32: dropout's threefry), ``loop`` (``while``: threefry's rolled
rounds on CPU), ``copy/transpose``, ``broadcast`` (``wrapped_broadcast``: filling zeros and scalars),
``collective`` (all-reduce, all-gather, reduce-scatter, ...), ``elementwise/reduce`` (every other fusion: LayerNorm, GELU, softmax, dropout's select, AdamW, clipping) and
``other``. Tracing adds a cost per op, so the traced step is slower than ``bench_train``'s; the shares are what to
read. Per step: the mean over the traced executions of the step but its first.
"""

import collections
import glob
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from bigen_jax import collectives  # pylint: disable=g-import-not-at-top
import bench_train  # pylint: disable=g-import-not-at-top  (its flags: --config --batch --steps --warmup ...)
import timing  # pylint: disable=g-import-not-at-top

_TOP = flags.DEFINE_integer("top", 25, "Ops to list by time.")
_OUT = flags.DEFINE_string("out", None, "Keep the trace and the HLO dump here (default: a temporary folder).")


def op_kind(name: str, shape: str, opcode: str) -> str:
  """The kind of one executed XLA op from its name, result shape and opcode (see the module docstring)."""
  base = re.sub(r"[.\d]+$", "", name)
  if base.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or opcode in ("dot", "convolution") or \
     base in ("dot", "dot_general", "convolution", "cublas-gemm", "gemm_fusion", "triton_gemm"):
    return "matmul"
  if base.startswith(collectives.KINDS):
    return "collective"
  if "copy" in base or "transpose" in base:
    return "copy/transpose"
  if shape.startswith("u32["):
    return "random bits"
  if opcode == "while" or base == "while":
    return "loop"
  if "broadcast" in base and base.startswith("wrapped"):
    return "broadcast"
  if "fusion" in base or opcode == "fusion":
    return "elementwise/reduce"
  return "other"


def op_times(trace_dir: str) -> tuple[dict[str, float], int]:
  """(XLA op name -> milliseconds per execution, executions) of the traced program run most often (the step),
  from the host's XLA executor threads (CPU) and the device planes (GPU/TPU). Its first execution is left out:
  it pays one-off costs (first touch of new buffers)."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  events = []  # (program_id, run_id, start, name, ps)
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
    for line in plane.lines:
      if not (plane.name.startswith("/device:") or line.name.startswith("tf_XLA")):  # executors only
        continue
      for event in line.events:
        name = names[event.metadata_id]
        if name.startswith(("ThunkExecutor", "H2D", "D2H")) or re.search(r"[\s(:]", name):
          continue
        stats = {stat_names[s.metadata_id]: s.int64_value or s.uint64_value for s in event.stats}
        events.append((stats.get("program_id"), stats.get("run_id"), line.timestamp_ns * 1000 + event.offset_ps,
                       name, event.duration_ps))
  runs = collections.defaultdict(dict)  # program -> run -> first start
  for program, run, start, _, _ in events:
    runs[program][run] = min(start, runs[program].get(run, start))
  program = max(runs, key=lambda p: len(runs[p]))
  first = min(runs[program], key=runs[program].get)
  kept = len(runs[program]) - 1
  totals = collections.Counter()
  for p, run, _, name, ps in events:
    if p == program and run != first:
      totals[name] += ps / 1e9 / max(kept, 1)
  return dict(totals), kept


def hlo_ops(dump_dir: str) -> dict[str, tuple[str, str]]:
  """op name -> (result shape, opcode) from the optimised HLO of the jitted step."""
  ops = {}
  for path in glob.glob(os.path.join(dump_dir, "*jit_step*after_optimizations.txt")):
    with open(path, encoding="utf-8") as f:
      for inst in collectives.instructions(f.read()):
        ops.setdefault(inst.name, (inst.shape, inst.opcode))
  return ops


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = flags.FLAGS.out or tempfile.mkdtemp(prefix="profile_step_")
  dump = os.path.join(out, "hlo")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text "
                             "--xla_dump_hlo_module_re=.*jit_step.*").strip()
  timing.limit_threads(flags.FLAGS.threads)
  import jax  # pylint: disable=g-import-not-at-top
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  model_config = model_configs.get_config(flags.FLAGS.config)
  model_config.dtype = flags.FLAGS.dtype
  if flags.FLAGS.scan_layers is not None:
    model_config.scan_layers = flags.FLAGS.scan_layers
  config = bench_train._train_config(model_config)  # pylint: disable=protected-access
  batch = bench_train._batch(model_config, flags.FLAGS.batch)  # pylint: disable=protected-access
  rate, _, _ = bench_train.bench_flax(config, batch)  # compiles; untraced rate for reference
  trace = os.path.join(out, "trace")
  with jax.profiler.trace(trace):
    bench_train.bench_flax(config, batch)
  times, runs = op_times(trace)  # ms per step
  ops = hlo_ops(dump)
  kinds = collections.Counter()
  for name, ms in times.items():
    shape, opcode = ops.get(name, ("", ""))
    kinds[op_kind(name, shape, opcode)] += ms
  total = sum(times.values())
  print(f"config={flags.FLAGS.config} batch={flags.FLAGS.batch} dtype={flags.FLAGS.dtype} "
        f"device={jax.devices()[0].device_kind}: untraced {1e3 / rate:.0f} ms/step, traced ops {total:.0f} ms/step "
        f"(mean of {runs} traced steps)")
  print("\n| kind | ms/step | share |\n|---|---|---|")
  for kind, ms in kinds.most_common():
    print(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |")
  print(f"\n| op | kind | result | ms/step |\n|---|---|---|---|")
  for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    shape, opcode = ops.get(name, ("", ""))
    print(f"| {name} | {op_kind(name, shape, opcode)} | {shape[:48]} | {ms:.2f} |")
  if flags.FLAGS.out:
    print(f"\ntrace and HLO: {out}")
  else:
    shutil.rmtree(out)


if __name__ == "__main__":
  app.run(main)
