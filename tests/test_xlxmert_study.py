"""``scripts/xlxmert_study.py`` end to end on the tiny captioned-scenes world (slow): a make-demo-like output
(world, tokenizer, a 4-step scenes detector, its features, k-means vocabulary, an untrained scene recogniser, a
2-step stage 1), then every row of the study at 2 steps; the tables hold every row."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bigen_jax import train
from bigen_jax.data import vocab
from bigen_jax.features import backbones
from bigen_jax.features import extract
from bigen_jax.worlds.scenes import detector
from bigen_jax.worlds.scenes import recognizer
from bigen_jax.worlds.scenes import tfds_builder
from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import demo as demo_script  # pylint: disable=g-import-not-at-top,wrong-import-position

SPLITS = ("train", "validation", "test")
DETECTOR = dict(steps=4, batch_size=4, num_train_scenes=8, width=8, feature_dim=16, eval_scenes=0,
                checkpoint_every=2, log_every=1)
STEPS = 2


def make_tiny_demo(out: str) -> None:
  """What the study reads of make demo's output, on the tiny world, in seconds."""
  data_dir = os.path.join(out, "tfds")
  b = tfds_builder.builder(data_dir, "tiny")
  tfds_builder.prepare(b)
  sizes = {s: b.info.splits[s].num_examples for s in SPLITS}
  tok, vocab_path = demo_script.train_tokenizer(data_dir, "tiny", os.path.join(out, "tokenizer"), 300)
  assert tok.tokenize("how many shapes?") == ["how", "many", "shapes", "?"]
  weights, _ = detector.load_or_train(os.path.join(out, "scenes_detector"), **DETECTOR)
  backbone = backbones.build_backbone("scenes_detector", weights=weights, layer="gated_logits")
  for split in SPLITS:
    extract.extract_split(tfds_builder.source(split, data_dir=data_dir, config="tiny"), split=split,
                          out_dir=os.path.join(out, "records"), backbone=backbone, tokenizer=tok,
                          num_examples=sizes[split], shard_size=500, batch_size=64, store_images=True,
                          source_info={"name": "scenes", "config": "tiny"}, vocab_path=vocab_path, progress=False)
  vocab.build_vocab(os.path.join(out, "records"), os.path.join(out, "vocab"), k=32, iterations=5,
                    sample_size=64 * sizes["train"], seed=0, exact_min_count=20)
  directory = os.path.join(out, "scene_recognizer")
  os.makedirs(directory, exist_ok=True)
  recognizer.save_recognizer(recognizer.recognizer_path(directory), recognizer.init_params(), {})
  config = demo.with_paths(demo.get_config("demo"), out, weights)
  config.update_from_flattened_dict({"total_steps": STEPS, "checkpoint.every": STEPS, "log_every": 1,
                                     "eval.every": 0})
  train.train_and_evaluate(config, os.path.join(out, "train"))


@pytest.mark.slow
def test_the_study_runs_every_row_on_the_tiny_world(tmp_path):
  out = str(tmp_path / "demo_out")
  make_tiny_demo(out)
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")  # one CPU device, fast compiles
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "xlxmert_study.py"), "--out", out, "--steps", str(STEPS)]
  demo_checkpoints = sorted(os.listdir(os.path.join(out, "train", "checkpoints")))
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "about" in run.stdout and "min left" in run.stdout  # the progress lines' estimate
  study = os.path.join(out, "xlxmert")
  with open(os.path.join(study, "xlxmert_validation.json")) as f:
    table = json.load(f)
  rows = {r["row"]: r for r in table["rows"]}
  assert list(rows) == ["pretrain_ccc", "pretrain_regression", "qa_from_ccc", "qa_from_scratch", "qa_from_stage1",
                        "stage1_from_ccc", "stage1_scratch"]
  assert table["data"]["cluster ids equal to the demo's (train/validation/test)"] == "1.0000/1.0000/1.0000"
  for name in ("pretrain_ccc", "pretrain_regression", "qa_from_ccc", "qa_from_scratch", "qa_from_stage1"):
    r = rows[name]
    assert r["step"] == STEPS and 0 <= r["qa/accuracy"] <= 1 and r["qa/num_questions"] > 0
    assert r["qa/majority/accuracy"] == rows["qa_from_ccc"]["qa/majority/accuracy"]
  for name in ("pretrain_ccc", "pretrain_regression", "stage1_from_ccc", "stage1_scratch"):
    assert np.isfinite(rows[name]["generation/guidance/semantic/accuracy"])
  for name in ("stage1_from_ccc", "stage1_scratch"):
    assert np.isfinite(rows[name]["captioning/CIDEr-D"]) and np.isfinite(rows[name]["validation_loss/t2i/gap"])
  assert rows["stage1_scratch"]["run"] == os.path.join(out, "train")
  assert not os.path.exists(os.path.join(out, "train", "eval"))  # make demo's run is left as it was
  assert sorted(os.listdir(os.path.join(out, "train", "checkpoints"))) == demo_checkpoints  # qa_from_stage1 read it
  with open(os.path.join(out, "xlxmert", "qa_from_stage1", "config.json")) as f:
    assert json.load(f)["init_from"] == os.path.join(out, "train")
  with open(os.path.join(study, "xlxmert_validation.md")) as f:
    text = f.read()
  assert "| type | questions | majority baseline | qa_from_ccc | qa_from_scratch |" in text
  assert "| stage1_from_ccc |" in text and "| pretrain_regression |" in text
  again = subprocess.run(cmd + ["--rows", "qa_from_ccc"], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
  assert again.returncode == 0 and "[xlxmert] row" not in again.stdout  # read back, nothing trained
