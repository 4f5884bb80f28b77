"""Both stages from one config (``bigen_jax.stages``): stage 2 starts from stage 1's params and runs the paper's
cycle of SCST, CLIP-loss and cross-entropy steps through the frozen generator and CLIP; every Table 1 ablation
config builds and trains (slow)."""

import flax
import jax
import numpy as np
import pytest

from bigen_jax import checkpoint
from bigen_jax import config_checks
from bigen_jax import errors
from bigen_jax import experiment
from bigen_jax import metrics as metrics_lib
from bigen_jax import optim
from bigen_jax import stages
from bigen_jax import state as state_lib
from bigen_jax import tasks as tasks_lib
from bigen_jax import train
from bigen_jax import train_clip
from bigen_jax import train_generator
from bigen_jax.sampling import image_tokens
from configs import ablations
from configs import base
from configs import demo
from configs import generator as generator_config
from conftest import write_training_data

TINY_MODEL = ("hidden_size", "num_heads", "mlp_dim", "num_language_layers", "num_vision_layers", "num_cross_layers",
              "max_position_embeddings")


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory):
  """Tiny training data with images, and a 2-step generator run and a 4-step CLIP run on them (the frozen parts
  of the CLIP loss)."""
  root = str(tmp_path_factory.mktemp("stages"))
  data = write_training_data(root, splits={"train": 16, "validation": 8}, images=True)
  gan = generator_config.get_config("tiny")
  gan.data.update(dict(records_dir=data["records_dir"], vocab_dir=data["vocab_dir"]))
  gan.update_from_flattened_dict({"mesh.num_devices": 1, "total_steps": 2, "eval.num_examples": 0})
  train_generator.train_generator(gan, f"{root}/generator")
  train_clip.load_or_train(f"{root}/clip", records_dir=data["records_dir"], variant="tiny",
                           **{"mesh.num_devices": 1})
  return {**data, "generator_dir": f"{root}/generator", "clip_path": f"{root}/clip"}


def _tiny(config, runs, stage2_steps=4):
  """``config`` shrunk to seconds on the test data: the tiny model, batch 8, 2 stage-1 steps, ``stage2_steps``."""
  tiny = demo.get_config("tiny")
  config.model.update({k: tiny.model[k] for k in TINY_MODEL})
  config.update_from_flattened_dict({
      "data.records_dir": runs["records_dir"], "data.vocab_dir": runs["vocab_dir"],
      "data.tokenizer": runs["tokenizer"], "mesh.num_devices": 1, "batch_size": 8, "total_steps": 2, "log_every": 1,
      "eval.every": 0, "checkpoint.every": 2, "checkpoint.async_save": False})
  if stages.has_stage2(config):
    config.stage2.update(dict(batch_size=8, total_steps=stage2_steps, log_every=1,
                              checkpoint=dict(every=stage2_steps)))
    config.stage2.tasks.clip.update(dict(generator_dir=runs["generator_dir"], clip_path=runs["clip_path"],
                                         prompt="a photo of "))
  return config


