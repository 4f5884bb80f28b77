"""``train_and_evaluate(config, workdir)``: the one training loop. Tasks are chosen per step by a schedule.

Sections: context (``experiment``: data sizes, mesh, model) -> sharded state (``state``) -> checkpoint -> input
-> step functions -> evaluators -> the loop (``loop.run``: progress, metrics, checkpoints, shared with the GAN's
trainer). Every process runs the same code; each feeds its share of the global batch.
"""

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from bigen_jax import config_checks
from bigen_jax import experiment
from bigen_jax import loop
from bigen_jax import metrics as metrics_lib
from bigen_jax import optim
from bigen_jax import parallel
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
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  data = parallel.data_sharding(ctx.mesh)
  return jax.jit(step, in_shardings=(shardings, data, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))


def _evaluate(evaluators: list[Any]):
  """``(state, step) -> scalars``: every evaluator's results on ``state.params``."""
  def evaluate(state: state_lib.TrainState, step: int) -> dict[str, float]:
    results = {}
    for evaluator in evaluators:
      results.update(evaluator.run(state.params, step=step))
    return results
  return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  """Trains ``config.total_steps`` steps (resuming from ``workdir``); returns the final train state."""
  ctx = experiment.build_context(config, workdir)
  config, mesh, rules, frozen = ctx.config, ctx.mesh, ctx.rules, ctx.frozen
  cycle = tasks_lib.task_cycle(config.tasks, config.get("task_schedule", "cycle"), config.get("task_order", ()),
                               seed=config.seed, num_steps=config.total_steps)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)

  # The state is placed by ``out_shardings``; activations are constrained only inside the mesh context below.
  abstract, shardings, init = state_lib.create_state(ctx, tx, ctx.vocab.codebook)
  ckpt = loop.open_run(config, workdir)
  references = config_checks.task_on(config, "scst")
  fields = experiment.train_fields(config)
  data = input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, vocab_dir=config.data.vocab_dir, shuffle_buffer=config.data.shuffle_buffer,
      verify_checksums=config.data.verify_checksums, pad_id=ctx.tokenizer.pad_id,
      sharding=config.data.sharding, with_all_captions=references, questions=config.data.get("questions", False),
      answers_file=config.data.get("answers_file", ""))
  state, start = loop.restore_or_init(ckpt, abstract, lambda: init(jax.random.key(config.seed)), data)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    steps = {task: loop.BoundStep(make_train_step(ctx, task, tx, schedule, shardings), (frozen,))
             for task in set(cycle)}
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    logging.info("model: %.1fM parameters; %s schedule of tasks %s; starting at step %d", num_params / 1e6,
                 config.get("task_schedule", "cycle"), cycle if len(cycle) <= 16 else sorted(steps), start)
    evaluators = [eval_registry.create(name, ctx) for name in config.eval.evaluators] if config.eval.every else []
    step_flops = metrics_lib.model_flops_per_example(config, cycle) * config.batch_size
    return loop.run(config, workdir, state=state, start=start, steps=steps, cycle=cycle, data=data,
                    to_global=lambda batch: ctx.batch_to_global(batch, fields), ckpt=ckpt,
                    evaluate=_evaluate(evaluators) if evaluators else None, step_flops=step_flops)
