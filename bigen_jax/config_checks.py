"""Checks of a training config that run before any compute; each error names the ``--config.`` flag.

What the data decides (vocabulary sizes, feature dimension) is checked later by ``experiment.resolve_config``
against the records; here: step counts, batch sizes against the devices, the mesh, task weights.
"""

import jax
import ml_collections

from bigen_jax import errors
from bigen_jax import parallel

_EVAL_BATCHES = {"captioning": "eval.captioning.batch_size", "generation": "eval.generation.batch_size",
                 "qa": "eval.qa.batch_size"}


def require(ok: bool, flag: str, value, why: str) -> None:
  """Raises ``ConfigError`` naming ``--config.<flag>`` and its value unless ``ok``."""
  if not ok:
    raise errors.ConfigError(f"--config.{flag}={value!r}: {why}")


def check_loop_fields(config: ml_collections.ConfigDict) -> None:
  """The fields ``bigen_jax.loop.run`` reads (steps, batch, logging, checkpoints, evaluation interval), checked
  for every trainer."""
  for flag in ("total_steps", "batch_size", "log_every", "checkpoint.every", "checkpoint.keep"):
    value = config
    for part in flag.split("."):
      value = value[part]
    require(isinstance(value, int) and value > 0, flag, value, "must be a positive integer")
  require(config.stop_at_step >= 0, "stop_at_step", config.stop_at_step, "must be >= 0 (0: total_steps)")
  require(config.eval.every >= 0, "eval.every", config.eval.every, "must be >= 0 (0: no evaluation)")


def task_on(config: ml_collections.ConfigDict, name: str) -> bool:
  """Whether ``config`` trains task ``name`` (``tasks.<name>`` present, with weight > 0)."""
  task = config.tasks.get(name)
  return task is not None and task.weight > 0


def check_scst(config: ml_collections.ConfigDict) -> None:
  """The fields of ``tasks.scst`` when it is on; its max_len against the data is checked by ``experiment``."""
  if not task_on(config, "scst"):
    return
  scst = config.tasks.scst
  require(isinstance(scst.num_samples, int) and scst.num_samples > 0, "tasks.scst.num_samples", scst.num_samples,
          "must be a positive integer (captions sampled per image)")
  require(scst.temperature > 0, "tasks.scst.temperature", scst.temperature, "must be positive")
  i2t = config.tasks.get("i2t", {})
  for field, default in (("layout", "mask"), ("visual_input", "dense")):
    want = i2t.get(field, default)
    require(scst[field] == want, f"tasks.scst.{field}", scst[field],
            f"must be --config.tasks.i2t.{field}={want!r}, as I2T trained the model and the captioning evaluator "
            "decodes")
  require(scst.max_len == -1 or scst.max_len >= 2, "tasks.scst.max_len", scst.max_len,
          "must be -1 (the data's caption length) or >= 2")
  require(bool(config.data.train_split), "data.train_split", config.data.train_split,
          "tasks.scst needs the training split's captions (its CIDEr-D document frequencies)")


def check_clip_loss(config: ml_collections.ConfigDict) -> None:
  """The fields of ``tasks.clip`` when it is on; its generator and CLIP are checked when ``experiment`` loads them."""
  if not task_on(config, "clip"):
    return
  task = config.tasks.clip
  for flag, why in (("generator_dir", "a bigen_jax.train_generator run directory: the frozen generator that draws "
                     "the relaxed grids"), ("clip_path", "a bigen_jax.train_clip run directory or params of "
                                            "tools/convert_clip.py: the frozen CLIP that scores them")):
    require(bool(task[flag]), f"tasks.clip.{flag}", task[flag], f"tasks.clip needs {why}")
  require(isinstance(task.num_steps, int) and task.num_steps > 0, "tasks.clip.num_steps", task.num_steps,
          "must be a positive integer (mask-predict passes)")
  require(task.tau > 0, "tasks.clip.tau", task.tau, "must be positive (the Gumbel-softmax temperature)")
  require(bool(config.data.train_split), "data.train_split", config.data.train_split,
          "tasks.clip needs the training split's captions (the CLIP token table)")


