"""The CLIP trainer on tiny records with images (``configs/clip.py:tiny``, 32 px): the symmetric contrastive loss,
a tiny model overfitting one batch, a bit-exact resume, ``load_or_train`` reusing a finished run, ``load_clip`` on
a run and on converted params, and errors that name the flag or the file."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigen_jax import checkpoint
from bigen_jax import errors
from bigen_jax import metrics as metrics_lib
from bigen_jax import optim
from bigen_jax import parallel
from bigen_jax import train_clip as tc
from bigen_jax.convert import io as convert_io
from bigen_jax.data import records
from bigen_jax.models import clip
from configs import clip as clip_config
from conftest import write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = {"mesh.num_devices": 1}


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  """16 train and 8 validation records with 32x32 images and 1-3 captions ``caption c of i`` each."""
  path = str(tmp_path_factory.mktemp("clip_data") / "records")
  write_records(path, splits={"train": 16, "validation": 8}, images=True)
  return path


def _config(records_dir, **overrides):
  config = clip_config.get_config("tiny")
  config.data.records_dir = records_dir
  config.update_from_flattened_dict({**ONE_DEVICE, **overrides})
  return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory, records_dir):
  """(workdir, params, report) of the tiny run's 4 steps in one go (``load_or_train``)."""
  workdir = str(tmp_path_factory.mktemp("clip_straight"))
  params, report = tc.load_or_train(workdir, records_dir=records_dir, variant="tiny", **ONE_DEVICE)
  return workdir, params, report


def _final_state(workdir, config):
  """The whole train state (params, AdamW moments, rng) of the newest checkpoint of ``workdir``."""
  mesh, rules = parallel.make_mesh(config, jax.devices()[:1]), parallel.axis_rules(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract = tc.create_state(clip.build_model(config.model), mesh, rules, tx)[0]
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False, create=False)
  try:
    return jax.device_get(ckpt.restore(abstract)[0])
  finally:
    ckpt.close()


def _assert_equal_trees(a, b):
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def test_contrastive_loss_is_symmetric_info_nce():
  """The mean of the row-wise (image -> text) and column-wise (text -> image) cross-entropies of the diagonal."""
  logits = np.random.default_rng(0).normal(size=(5, 5)).astype(np.float32) * 3

  def cross_entropy(x):
    x = x - x.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(x).sum(axis=1)) - np.diag(x))

  loss, metrics = tc.contrastive_loss(logits)
  np.testing.assert_allclose(loss, (cross_entropy(logits) + cross_entropy(logits.T)) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["t2i_loss"], cross_entropy(logits.T), rtol=1e-5)
  assert float(metrics["i2t_accuracy"]) == pytest.approx(np.mean(np.argmax(logits, 1) == np.arange(5)))


def test_overfits_one_batch_and_clamps_the_temperature(records_dir):
  """A tiny CLIP on one fixed batch of 8 pairs: the loss falls below a tenth of its start (above 1.5) within 30
  steps. A logit scale pushed above log(100) is clamped there by the next update."""
  config = _config(records_dir, **{"optimizer.lr": 3e-3, "optimizer.schedule": "constant"})
  model = clip.build_model(config.model)
  mesh, rules = parallel.make_mesh(config, jax.devices()[:1]), parallel.axis_rules(config)
  tx, schedule = optim.make_optimizer(config.optimizer, 30)
  _, shardings, init = tc.create_state(model, mesh, rules, tx)
  rows = tc.read_records(records_dir, "train", with_images=True, num_examples=8)
  table = tc.caption_table(records_dir, "train", config.model.context_length)
  batch = tc.train_pairs({"index": np.array([r["index"] for r in rows]), "image": [r["image"] for r in rows]},
                         table, 32)
  batch["num_captions"] = np.ones_like(batch["num_captions"])  # one caption per image: a fixed batch
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = init(jax.random.key(0))
    step = tc.make_train_step(model, tx, schedule, shardings, mesh)
    losses = []
    for _ in range(30):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    assert 1.5 < losses[0] < 4.0, losses[0]
    assert min(losses[-5:]) < 0.1 * losses[0], losses[::5]
    state = state.replace(params={**state.params, "logit_scale": state.params["logit_scale"] * 0 + 6.0})
    state, _ = step(state, batch)
    assert float(state.params["logit_scale"]) == pytest.approx(np.log(100.0))