@pytest.mark.slow  # ~65 s with its runs; make demo trains both stages, test_scst and test_clip_loss the tasks
def test_stage_two_starts_from_stage_one_and_cycles_scst_clip_and_cross_entropy(tmp_path, frozen_runs):
  config = _tiny(demo.get_config("two_stage"), frozen_runs)
  workdir = str(tmp_path / "run")
  final = stages.train_stages(config, workdir)
  assert int(final.step) == 4
  rows = [r for r in metrics_lib.read_history(f"{workdir}/stage2") if "lr" in r]
  tasks = [next(t for t in ("scst", "clip", "t2i") if f"{t}/loss" in r) for r in rows]
  assert tasks == ["scst", "clip", "scst", "t2i"]  # base.stage2_fields' cycle
  assert all(np.isfinite(r[f"{t}/loss"]) for t, r in zip(tasks, rows))
  np.testing.assert_allclose([r["lr"] for r in rows], config.stage2.optimizer.lr, rtol=1e-6)  # fixed
  clip_row = rows[1]
  clip_cfg = config.stage2.tasks.clip  # the cells the decoder's last pass decides are the relaxed ones
  last = image_tokens.masked_count(clip_cfg.num_steps - 2, num_steps=clip_cfg.num_steps, num_cells=64,
                                   schedule=clip_cfg.schedule)
  assert clip_row["clip/relaxed_cells"] == int(last) and np.isfinite(clip_row["clip/cos"])

  # stage 2's first state holds stage 1's final params (init_from = its run directory)
  second = stages.stage2_config(config, f"{workdir}/stage1")
  ctx = experiment.build_context(second, str(tmp_path / "probe"))
  tx, _ = optim.make_optimizer(second.optimizer, second.total_steps)
  _, _, init = state_lib.create_state(ctx, tx, ctx.vocab.codebook)
  start = jax.device_get(init(jax.random.key(second.seed)).params)
  ckpt = checkpoint.Checkpointer(f"{workdir}/stage1/checkpoints", save_every=1, async_save=False, create=False)
  stage1, step = ckpt.restore_params(jax.eval_shape(lambda: start))
  ckpt.close()
  assert step == 2
  flat_start, flat_stage1 = (flax.traverse_util.flatten_dict(jax.device_get(p)) for p in (start, stage1))
  assert flat_start.keys() == flat_stage1.keys()
  for key, value in flat_start.items():
    np.testing.assert_array_equal(value, flat_stage1[key], err_msg=str(key))
  # a model that does not fit stage 1's params is named
  wider = stages.stage2_config(config, f"{workdir}/stage1")
  wider.model.mlp_dim *= 2
  wider_ctx = experiment.build_context(wider, str(tmp_path / "probe2"))
  with pytest.raises(errors.ConfigError, match="--config.init_from=.*does not fit this model"):
    state_lib.create_state(wider_ctx, tx, wider_ctx.vocab.codebook)[2](jax.random.key(0))
  # the CLIP loss reads each caption's CLIP tokens after the prompt, row = record index
  want, _ = train_clip.caption_table(frozen_runs["records_dir"], "train", ctx.frozen["clip_text"].shape[-1],
                                     prompt="a photo of ")
  np.testing.assert_array_equal(ctx.frozen["clip_text"], want)


def test_stage_two_fields_must_name_fields_of_stage_one(tmp_path):
  config = demo.get_config("two_stage")
  config.stage2.optimizer.learning_rate = 1e-5
  with pytest.raises(errors.ConfigError, match="--config.stage2.optimizer.learning_rate"):
    stages.stage2_config(config, str(tmp_path))
  config = demo.get_config("two_stage")
  second = stages.stage2_config(config, str(tmp_path))
  assert second.init_from == str(tmp_path) and "stage2" not in second and "stage2" not in stages.stage1_config(config)
  assert (second.optimizer.lr, second.optimizer.schedule) == (config.stage2.optimizer.lr, "constant")
  assert second.optimizer.b2 == config.optimizer.b2  # fields the block leaves alone are stage 1's
  assert tuple(base.stage2_fields().task_order) == ("scst", "clip", "scst", "t2i")
  for flag, value in (("tasks.clip.generator_dir", ""), ("tasks.clip.clip_path", ""), ("tasks.clip.tau", 0.0),
                      ("tasks.clip.num_steps", 0)):
    bad = stages.stage2_config(config, str(tmp_path))
    bad.update_from_flattened_dict({flag: value})
    with pytest.raises(errors.ConfigError, match=f"--config.{flag}="):
      config_checks.check_config(bad)
  assert tasks_lib.task_cycle(second.tasks, "cycle", second.task_order) == list(second.task_order)
  with pytest.raises(errors.ConfigError, match=r"--config.task_order=.*names \['i2t'\]"):
    tasks_lib.task_cycle(second.tasks, "cycle", ("scst", "i2t"))  # i2t has weight 0 in stage 2


@pytest.mark.slow
@pytest.mark.parametrize("row", ablations.ROWS)
def test_each_ablation_row_builds_and_trains(tmp_path, frozen_runs, row):
  config = _tiny(ablations.get_config(row), frozen_runs)
  workdir = str(tmp_path / row)
  if stages.has_stage2(config):
    final = stages.train_stages(config, workdir)
    history = metrics_lib.read_history(f"{workdir}/stage2")
  else:
    final = train.train_and_evaluate(config, workdir)
    history = metrics_lib.read_history(workdir)
  assert int(final.step) == (4 if stages.has_stage2(config) else 2)
  losses = {k: v for r in history for k, v in r.items() if k.endswith("/loss")}
  assert all(np.isfinite(v) for v in losses.values())
  trained = {k.split("/")[0] for k in losses}
  want = {"full": {"scst", "clip", "t2i"}, "two_model": {"scst", "clip", "t2i"}, "dense_only": {"scst", "clip", "t2i"},
          "discrete_only": {"scst", "clip", "t2i"}, "no_sequence_level": {"i2t", "t2i"},
          "no_clip_loss": {"scst", "t2i"}}[row]
  assert trained >= want and not (row == "no_clip_loss" and "clip" in trained)
