"""``train_and_evaluate(config, workdir)``: the one training loop. Tasks are chosen per step by a schedule.

Sections: data sizes -> mesh -> input -> model and sharded state -> step functions -> checkpoint ->
evaluators -> loop. Every process runs the same code; each feeds its share of the global batch.
"""

import dataclasses
import json
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bigen_jax import checkpoint
from bigen_jax import config_checks
from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax import optim
from bigen_jax import parallel
from bigen_jax import run_config
from bigen_jax import tasks as tasks_lib
from bigen_jax.data import input_pipeline
from bigen_jax.data import records
from bigen_jax.data import tokenizer as tokenizer_lib
from bigen_jax.data import vocab as vocab_lib
from bigen_jax.eval import registry as eval_registry
from bigen_jax.models import flops
from bigen_jax.models import heads
from bigen_jax.models import lxmert

TRAIN_FIELDS = ("text_ids", "text_mask", "dense", "boxes", "cluster_ids")
HISTORY_NAME = "metrics.jsonl"


@flax.struct.dataclass
class TrainState:
  """step int32 []; params; opt_state; rng uint32 [2] (raw key data: checkpointable as a plain array)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass
class Context:
  """What step functions and evaluators share: the resolved config, model, frozen inputs and layout."""
  config: ml_collections.ConfigDict
  model: nn.Module
  frozen: dict[str, Any]
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  task_cfgs: dict[str, ml_collections.ConfigDict]
  tokenizer: Any
  vocab: Any = None  # the visual vocabulary (``data.vocab.Vocab``)
  workdir: str = ""  # where evaluators write their files (``workdir/eval``)

  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return parallel.data_sharding(self.mesh)

  def batch_to_global(self, batch: dict[str, np.ndarray], fields=TRAIN_FIELDS) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over (data, fsdp)."""
    sharding = self.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in fields if k in batch}


def resolve_config(config: ml_collections.ConfigDict):
  """Fills the sizes the data decides (-1 in the config) and checks explicit ones; returns
  (config, tokenizer, vocab). Errors name the flag and the file."""
  config = ml_collections.ConfigDict(config.to_dict())
  data = config.data
  for flag in ("records_dir", "vocab_dir", "tokenizer"):
    if not data[flag]:
      raise errors.ConfigError(f"--config.data.{flag} is empty: point it at the output of tools/ (see README)")
  manifest = records.read_manifest(data.records_dir)
  tok = tokenizer_lib.load_tokenizer(data.tokenizer)
  want_sha = manifest.get("tokenizer", {}).get("sha256")
  if want_sha and want_sha != records.sha256_file(data.tokenizer):
    raise records.DataError(f"--config.data.tokenizer={data.tokenizer} is not the vocabulary the records in "
                            f"{data.records_dir} were tokenised with ({manifest['tokenizer']['vocab_file']})")
  vocab = vocab_lib.load_vocab(data.vocab_dir, records_dir=data.records_dir)
  sizes = {"vocab_size": tok.vocab_size, "max_len": manifest["max_len"],
           "visual_feat_dim": manifest["feature_dim"], "num_clusters": vocab.k, "num_cells": records.NUM_CELLS}
  for field, value in sizes.items():
    if config.model[field] == -1:
      config.model[field] = value
    elif config.model[field] != value:
      raise errors.ConfigError(f"--config.model.{field}={config.model[field]} but the data has {value}")
  return config, tok, vocab


JOINT = "joint"


def task_cycle(task_configs: ml_collections.ConfigDict, schedule: str = "cycle") -> list[str]:
  """The repeating schedule of step kinds. ``schedule`` "cycle" (the paper): ``weight`` consecutive steps of
  each task, in config order; "joint": every step is ``JOINT``, the weighted sum of all tasks' losses."""
  for name in task_configs:
    tasks_lib.get_task(name)
  if not any(cfg.weight > 0 for cfg in task_configs.values()):
    raise errors.ConfigError("config.tasks gives every task weight 0: nothing to train")
  if schedule == "joint":
    return [JOINT]
  if schedule != "cycle":
    raise errors.ConfigError(f"--config.task_schedule={schedule!r}: expected 'cycle' or 'joint'")
  return [name for name, cfg in task_configs.items() for _ in range(int(cfg.weight))]


def _task_cfgs(config, tok) -> dict[str, ml_collections.ConfigDict]:
  out = {}
  for name, cfg in config.tasks.items():
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.update(dict(mask_id=tok.mask_id, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id))
    out[name] = ml_collections.FrozenConfigDict(cfg)
  return out


