"""The run's config is saved in its workdir: evaluation reads it (``--config`` overrides on top), a resume that
changes what is trained stops with the changed fields, and evaluation restores only the params (no optimiser
state, no ``init_from`` file)."""

import os
import re
import subprocess
import sys

from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags
import numpy as np
import pytest
import tensorflow as tf

from bigen_jax import checkpoint
from bigen_jax import errors
from bigen_jax import evaluate
from bigen_jax import experiment
from bigen_jax import run_config
from bigen_jax import state as state_lib
from bigen_jax import train
from bigen_jax.convert import io as convert_io
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from bigen_jax.models import lxmert
from configs import demo
from conftest import write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("saved_config"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 16, "validation": 8}, dim=8, max_len=6)
  vocab.build_vocab(records_dir, vocab_dir, k=6, iterations=2, sample_size=500, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=records_dir, vocab_dir=vocab_dir, tokenizer=vocab_txt))
  config.update(dict(total_steps=4, stop_at_step=2, log_every=1))
  config.checkpoint.every = 2
  config.eval.update(dict(every=0, evaluators=("validation_loss",)))
  config.mesh.num_devices = 1
  return config


def test_flatten_compare_and_round_trip(tmp_path, config):
  flat = run_config.flatten(config)
  assert flat["model.hidden_size"] == 32 and flat["tasks.t2i.weight"] == 1 and flat["axis_rules"][0][0] == "act_batch"
  assert all(isinstance(v, (bool, int, float, str)) for v in run_config.hparams(config).values())
  launched = config.copy_and_resolve_references()
  launched.distributed.update(dict(num_processes=4, process_id=2, coordinator_address="10.0.0.1:1234"))
  run_config.save(launched, str(tmp_path))
  loaded = run_config.load(str(tmp_path))
  assert loaded.axis_rules == config.axis_rules  # tuples again
  assert loaded.distributed == config.distributed  # a single process, whatever launched the run
  assert run_config.changed_fields(config, loaded) == []
  changed = loaded.copy_and_resolve_references()
  changed.update(dict(batch_size=16, log_every=7, seed=3, total_steps=9))
  changed.eval.every = 5
  changed.checkpoint.keep = 9
  changed.mesh.data = 2
  changed.optimizer.lr = 0.5
  changed.tasks.t2i.weight = 3
  assert run_config.changed_fields(config, changed) == [
      "batch_size: 8 -> 16", "optimizer.lr: 0.001 -> 0.5", "seed: 0 -> 3", "tasks.t2i.weight: 1 -> 3",
      "total_steps: 4 -> 9"]
  with pytest.raises(errors.ConfigError, match=re.escape(f"{tmp_path / 'nowhere' / 'config.json'} does not exist")):
    run_config.load(str(tmp_path / "nowhere"))


def test_a_saved_config_older_than_a_field_matches_its_old_behaviour(config):
  """A config saved before ``model.caption_to_cells`` existed resumes under a config that leaves it off (what
  the older code did), and not under one that turns it on."""
  older = config.copy_and_resolve_references()
  del older.model["caption_to_cells"]
  assert "model.caption_to_cells" not in run_config.flatten(older)
  assert run_config.changed_fields(older, config) == []
  on = config.copy_and_resolve_references()
  on.model.caption_to_cells = True
  assert run_config.changed_fields(older, on) == ["model.caption_to_cells: false -> true"]


def test_loading_an_older_saved_config_adds_the_fields_it_predates(tmp_path, config):
  """``run_config.get_config`` (the evaluate CLI's) of a config saved before ``eval.generation.generator_dir``
  existed holds it with its ``ADDED_FIELDS`` value (so ``--config.eval.generation.generator_dir`` can set it);
  fields whose parent is absent (the GAN's ``loss_weights``) are not added."""
  older = config.copy_and_resolve_references()
  del older.eval.generation["generator_dir"]
  run_config.save(older, str(tmp_path))
  assert "generator_dir" not in run_config.load(str(tmp_path)).eval.generation
  loaded = run_config.get_config(str(tmp_path))
  assert loaded.eval.generation.generator_dir == "" and "loss_weights" not in loaded
  assert run_config.flatten(loaded) == run_config.flatten(config)