def check_pretraining(config: ml_collections.ConfigDict) -> None:
  """The fields of X-LXMERT's objectives (``tasks.mlm``, ``tasks.qa``, the objective of ``tasks.t2i``/``ccc``)."""
  from bigen_jax.tasks import qa, t2i  # pylint: disable=g-import-not-at-top
  for name in ("t2i", "ccc"):
    task = config.tasks.get(name)
    if task is None:
      continue
    objective = task.get("objective", "ccc")
    require(objective in t2i.OBJECTIVES, f"tasks.{name}.objective", objective, f"expected one of {t2i.OBJECTIVES}")
    require(objective == "ccc" or not task.get("feature_regression", 0.0), f"tasks.{name}.feature_regression",
            task.get("feature_regression"), f"adds a regression to the classification: 0 with objective={objective!r}")
  if task_on(config, "mlm"):
    rate = config.tasks.mlm.mask_rate
    require(0 < rate <= 1, "tasks.mlm.mask_rate", rate, "must be in (0, 1]")
  num_answers = config.model.get("num_answers", 0)
  questions = config.data.get("questions", False)
  require(num_answers >= 0 or questions, "model.num_answers", num_answers,
          "-1 (the answer vocabulary's size) needs --config.data.questions=True")
  if task_on(config, "qa"):
    require(questions, "data.questions", questions, "tasks.qa needs batches with questions")
    require(num_answers != 0, "model.num_answers", num_answers, "tasks.qa needs the answer head (-1: the answer "
            "vocabulary's size)")
    require(config.tasks.qa.loss in qa.LOSSES, "tasks.qa.loss", config.tasks.qa.loss, f"expected one of {qa.LOSSES}")


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                 process_count: int | None = None) -> tuple[int, int, int]:
  """Raises ``ConfigError`` for a config that cannot run on ``num_devices`` (default: all) devices over
  ``process_count`` processes; returns the mesh shape (data, fsdp, tensor)."""
  available = jax.device_count() if num_devices is None else num_devices
  processes = jax.process_count() if process_count is None else process_count
  check_loop_fields(config)
  if config.eval.every:
    require(config.eval.num_batches > 0, "eval.num_batches", config.eval.num_batches, "must be positive")
  for name, task in config.tasks.items():
    require(task.weight >= 0, f"tasks.{name}.weight", task.weight, "must be >= 0")
  require(config.optimizer.lr > 0, "optimizer.lr", config.optimizer.lr, "must be positive")
  check_scst(config)
  check_clip_loss(config)
  check_pretraining(config)
  dropout_rng = config.model.get("dropout_rng", "threefry")
  require(dropout_rng in ("threefry", "rbg"), "model.dropout_rng", dropout_rng, "expected 'threefry' or 'rbg'")
  code_bag = config.tasks.t2i.get("code_bag", 0.0)
  require(not code_bag or config.model.get("code_bag_head", ""), "tasks.t2i.code_bag", code_bag,
          "needs --config.model.code_bag_head=codes or features (the head it trains)")
  profile = config.get("profile")
  if profile:
    require(profile.num_steps >= 0, "profile.num_steps", profile.num_steps, "must be >= 0 (0: no trace)")
    if profile.num_steps:
      require(profile.start_step >= 1, "profile.start_step", profile.start_step,
               "must be >= 1: the trace starts after that many steps")

  wanted = int(config.mesh.get("num_devices") or 0)
  require(0 <= wanted <= available, "mesh.num_devices", wanted,
           f"there are {available} devices (0 uses all of them)")
  try:
    shape = parallel.mesh_shape(config, wanted or available)
  except ValueError as e:
    raise errors.ConfigError(f"--config.mesh ({dict(config.mesh)}): {e}") from None
  data_parallel = shape[0] * shape[1]

  def divisible(flag: str, batch: int) -> None:
    require(batch > 0 and batch % data_parallel == 0 and batch % processes == 0, flag, batch,
             f"must be a positive multiple of the {data_parallel} data-parallel devices (mesh data x fsdp = "
             f"{shape[0]} x {shape[1]}) and of the {processes} processes")

  divisible("batch_size", config.batch_size)
  if config.eval.every:
    if config.eval.batch_size:
      divisible("eval.batch_size", config.eval.batch_size)
    for evaluator, flag in _EVAL_BATCHES.items():
      if evaluator in config.eval.evaluators:
        batch = config.eval[evaluator].batch_size
        require(isinstance(batch, int) and batch > 0, flag, batch,
                 "must be a positive integer (images per data-parallel device)")
  return shape