def _load_init_params(path: str, abstract: Any, scan_layers: bool) -> Any:
  """Converted params (tools/convert_lxmert.py) checked against the model's parameter tree."""
  from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
  params = convert_io.load_params(path)
  flat = flax.traverse_util.flatten_dict(params)
  if scan_layers and not any("layers" in k for k in flat):
    params = lxmert.stack_layers(params)
  want = flax.traverse_util.flatten_dict(abstract)
  have = flax.traverse_util.flatten_dict(params)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  bad = [k for k in set(want) & set(have) if tuple(have[k].shape) != tuple(want[k].shape)]
  if missing or extra or bad:
    raise errors.ConfigError(f"--config.init_from={path} does not fit the model: missing {missing[:5]}, unexpected "
                     f"{extra[:5]}, shape mismatch {bad[:5]}")
  return params


def param_layout(ctx: Context) -> tuple[Any, Any]:
  """(abstract params, each a ``ShapeDtypeStruct`` with its sharding; the shardings) of ``ctx``'s model."""
  boxed = lxmert.abstract_params(ctx.model, ctx.config.model)
  abstract = nn.unbox(boxed)
  shardings = parallel.fit_shardings(
      abstract, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), ctx.mesh, ctx.rules))
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                      shardings), shardings


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array every process holds whole, as a global array: each process puts only its own shards."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class _Init:
  """``init(rng)``: a new train state on the mesh; ``init.lower(rng)``: its program, for inspection.

  The large inputs (``init_from``'s params, the codebook) are read and placed on the devices at the call and
  passed to the jitted function as arguments, sharded like the params: closed over, they would be compiled into
  the program as constants (0.9 GB for the paper model).
  """

  def __init__(self, jitted, inputs: Callable[[], tuple[Any, Any]]):
    self._jitted, self._inputs = jitted, inputs

  def __call__(self, rng: jax.Array) -> TrainState:
    return self._jitted(rng, *self._inputs())

  def lower(self, rng: jax.Array):
    return self._jitted.lower(rng, *self._inputs())


def create_state(ctx: Context, tx: optax.GradientTransformation, codebook: np.ndarray):
  """Abstract train state and its shardings, and ``init(rng)`` (``_Init``) placing a new state on the mesh.

  codebook [K, D] (numpy) initialises the image head's last layer unless ``config.init_from`` is given. The
  ``init_from`` file is read only when ``init`` is called: evaluation, which restores, never needs it.
  """
  config, model = ctx.config, ctx.model
  abstract_params, param_sh = param_layout(ctx)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
  opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                            transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
  use_codebook = not config.init_from and config.init_image_head_from_codebook

  def init(rng, init_params, codebook):
    params_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(lxmert.init_params(model, config.model, params_rng))
    if init_params is not None:
      params = jax.tree.map(lambda p, x: x.astype(p.dtype), params, init_params)
    elif codebook is not None:
      params = heads.init_image_head_from_codebook(params, codebook)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))

  def inputs():
    if config.init_from:
      loaded = _load_init_params(config.init_from, abstract_params, config.model.scan_layers)
      return jax.tree.map(_place, loaded, param_sh), None
    return None, _place(np.asarray(codebook, np.float32), replicated) if use_codebook else None

  codebook_spec = jax.ShapeDtypeStruct(np.shape(codebook), jnp.float32) if use_codebook else None
  abstract = jax.eval_shape(init, jax.random.key(0), abstract_params if config.init_from else None, codebook_spec)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                          shardings)
  return abstract, shardings, _Init(jax.jit(init, out_shardings=shardings), inputs)


def _objective(ctx: Context, task: str):
  """``(params, batch, rng, frozen) -> (loss, metrics)`` of one step kind: a task of the registry, or
  ``JOINT``: sum over tasks of weight * loss (each task its own rng), metrics named ``<task>/<metric>``."""
  if task != JOINT:
    loss_fn, cfg = tasks_lib.get_task(task), ctx.task_cfgs[task]
    return lambda params, batch, rng, frozen: loss_fn(params, batch, rng, model=ctx.model, cfg=cfg,
                                                       frozen=frozen)
  weights = {name: float(cfg.weight) for name, cfg in ctx.config.tasks.items() if cfg.weight > 0}

  def joint(params, batch, rng, frozen):
    total, metrics = 0.0, {}
    for i, (name, weight) in enumerate(weights.items()):
      loss, task_metrics = tasks_lib.get_task(name)(params, batch, jax.random.fold_in(rng, i), model=ctx.model,
                                                    cfg=ctx.task_cfgs[name], frozen=frozen)
      total = total + weight * loss
      metrics.update({f"{name}/{k}": v for k, v in task_metrics.items()})
    return total, metrics

  return joint