def test_trains_logs_checkpoints_and_reports(straight, records_dir):
  workdir, params, report = straight
  rows = [r for r in metrics_lib.read_history(workdir) if "clip/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for row in rows:
    for name in ("clip/loss", "clip/i2t_accuracy", "clip/t2i_loss", "clip/logit_scale", "clip/grad_norm"):
      assert np.isfinite(row[name]), (name, row)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  assert report["step"] == 4 and report["num_images"] == 8 and report["split"] == "validation"
  assert report["easy_candidates"] == 5  # 1 + eval.num_negatives of the tiny config
  assert 0.0 <= report["r_precision_easy"] <= 1.0
  assert report["clip_s_real"] >= 0.0 and report["clip_s_shuffled"] >= 0.0
  assert report["r_precision_hard"] is None and report["hard_trials"] == 0  # "caption c of i": no word to swap
  with open(os.path.join(workdir, tc.REPORT_NAME)) as f:
    assert json.load(f) == report
  assert set(params) == {"visual", "token_embedding", "positional_embedding", "transformer", "ln_final",
                         "text_projection", "logit_scale"}


@pytest.mark.slow  # ~60-90 s: keeps the default suite near its 20-minute budget; `make test-all` runs it
def test_resume_is_exact(tmp_path, straight, records_dir):
  """4 steps straight == 2 steps, stop, resume to 4 (``load_or_train`` both times): the whole state bitwise, the
  logged losses and the held-out report."""
  workdir = str(tmp_path / "sliced")
  params, report = tc.load_or_train(workdir, records_dir=records_dir, variant="tiny", stop_at_step=2, **ONE_DEVICE)
  assert report == {} and max(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == 2
  params, report = tc.load_or_train(workdir, records_dir=records_dir, variant="tiny", **ONE_DEVICE)
  _assert_equal_trees(params, straight[1])
  config = _config(records_dir)
  resumed, whole = _final_state(workdir, config), _final_state(straight[0], config)
  for field in ("params", "opt_state", "rng", "step"):
    _assert_equal_trees(getattr(resumed, field), getattr(whole, field))

  def losses(w):
    return [(r["step"], r["clip/loss"]) for r in metrics_lib.read_history(w) if "clip/loss" in r]

  assert losses(workdir) == losses(straight[0])
  assert {**report, "train_seconds": 0} == {**straight[2], "train_seconds": 0}


def test_load_or_train_reuses_a_finished_run(monkeypatch, straight, records_dir):
  workdir, params, report = straight

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(tc, "train_clip", no_training)
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  again_params, again_report = tc.load_or_train(workdir, records_dir=records_dir, variant="tiny", **ONE_DEVICE)
  assert again_report == report
  _assert_equal_trees(again_params, params)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == steps
  with pytest.raises(errors.ConfigError, match="optimizer.lr"):  # a different recipe is not this run
    tc.load_or_train(workdir, records_dir=records_dir, variant="tiny", **{"optimizer.lr": 0.5}, **ONE_DEVICE)


def test_load_clip_reads_a_run_and_converted_params(tmp_path, straight):
  workdir, params, _ = straight
  model, loaded, model_config = tc.load_clip(workdir)
  assert model_config.image_size == 32 and model_config.context_length == 16 and model.context_length == 16
  _assert_equal_trees(loaded, params)

  tiny = clip.clip_config("tiny")
  converted = nn.unbox(clip.init_params(clip.build_model(tiny), jax.random.key(3)))
  path = str(tmp_path / "clip_tiny.npz")
  convert_io.save_params(converted, path)  # what tools/convert_clip.py writes
  model, loaded, model_config = tc.load_clip(path, "tiny")
  assert model_config.context_length == 77 and model.image_size == 32
  _assert_equal_trees(loaded, converted)
  with pytest.raises(errors.UserError, match="clip_tiny.npz.*'vit_b32'"):
    tc.load_clip(path, "vit_b32")
  with pytest.raises(errors.UserError, match="name the clip_config variant"):
    tc.load_clip(path)
  with pytest.raises(errors.UserError, match="nowhere.npz does not exist"):
    tc.load_clip(str(tmp_path / "nowhere.npz"), "tiny")


def test_errors_name_the_flag_or_the_file(tmp_path, records_dir):
  cases = [({"data.records_dir": ""}, errors.ConfigError, "data.records_dir"),
           ({"model.patch_size": 5}, errors.ConfigError, "model.patch_size=5"),
           ({"model.text_heads": 3}, errors.ConfigError, "model.text_heads=3"),
           ({"eval.num_negatives": 0}, errors.ConfigError, "eval.num_negatives=0"),
           ({"data.records_dir": str(tmp_path / "absent")}, records.DataError, "no manifest.json in .*absent")]
  for overrides, error, message in cases:
    with pytest.raises(error, match=message):
      tc.train_clip(_config(records_dir, **overrides), str(tmp_path / "run"))
  imageless = str(tmp_path / "imageless")
  write_records(imageless, splits={"train": 8, "validation": 4})
  with pytest.raises(records.DataError, match="imageless hold no images"):
    tc.train_clip(_config(imageless), str(tmp_path / "run"))
  result = subprocess.run(
      [sys.executable, "-m", "bigen_jax.train_clip", "--config", "configs/clip.py:tiny", "--workdir",
       str(tmp_path / "cli"), f"--config.data.records_dir={tmp_path / 'absent'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: no manifest.json in ")