@pytest.mark.slow  # ~45 s: four trainer runs; the saved config's comparison is tested alone above
def test_resume_with_a_changed_config_stops_unless_allowed(tmp_path, config):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  saved = run_config.load(workdir)
  assert saved.model.vocab_size == 205 and saved.batch_size == 8  # the resolved config
  events = [os.path.join(workdir, f) for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  plugins = {v.metadata.plugin_data.plugin_name for path in events for e in tf.compat.v1.train.summary_iterator(path)
             for v in e.summary.value}
  assert "hparams" in plugins

  changed = config.copy_and_resolve_references()
  changed.stop_at_step = 0
  changed.optimizer.lr = 0.5
  changed.tasks.i2t.label_smoothing = 0.0
  with pytest.raises(errors.ConfigError, match=re.escape(
      f"resuming --workdir={workdir} with a config that changes what is trained (optimizer.lr: 0.001 -> 0.5; "
      "tasks.i2t.label_smoothing: 0.2 -> 0.0)")) as raised:
    train.train_and_evaluate(changed, workdir)
  assert "--config.allow_config_change=True" in str(raised.value)
  assert run_config.load(workdir).optimizer.lr == config.optimizer.lr  # not overwritten

  harmless = config.copy_and_resolve_references()
  harmless.update(dict(stop_at_step=3, log_every=3))
  harmless.mesh.num_devices = 2
  harmless.checkpoint.keep = 5
  harmless.eval.num_batches = 2
  assert int(train.train_and_evaluate(harmless, workdir).step) == 3

  changed.allow_config_change = True
  assert int(train.train_and_evaluate(changed, workdir).step) == 4
  assert run_config.load(workdir).optimizer.lr == 0.5


@pytest.mark.slow  # ~30 s; test_evaluate reads saved configs too
def test_evaluate_reads_the_saved_config_and_restores_only_params(tmp_path, config):
  """The run starts from ``init_from``; evaluation works after that file is gone, with an optimiser config whose
  state would not fit the checkpoint's (only the params are restored), from the saved config."""
  resolved = experiment.resolve_config(config)[0]
  model = lxmert.build_model(resolved.model)
  params = jax.device_get(jax.jit(lambda: nn.unbox(lxmert.init_params(model, resolved.model, jax.random.key(3))))())
  init_from = str(tmp_path / "init.npz")
  convert_io.save_params(params, init_from)
  run = config.copy_and_resolve_references()
  run.update(dict(init_from=init_from, stop_at_step=0))
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(run, workdir)
  os.remove(init_from)

  results, step = evaluate.evaluate(None, workdir)
  assert step == 4 and set(results) >= {"validation_loss/i2t/loss", "validation_loss/t2i/loss"}
  no_clipping = run.copy_and_resolve_references()
  no_clipping.optimizer.clip_norm = 0.0  # the optimiser state loses its clipping entry
  assert evaluate.evaluate(no_clipping, workdir) == (results, 4)

  ctx = experiment.build_context(run, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, create=False)
  try:
    restored, step = ckpt.restore_params(state_lib.param_layout(ctx)[0])
  finally:
    ckpt.close()
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state.params))


@pytest.mark.slow  # the CLI over the saved-config path test_evaluate_reads_the_saved_config_... checks in-process
def test_evaluate_cli_uses_the_saved_config_with_overrides(tmp_path, config):
  workdir = str(tmp_path / "run")
  run = config.copy_and_resolve_references()
  run.update(dict(total_steps=2, stop_at_step=0))
  train.train_and_evaluate(run, workdir)
  argv = evaluate.with_saved_config(["evaluate", "--workdir", workdir, "--config.eval.num_batches=3"])
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  assert fv.config.eval.num_batches == 3 and fv.config.data.records_dir == config.data.records_dir
  assert evaluate.with_saved_config(["e", "--config=c.py", "--workdir=w"]) == ["e", "--config=c.py", "--workdir=w"]

  out = subprocess.run([sys.executable, "-m", "bigen_jax.evaluate", "--workdir", workdir,
                        "--config.data.eval_split=train"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| metric (step 2) | value |" in out.stdout and "validation_loss/i2t/loss" in out.stdout
  missing = str(tmp_path / "nothing")
  os.makedirs(os.path.join(missing, "checkpoints", "1"))
  out = subprocess.run([sys.executable, "-m", "bigen_jax.evaluate", "--workdir", missing], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 2 and f"{missing}/config.json does not exist" in out.stderr, out.stderr[-3000:]
  assert len(out.stderr.strip().splitlines()) == 1