def make_train_step(ctx: Context, task: str, tx: optax.GradientTransformation, schedule, shardings):
  """One jitted update for ``task``: (state, batch, frozen) -> (state, metrics). Donates the old state."""
  objective_fn = _objective(ctx, task)

  def step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params):
      return objective_fn(params, batch, rng, frozen)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  data = parallel.data_sharding(ctx.mesh)
  return jax.jit(step, in_shardings=(shardings, data, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))


def model_flops_per_example(config: ml_collections.ConfigDict, cycle: list[str]) -> float:
  """Training FLOPs of one example averaged over the task cycle (analytic, ``bigen_jax.models.flops``):
  I2T runs the text head at one position, T2I the image head on every cell."""
  per_task = {"i2t": flops.train_flops(config.model) + 3 * 2 * config.model.hidden_size * (
      config.model.hidden_size + config.model.vocab_size),
              "t2i": flops.train_flops(config.model, image_logits=True)}

  def one(task):
    return per_task.get(task, flops.train_flops(config.model))
  if cycle == [JOINT]:
    return float(sum(one(name) for name, cfg in config.tasks.items() if cfg.weight > 0))
  return float(np.mean([one(task) for task in cycle]))


class _History:
  """Logged metrics in ``workdir/metrics.jsonl``, one JSON line per log (read by the demo's loss-curve plot).

  The whole file is rewritten atomically at each log: object stores (gs://) cannot append, and a reader never
  sees a partial line.
  """

  def __init__(self, workdir: str, start_step: int):
    self.path = fileio.join(workdir, HISTORY_NAME)
    self.lines = []
    if jax.process_index() == 0 and epath.Path(self.path).exists():
      # Drops the lines a killed run wrote after its last checkpoint.
      self.lines = [line for line in epath.Path(self.path).read_text().splitlines()
                    if line and json.loads(line)["step"] <= start_step]
      fileio.write_atomic(self.path, "".join(line + "\n" for line in self.lines))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if jax.process_index() == 0:
      self.lines.append(json.dumps({"step": step, **scalars}))
      fileio.write_atomic(self.path, "".join(line + "\n" for line in self.lines))


def _summarise(pending: list[tuple[int, str, dict]], ckpt: checkpoint.Checkpointer) -> dict[str, float]:
  """Means of the metrics since the last log, per task; stops on a non-finite loss, naming the newest
  checkpoint that still verifies."""
  fetched = jax.device_get(pending)
  sums, counts = {}, {}
  for step, task, metrics in fetched:
    if not np.isfinite(metrics["loss"]):
      last_good = ckpt.newest_verified_step()
      where = f"step {last_good} in {ckpt.directory}" if last_good is not None else "none yet"
      raise FloatingPointError(f"non-finite {task} loss ({metrics['loss']}) at step {step + 1}; last good "
                               f"checkpoint: {where}")
    for key, value in metrics.items():
      name = key if key == "lr" or (task == JOINT and "/" in key) else f"{task}/{key}"
      sums[name] = sums.get(name, 0.0) + float(value)
      counts[name] = counts.get(name, 0) + 1
  return {k: sums[k] / counts[k] for k in sums}


def _profiler(config: ml_collections.ConfigDict, workdir: str) -> periodic_actions.Profile | None:
  """A ``jax.profiler`` trace of the ``config.profile.num_steps`` steps after step ``config.profile.start_step``
  into ``workdir/plugins/profile/<time>/`` (TensorBoard's profile tab), one file per host; None when off."""
  cfg = config.get("profile")
  if not cfg or not cfg.num_steps:
    return None
  return periodic_actions.Profile(logdir=workdir, num_profile_steps=cfg.num_steps, profile_duration_ms=0,
                                  first_profile=cfg.start_step, every_steps=None, every_secs=None)


def _stop_trace() -> None:
  """Ends a trace the loop left running (the run stopped inside the profiled steps)."""
  try:
    jax.profiler.stop_trace()
  except RuntimeError:  # no trace running
    pass


