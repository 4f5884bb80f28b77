#!/usr/bin/env bash
# The one-GPU benchmark suite (issue 18): one command, under 8 minutes on one H100/H200-class GPU.
#
#   scripts/benchmarks/accelerator_suite.sh [OUT]           # OUT (or $OUT; default accel_out)
#   PEAK_TFLOPS=989 BUDGET=450 scripts/benchmarks/accelerator_suite.sh accel_out
#   QUICK=1 scripts/benchmarks/accelerator_suite.sh /tmp/accel   # tiny configs: a smoke run, on CPU too
#
# Runs run_all.py --accelerator (the gpu_* entries of its BENCHMARKS; each benchmark its own process with --json):
#   gpu_train_paper        bench_train.py --config paper --dtype bfloat16 --batch 64 --notorch --peak_tflops P:
#                          the I2T training step, steps/s, MFU and peak memory per device
#   gpu_train_paper_fsdp   the same with --fsdp (parameters and optimizer state sharded over the devices)
#   gpu_mask_predict_paper bench_mask_predict.py --config paper --num_clusters 10000 --batch 256 --dtype bfloat16:
#                          mask-predict-4 token grids/s, vs Hugging Face LXMERT in PyTorch on the same GPU
#   gpu_captions_paper     bench_captions.py --config paper --batch 256 --dtype bfloat16: greedy captions/s, vs PyTorch
#   gpu_cider              bench_cider.py --images 5000 --refs 5: CIDEr-D vs pycocoevalcap, and the in-graph
#                          (jitted) cider_d_ids per batch of 250 on the GPU
#   gpu_train_paper_fused  gpu_train_paper with --fused_projections (q, k, v as one matmul; last: the budget cuts it
#                          first)
# and writes OUT/benchmarks.json and OUT/benchmarks.md (run_all's table; the training step's MFU, peak memory and
# compiled footprint as rows of their own, read from its JSON or, where it writes them only to stdout, its log),
# each benchmark's OUT/<name>.json and OUT/<name>.log. Exit status 1 when a benchmark failed (its row says why).
#
# Targets on one H100/H200-class GPU: >= 40 % MFU for the paper config's training step in bf16 (PEAK_TFLOPS: the
# GPU's dense bf16 peak, default 989 for an H100 SXM), >= 2,000 mask-predict-4 token grids/s, >= 800 greedy
# captions/s.
#
# Environment: OUT, PEAK_TFLOPS, QUICK=1, BUDGET (seconds for all benchmarks, default 450: the suite ends within 8
# minutes; run_all's --budget cuts the running benchmark and skips the rest), TIMEOUT (seconds per benchmark,
# default 240), PYTHON (default .venv/bin/python where it exists, else python3), JAX_COMPILATION_CACHE_DIR
# (default OUT/xla_cache: a compilation the training step's memory analysis repeats, or a rerun's, is read back).
set -euo pipefail

OUT="${1:-${OUT:-accel_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # relative to the caller's directory
cd "$(dirname "$0")/../.."
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
BUDGET="${BUDGET:-450}"
TIMEOUT="${TIMEOUT:-240}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}"

args=(--accelerator --out "$OUT" --budget "$BUDGET" --timeout "$TIMEOUT"
      --extra "gpu_train_paper=--peak_tflops $PEAK_TFLOPS" --extra "gpu_train_paper_fsdp=--peak_tflops $PEAK_TFLOPS"
      --extra "gpu_train_paper_fused=--peak_tflops $PEAK_TFLOPS")
if [[ "${QUICK:-0}" == 1 ]]; then
  args+=(--quick)
fi
status=0
"$PYTHON" scripts/benchmarks/run_all.py "${args[@]}" > /dev/null || status=$?

# The training step's MFU and memory: rows like run_all's sub-results, from bench_train's JSON where it holds them
# (fields mfu, peak_memory, compiled_memory), else from the line it prints.
"$PYTHON" - "$OUT" <<'EOF'
import json
import os
import re
import sys

sys.path.insert(0, os.path.join("scripts", "benchmarks"))
import run_all  # pylint: disable=g-import-not-at-top
from bigen_jax import fileio  # pylint: disable=g-import-not-at-top

PRINTED = (("mfu", r"MFU ([\d.]+)%", "% MFU"), ("peak_memory", r"peak memory ([\d.]+) GiB/device", "GiB/device"),
           ("compiled_memory", r"compiled per device: ([\d.]+) MiB", "MiB/device"))
out = sys.argv[1]
with open(os.path.join(out, "benchmarks.json")) as f:
  summary = json.load(f)
rows = []
for row in summary["rows"]:
  rows.append(row)
  name = row["benchmark"]
  if row["error"] or not name.startswith("gpu_train") or " (" in name:
    continue
  with open(os.path.join(out, f"{name}.json")) as f:
    wrote = json.load(f)
  with open(os.path.join(out, f"{name}.log")) as f:
    log = f.read()
  for key, pattern, unit in PRINTED:
    match = re.search(pattern, log)
    if key not in wrote and match:
      rows.append({"benchmark": f"{name} ({key})", "command": None, "ours": float(match.group(1)), "peer": None,
                   "ratio": None, "unit": unit, "wall_s": None, "error": None})
summary["rows"] = rows
table = run_all.markdown(summary["header"], rows)
fileio.write_atomic(os.path.join(out, "benchmarks.md"), table)
fileio.write_json_atomic(os.path.join(out, "benchmarks.json"), summary)
print(table, end="")
EOF
exit "$status"
