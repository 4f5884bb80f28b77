"""``train_and_evaluate(config, workdir)``: the one training loop. Tasks are chosen per step by a schedule.

Sections: context (``experiment``: data sizes, mesh, model) -> sharded state (``state``) -> input -> step
functions -> checkpoint -> evaluators -> loop, with its metrics (``metrics``). Every process runs the same code;
each feeds its share of the global batch.
"""

import time

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from bigen_jax import checkpoint
from bigen_jax import experiment
from bigen_jax import fileio
from bigen_jax import metrics as metrics_lib
from bigen_jax import optim
from bigen_jax import parallel
from bigen_jax import run_config
from bigen_jax import state as state_lib
from bigen_jax import tasks as tasks_lib
from bigen_jax.data import input_pipeline
from bigen_jax.eval import registry as eval_registry


def _objective(ctx: experiment.Context, task: str):
  """``(params, batch, rng, frozen) -> (loss, metrics)`` of one step kind: a task of the registry, or
  ``tasks_lib.JOINT``: sum over tasks of weight * loss (each task its own rng), metrics named ``<task>/<metric>``."""
  if task != tasks_lib.JOINT:
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


def make_train_step(ctx: experiment.Context, task: str, tx: optax.GradientTransformation, schedule, shardings):
  """One jitted update for ``task``: (state, batch, frozen) -> (state, metrics). Donates the old state."""
  objective_fn = _objective(ctx, task)

  def step(state: state_lib.TrainState, batch, frozen):
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains ``config.total_steps`` steps (resuming from ``workdir``); returns the final train state."""
  ctx = experiment.build_context(config, workdir)
  config, mesh, rules, frozen = ctx.config, ctx.mesh, ctx.rules, ctx.frozen
  cycle = tasks_lib.task_cycle(config.tasks, config.get("task_schedule", "cycle"))
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)

  # The state is placed by ``out_shardings``; activations are constrained only inside the mesh context below.
  abstract, shardings, init = state_lib.create_state(ctx, tx, ctx.vocab.codebook)
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
    history, stop = metrics_lib.History(workdir, start), checkpoint.StopSignal()
    profile = _profiler(config, workdir)
    step_flops = metrics_lib.model_flops_per_example(config, cycle) * config.batch_size
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
          summary = metrics_lib.summarise(pending, ckpt)
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
          metrics_lib.summarise(pending, ckpt)
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
