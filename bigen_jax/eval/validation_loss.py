"""Held-out loss and accuracy of every training task, without dropout, on a fixed set of batches.

The batches (captions sampled, cells masked) depend only on ``config.seed``, so numbers are comparable from
one evaluation to the next.
"""

import jax
import numpy as np

from bigen_jax import tasks as tasks_lib
from bigen_jax.data import input_pipeline


class Evaluator:
  """``validation_loss/<task>/{loss,accuracy}`` over ``config.eval.num_batches`` batches of the eval split."""

  def __init__(self, ctx):
    self.ctx = ctx
    config = ctx.config
    batch_size = config.eval.batch_size or config.batch_size
    data = input_pipeline.create_iterator(
        records_dir=config.data.records_dir, split=config.data.eval_split, global_batch_size=batch_size,
        seed=config.seed, vocab_dir=config.data.vocab_dir, shuffle_buffer=1, pad_id=ctx.tokenizer.pad_id)
    num = min(config.eval.num_batches, data.batches_per_epoch)
    self.batches = [ctx.batch_to_global(next(data)) for _ in range(num)]
    self.tasks = [name for name, cfg in config.tasks.items() if cfg.weight > 0]
    self.losses = {name: jax.jit(self._loss_fn(name)) for name in self.tasks}

  def _loss_fn(self, task):
    loss_fn, cfg = tasks_lib.get_task(task), self.ctx.task_cfgs[task]

    def evaluate(params, batch, rng, frozen):
      _, metrics = loss_fn(params, batch, rng, model=self.ctx.model, cfg=cfg, frozen=frozen, deterministic=True)
      return metrics

    return evaluate

  def run(self, params, *, step: int) -> dict[str, float]:
    del step
    out = {}
    for task in self.tasks:
      rng = jax.random.key(self.ctx.config.seed)
      metrics = [self.losses[task](params, b, jax.random.fold_in(rng, i), self.ctx.frozen)
                 for i, b in enumerate(self.batches)]
      for key in ("loss", "accuracy"):
        out[f"validation_loss/{task}/{key}"] = float(np.mean([m[key] for m in jax.device_get(metrics)]))
    return out
