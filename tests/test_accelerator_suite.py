"""``scripts/benchmarks/accelerator_suite.sh`` with QUICK=1 (tiny configs) on CPU: one JSON and one markdown table
holding every benchmark of the one-GPU suite, the training step's MFU and compiled footprint among them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "scripts", "benchmarks", "accelerator_suite.sh")
ROWS = ("gpu_train_paper", "gpu_train_paper (mfu)", "gpu_train_paper (compiled_memory)", "gpu_train_paper_fsdp",
        "gpu_train_paper_fsdp (mfu)", "gpu_train_paper_fsdp (compiled_memory)", "gpu_mask_predict_paper",
        "gpu_mask_predict_paper (grids)", "gpu_captions_paper", "gpu_cider", "gpu_cider (cpu)", "gpu_cider (in_graph)",
        "gpu_train_paper_fused", "gpu_train_paper_fused (mfu)")


@pytest.mark.slow  # ~3-5 min on 1 CPU core: five processes importing JAX and PyTorch, tiny compiles
def test_quick_suite_writes_every_row(tmp_path):
  out = tmp_path / "accel"
  env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable, "BUDGET": "1500", "TIMEOUT": "600",
         "PEAK_TFLOPS": "2"}
  done = subprocess.run(["bash", SUITE, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  assert done.returncode == 0, done.stdout + done.stderr
  with open(out / "benchmarks.json") as f:
    summary = json.load(f)
  with open(out / "benchmarks.md") as f:
    markdown = f.read()
  assert markdown == done.stdout and summary["quick"]
  rows = {r["benchmark"]: r for r in summary["rows"]}
  assert set(ROWS) <= set(rows), sorted(rows)
  for name in ROWS:
    row = rows[name]
    assert row["error"] is None and row["ours"] >= 0 and (row["ours"] > 0 or name.endswith("(mfu)")), row
    assert f"| {name} |" in markdown, name
  assert rows["gpu_train_paper (mfu)"]["unit"] == "% MFU"
  assert "--peak_tflops 2" in rows["gpu_train_paper"]["command"] and "--fsdp" in rows["gpu_train_paper_fsdp"]["command"]
  assert "--fused_projections" in rows["gpu_train_paper_fused"]["command"]
  for name in ("gpu_train_paper", "gpu_train_paper_fsdp", "gpu_mask_predict_paper", "gpu_captions_paper", "gpu_cider"):
    assert (out / f"{name}.json").exists() and (out / f"{name}.log").exists(), name