def build_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Checks ``config``, resolves it against the data and lays out the mesh: what training and evaluation
  share."""
  config_checks.check_config(config)
  config, tok, vocab = resolve_config(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.get("num_devices") else None
  mesh = parallel.make_mesh(config, devices)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen = {"codebook": jax.device_put(jnp.asarray(vocab.codebook), replicated)}
  return Context(config=config, model=lxmert.build_model(config.model), frozen=frozen, mesh=mesh,
                 rules=parallel.axis_rules(config), task_cfgs=_task_cfgs(config, tok), tokenizer=tok,
                 vocab=vocab, workdir=workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains ``config.total_steps`` steps (resuming from ``workdir``); returns the final train state."""
  ctx = build_context(config, workdir)
  config, mesh, rules, frozen = ctx.config, ctx.mesh, ctx.rules, ctx.frozen
  cycle = task_cycle(config.tasks, config.get("task_schedule", "cycle"))
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)

  # The state is placed by ``out_shardings``; activations are constrained only inside the mesh context below.
  abstract, shardings, init = create_state(ctx, tx, ctx.vocab.codebook)
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=config.checkpoint.every,
                                 keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                 fallback=config.checkpoint.get("fallback", True))
  if ckpt.latest_step() is not None:
    run_config.check_resume(config, workdir)
  run_config.save(config, workdir)
  data = input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, vocab_dir=config.data.vocab_dir, shuffle_buffer=config.data.shuffle_buffer,
      verify_checksums=config.data.verify_checksums, pad_id=ctx.tokenizer.pad_id,
      sharding=config.data.sharding)
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(abstract)
    data.set_state(data_state)
  else:
    state, start = init(jax.random.key(config.seed)), 0

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    steps = {task: make_train_step(ctx, task, tx, schedule, shardings) for task in set(cycle)}
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    logging.info("model: %.1fM parameters; tasks cycle %s; starting at step %d", num_params / 1e6, cycle, start)
    evaluators = [eval_registry.create(name, ctx) for name in config.eval.evaluators] if config.eval.every else []

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams(run_config.hparams(config))
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)
    history, stop = _History(workdir, start), checkpoint.StopSignal()
    profile = _profiler(config, workdir)
    step_flops = model_flops_per_example(config, cycle) * config.batch_size
    pending, summary, t_log, step = [], {}, time.time(), start
    last = min(config.stop_at_step or config.total_steps, config.total_steps)
    try:
      while step < last:
        task = cycle[step % len(cycle)]
        batch = ctx.batch_to_global(next(data))
        state, metrics = steps[task](state, batch, frozen)
        pending.append((step, task, metrics))
        step += 1
        report(step)
        if profile is not None:
          profile(step)
        save_now = ckpt.manager.should_save(step) or step == last
        if step % config.log_every == 0 or save_now:
          summary = _summarise(pending, ckpt)
          n, pending = len({s for s, _, _ in pending}), []
          elapsed, t_log = time.time() - t_log, time.time()
          summary.update({"steps_per_sec": n / elapsed, "examples_per_sec": n * config.batch_size / elapsed})
          if config.peak_flops_per_device:
            summary["mfu"] = step_flops * n / elapsed / (config.peak_flops_per_device * jax.device_count())
          writer.write_scalars(step, summary)
          history.write(step, summary)
          eta = (config.total_steps - step) / max(summary["steps_per_sec"], 1e-9)
          losses = "  ".join(f"{k} {v:.4f}" for k, v in sorted(summary.items()) if k.endswith("/loss"))
          print(f"[train] step {step}/{config.total_steps}  {losses}  {summary['steps_per_sec']:.2f} steps/s  "
                f"ETA {eta / 60:.1f} min", flush=True)
        ckpt.save(step, state, data.get_state(), force=step == last)
        if evaluators and step % config.eval.every == 0:
          results = {}
          for evaluator in evaluators:
            results.update(evaluator.run(state.params, step=step))
          writer.write_scalars(step, results)
          history.write(step, results)
        if stop.should_stop(step):
          _summarise(pending, ckpt)
          if ckpt.latest_step() != step:
            ckpt.save(step, state, data.get_state(), force=True)
          logging.warning("stopped by signal at step %d; checkpoint written", step)
          break
    finally:
      if profile is not None:
        _stop_trace()
      ckpt.close()
      writer.flush()
      stop.restore_handlers()
  return state
