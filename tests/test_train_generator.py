"""The SPADE GAN's trainer end to end on tiny records with images (``configs/generator.py:tiny``, 32 px): it
trains, logs, checkpoints and draws; a resume is bit-exact; a step on 8 devices is the step on one; the
perceptual ResNet-50 stays frozen; the command line runs and reports user errors in one line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigen_jax import errors
from bigen_jax import metrics as metrics_lib
from bigen_jax import parallel
from bigen_jax import run_config
from bigen_jax import train_generator as tg
from bigen_jax.convert import io as convert_io
from bigen_jax.models import spade
from configs import generator as generator_config
from conftest import write_training_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_training_data(str(tmp_path_factory.mktemp("gan_data")), splits={"train": 16, "validation": 4},
                             images=True)


def _config(data, **overrides):
  config = generator_config.get_config("tiny")
  config.data.update(dict(records_dir=data["records_dir"], vocab_dir=data["vocab_dir"]))
  config.mesh.num_devices = 1
  config.eval.num_examples = 0
  config.update_from_flattened_dict(overrides)
  return config


def _initial_state(config):
  """The state ``train_generator`` starts from (same seed), on one device."""
  config, _ = tg.resolve_config(config)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  init = tg.create_state(config, mesh, parallel.axis_rules(config), tg.make_optimizers(config))[2]
  return jax.device_get(init(jax.random.key(config.seed)))


def _assert_equal_trees(a, b):
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
  """(workdir, final state on the host) of 4 steps in one go, with samples every 2 steps."""
  workdir = str(tmp_path_factory.mktemp("gan_straight"))
  config = _config(data, **{"eval.every": 2, "eval.num_examples": 2})
  return workdir, jax.device_get(tg.train_generator(config, workdir))


def test_trains_logs_checkpoints_and_draws(data, straight):
  workdir, state = straight
  assert int(state.step) == 4
  rows = [r for r in metrics_lib.read_history(workdir) if "gan/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for row in rows:
    for name in ("gan/loss", "gan/discriminator/loss", "gan/generator/loss", "gan/generator/feature_matching",
                 "gan/discriminator/acgan_real", "gan/generator/acgan"):
      assert np.isfinite(row[name]), (name, row)
    assert row["gan/generator/lr"] == pytest.approx(4e-4) and row["gan/discriminator/lr"] == pytest.approx(1e-4)
  assert [r["step"] for r in metrics_lib.read_history(workdir) if "samples/l1" in r] == [2, 4]
  for step in (2, 4):
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
    assert os.path.getsize(os.path.join(workdir, "samples", f"step_{step:06d}.png")) > 0
  saved = run_config.load(workdir)
  assert saved.model.num_clusters == 6 and saved.model.feature_dim == 8  # from the visual vocabulary
  start = _initial_state(_config(data))
  for net in tg.NETS:  # both nets were updated, and their spectral vectors advanced
    for tree in ("params", "spectral"):
      before, after = jax.tree.leaves(getattr(start, tree)[net]), jax.tree.leaves(getattr(state, tree)[net])
      assert any(not np.array_equal(a, b) for a, b in zip(before, after)), (net, tree)


def test_load_or_train_reads_a_finished_run_back(data, straight, monkeypatch):
  """A run at its total_steps is read back, not trained (G's params and spectral vectors of its last state); a
  changed config is refused, naming the field."""
  workdir, state = straight
  config = _config(data, **{"eval.every": 2, "eval.num_examples": 2})
  monkeypatch.setattr(tg, "train_generator", lambda *args: pytest.fail("a finished run was trained again"))
  variables = tg.load_or_train(config, workdir)
  _assert_equal_trees(variables, {"params": state.params["generator"], "spectral": state.spectral["generator"]})
  config.optimizer.generator_lr = 1e-3
  with pytest.raises(errors.ConfigError, match="generator_lr"):
    tg.load_or_train(config, workdir)


def test_resume_is_exact(tmp_path, data, straight):
  """4 steps straight == 2 steps, stop, resume to 4: params, spectral vectors, Adam states, rng and the logged
  losses bitwise (the second half starts from the checkpoint of step 2; samples change nothing)."""
  workdir = str(tmp_path / "sliced")
  assert int(tg.train_generator(_config(data, stop_at_step=2), workdir).step) == 2
  resumed = tg.train_generator(_config(data), workdir)
  assert int(resumed.step) == 4
  for field in ("params", "spectral", "opt_state", "rng"):
    _assert_equal_trees(getattr(resumed, field), getattr(straight[1], field))
  losses = lambda w: [(r["step"], r["gan/loss"]) for r in metrics_lib.read_history(w) if "gan/loss" in r]
  assert losses(workdir) == losses(straight[0])


@pytest.mark.slow  # ~40 s: keeps the default suite near its 20-minute budget; `make test-all` runs it
def test_a_step_on_eight_devices_is_the_step_on_one(tmp_path, data):
  """One step with the batch over data x fsdp = 2 x 2 and D's ACGAN head over tensor = 2 is the step of one
  device: the same losses, gradients (Adam's first moment: with b1 = 0 it is the step's gradient) and spectral
  vectors to float rounding, and the same updates wherever the gradient is above rounding noise (Adam's
  normalised first step turns a noise-level gradient, e.g. of a conv bias before instance norm, mathematically
  zero, into a step of up to lr)."""
  one = tg.train_generator(_config(data, total_steps=1), str(tmp_path / "one"))
  eight = tg.train_generator(_config(data, total_steps=1, **{"mesh.num_devices": 8, "mesh.data": 2,
                                                             "mesh.fsdp": 2, "mesh.tensor": 2}),
                             str(tmp_path / "eight"))
  head = eight.params["discriminator"]["acgan"]["kernel"]
  assert head.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
  assert len(head.sharding.device_set) == 8
  one, eight = jax.device_get(one), jax.device_get(eight)
  for net in tg.NETS:
    grads_one, grads_eight = one.opt_state[net][0].mu, eight.opt_state[net][0].mu
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_one))
    for g1, g8, p1, p8 in zip(*(jax.tree.leaves(t) for t in (grads_one, grads_eight, one.params[net],
                                                              eight.params[net]))):
      np.testing.assert_allclose(g8, g1, rtol=0, atol=1e-6 * scale)
      above_noise = np.abs(g1) > 1e-4 * scale
      np.testing.assert_allclose(p8[above_noise], p1[above_noise], rtol=0, atol=1e-6)
    for u1, u8 in zip(jax.tree.leaves(one.spectral[net]), jax.tree.leaves(eight.spectral[net])):
      np.testing.assert_allclose(u8, u1, rtol=0, atol=1e-5)
  loss = lambda w: [r["gan/loss"] for r in metrics_lib.read_history(w) if "gan/loss" in r]
  np.testing.assert_allclose(loss(str(tmp_path / "eight")), loss(str(tmp_path / "one")), rtol=1e-6)


@pytest.mark.slow  # ~25 s, mostly compiling ResNet-50
def test_perceptual_resnet_stays_frozen(tmp_path, data):
  """Two steps with a ResNet-50's perceptual loss (random, saved and read back as converted weights are): the
  loss is used, the net's variables are unchanged afterwards, and the train state holds G and D only (the net is
  a jit argument, not state)."""
  config = _config(data, **{"perceptual.random": True})
  config, vocab = tg.resolve_config(config)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  optimizers = tg.make_optimizers(config)
  _, shardings, init = tg.create_state(config, mesh, parallel.axis_rules(config), optimizers)
  before = jax.device_get(tg.load_perceptual_net(config.perceptual, config.seed))
  path = str(tmp_path / "resnet50.npz")
  convert_io.save_params(before, path)
  weights = ml_collections.ConfigDict(dict(weights=path, random=False, dtype="float32"))
  net = tg.load_perceptual_net(weights, 0)
  _assert_equal_trees(net, before)
  convert_io.save_params({"params": {"fc": {"bias": np.zeros(10, np.float32)}}}, path)
  with pytest.raises(errors.ConfigError, match=r"perceptual.weights=.* is not a ResNet-50"):
    tg.load_perceptual_net(weights, 0)
  frozen = {"codebook": jnp.asarray(vocab.codebook), "resnet": net}
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
           "cluster_ids": rng.integers(0, vocab.k, (4, 64)).astype(np.int32)}
  state = init(jax.random.key(0))
  with jax.set_mesh(mesh):
    step = tg.make_train_step(config, optimizers, shardings, mesh)
    for _ in range(2):
      state, metrics = step(state, batch, frozen)
  assert float(metrics["generator/perceptual"]) > 0 and np.isfinite(float(metrics["generator/loss"]))
  _assert_equal_trees(net, before)
  counts = spade.param_counts(spade.spade_config("tiny", num_clusters=vocab.k))
  assert {k: sum(x.size for x in jax.tree.leaves(state.params[k])) for k in tg.NETS} == counts
  for k in tg.NETS:  # Adam's moments mirror the net's params: nothing else is trained
    adam = state.opt_state[k][0]
    assert [sum(x.size for x in jax.tree.leaves(m)) for m in (adam.mu, adam.nu)] == [counts[k]] * 2


@pytest.mark.slow  # ~22 s: a subprocess that compiles the GAN again
def test_command_line(tmp_path, data, records_dir):
  base = [sys.executable, "-m", "bigen_jax.train_generator", "--config",
          os.path.join(ROOT, "configs", "generator.py:tiny"), "--config.mesh.num_devices=1"]
  workdir = str(tmp_path / "run")
  out = subprocess.run(base + ["--workdir", workdir, f"--config.data.records_dir={data['records_dir']}",
                               f"--config.data.vocab_dir={data['vocab_dir']}", "--config.total_steps=1",
                               "--config.eval.num_examples=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  progress, = [line for line in out.stdout.splitlines() if line.startswith("[train] step 1/1")]
  assert "gan/generator/loss" in progress and "steps/s  ETA" in progress
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
  out = subprocess.run(base + ["--workdir", str(tmp_path / "bad"), f"--config.data.records_dir={records_dir}",
                               "--config.data.vocab_dir=nowhere"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      f"error: the records in {records_dir} hold no images: extract them with tools/extract_features.py "
      "--store_images to train the image generator"], out.stderr[-3000:]
