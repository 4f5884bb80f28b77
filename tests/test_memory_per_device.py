"""``scripts/memory_per_device.py`` on a small model over 8 simulated devices, and the scale-out launchers."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("launch_tpu_pod.sh", "launch_multigpu.sh", "prepare_coco_sharded.sh")
# configs/coco.py shrunk: every mesh axis divides the hidden, FFN and vocabulary widths
SMALL = {"vocab_size": 64, "max_len": 8, "max_position_embeddings": 32, "visual_feat_dim": 16, "num_clusters": 16,
         "hidden_size": 32, "num_heads": 4, "mlp_dim": 64}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  """The script's rows for pure data, fsdp and fsdp x tensor layouts of 8 devices (its own worker process)."""
  tmp = tmp_path_factory.mktemp("memory")
  overrides = [f"--config.model.{k}={v}" for k, v in SMALL.items()]
  result = subprocess.run(
      [sys.executable, "scripts/memory_per_device.py", "--devices=8", "--layouts=8x1x1,1x8x1,1x4x2", "--tasks=i2t",
       "--layers=1", "--batch_size=16", f"--json={tmp / 'rows.json'}", f"--out={tmp / 'table.md'}", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  table = (tmp / "table.md").read_text()
  assert "| 8 | fsdp | 1x8x1 | i2t |" in table, table
  return {row["mesh"]: row for row in json.loads((tmp / "rows.json").read_text())}


@pytest.mark.slow  # the rows fixture runs the script (~35 s)
def test_pure_data_parallelism_holds_the_whole_state(rows):
  data = rows["8x1x1"]
  assert data["params_bytes"] == data["params_bytes_total"] == data["params_bytes_replicated"]
  assert data["opt_bytes"] == data["opt_bytes_total"]
  assert data["argument_bytes"] >= data["params_bytes"] + data["opt_bytes"]


@pytest.mark.slow  # the rows fixture runs the script (~35 s)
def test_fsdp_holds_an_eighth_of_each_sharded_leaf(rows):
  data, fsdp = rows["8x1x1"], rows["1x8x1"]
  assert fsdp["params_bytes_total"] == data["params_bytes_total"]
  sharded = fsdp["params_bytes_total"] - fsdp["params_bytes_replicated"]
  assert sharded > 0.9 * fsdp["params_bytes_total"]  # only biases and LayerNorm scales stay whole
  assert (fsdp["params_bytes"] - fsdp["params_bytes_replicated"]) * 8 == sharded
  assert fsdp["params_bytes"] < data["params_bytes"] / 4
  assert fsdp["opt_bytes"] < data["opt_bytes"] / 4
  # XLA's view of the compiled step agrees: its state arguments shrink with the shards
  assert fsdp["argument_bytes"] < data["argument_bytes"] / 3


@pytest.mark.slow  # the rows fixture runs the script (~35 s)
def test_fsdp_times_tensor_shards_the_state(rows):
  data, both = rows["8x1x1"], rows["1x4x2"]
  assert both["params_bytes"] < data["params_bytes"] / 4
  assert both["argument_bytes"] < data["argument_bytes"] / 3


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
  """The script's rows for configs/model.py's tiny model (float32, layers scanned) over 4 devices: pure data and
  fsdp."""
  tmp = tmp_path_factory.mktemp("collectives")
  result = subprocess.run(
      [sys.executable, "scripts/memory_per_device.py", "--devices=4", "--layouts=4x1x1,1x4x1", "--tasks=i2t",
       "--model=tiny", "--config.model.scan_layers=True", "--batch_size=8", f"--json={tmp / 'rows.json'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return {row["mesh"]: row for row in json.loads((tmp / "rows.json").read_text())}


@pytest.mark.slow  # the tiny_rows fixture runs the script (~60 s)
def test_pure_data_parallelism_all_reduces_every_gradient_once(tiny_rows):
  data = tiny_rows["4x1x1"]
  assert data["all_gather_bytes"] == data["reduce_scatter_bytes"] == 0
  # float32 gradients, 2 (n - 1) / n of them sent; the scanned layers' all-reduces run once per layer. Parameters
  # used twice (the tied word embedding, the shared cross-attention) are all-reduced once per use.
  want = 2 * 3 / 4 * 4 * data["num_params"]
  assert 0.95 * want <= data["all_reduce_bytes"] <= 1.15 * want
  assert data["collective_bytes"] == data["cpu_collective_bytes"]  # float32: XLA:CPU widens nothing


@pytest.mark.slow  # the tiny_rows fixture runs the script (~60 s)
def test_fsdp_gathers_params_and_reduce_scatters_gradients(tiny_rows):
  fsdp, grads = tiny_rows["1x4x1"], 4 * tiny_rows["1x4x1"]["num_params"]
  assert fsdp["all_gather_bytes"] >= 0.5 * 3 / 4 * grads  # (n - 1) shards of (nearly) every parameter
  assert fsdp["reduce_scatter_bytes"] >= 0.5 * 3 / 4 * grads
  assert fsdp["all_reduce_bytes"] < 0.1 * fsdp["reduce_scatter_bytes"]  # unsharded biases and scalars
  # XLA:CPU's program keeps each reduce-scatter an all-reduce of the whole gradient
  assert fsdp["cpu_collective_bytes"] > fsdp["collective_bytes"]


def _dry_run(script: str, *args: str, **env: str) -> str:
  env = {**os.environ, "DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "zone", "WORKDIR": "gs://bucket/run",
         "NUM_HOSTS": "2", "HOST_INDEX": "1", "COORDINATOR": "host0:29500", "GPUS_PER_NODE": "8",
         "IMAGES_DIR": "coco", "ANNOTATIONS": "captions.json", "KARPATHY": "karpathy.json", "VOCAB": "vocab.txt",
         "OUT": "records", "WORKER": "0", "NUM_WORKERS": "2", **env}
  result = subprocess.run(["bash", os.path.join("scripts", script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


@pytest.mark.parametrize("script", LAUNCHERS + ("launch_common.sh",))
def test_launcher_syntax(script):
  result = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", script)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script,mode", [("launch_tpu_pod.sh", "train"), ("launch_multigpu.sh", "local"),
                                         ("launch_multigpu.sh", "host"), ("launch_multigpu.sh", "slurm")])
def test_launchers_pass_only_fields_of_the_config(script, mode):
  out = _dry_run(script, mode, "--config.batch_size=512")
  assert "bigen_jax.main --config configs/coco.py --workdir gs://bucket/run" in out.replace("\n", " ")
  fields = re.findall(r"--config\.([\w.]+)=", out)
  assert "batch_size" in fields
  config = coco.get_config()
  for field in fields:
    node = config
    for part in field.split("."):
      assert part in node, f"{script} {mode}: --config.{field} is not a field of configs/coco.py"
      node = node[part]


def test_prepare_coco_splits_every_split_among_the_workers():
  given = [re.findall(r"--split\n(\S+)\n.*?--shards\n(\S+)\n", _dry_run("prepare_coco_sharded.sh", "extract",
                                                                      WORKER=str(i), NUM_WORKERS="3"), re.S)
           for i in range(3)]
  assert given == [[("train", "0:38"), ("validation", "0:1"), ("test", "0:1")],
                   [("train", "38:76"), ("validation", "1:3"), ("test", "1:3")],
                   [("train", "76:"), ("validation", "3:"), ("test", "3:")]]
  many = _dry_run("prepare_coco_sharded.sh", "extract", WORKER="6", NUM_WORKERS="8", SPLIT_IMAGES="train=40 test=7",
                  SPLITS="train test", SHARD_SIZE="2")
  assert re.findall(r"--split\n(\S+)\n.*?--shards\n(\S+)\n", many, re.S) == [("train", "15:17")]  # test: 4 shards
  alone = _dry_run("prepare_coco_sharded.sh", "extract", WORKER="0", NUM_WORKERS="1")
  assert "--split\ntrain,validation,test\n" in alone and "--shards" not in alone
