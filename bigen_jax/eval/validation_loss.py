"""Held-out loss and accuracy of every training task, without dropout, on a fixed set of batches.

The batches (captions sampled, cells masked) depend only on ``config.seed``, so numbers are comparable from
one evaluation to the next. Each task's loss is also measured with every caption paired with another image
of its batch (same rng): ``gap`` = shuffled_loss - loss is how much the task uses the pairing of caption and
image (0 for a model that ignores the other modality). The side a task is conditioned on moves
(``CONDITION``: the images for I2T, the captions for T2I), so every example keeps its own targets and masked
cells and the pairing is the only difference.
"""

import jax
import jax.numpy as jnp
import numpy as np

from bigen_jax import experiment
from bigen_jax import tasks as tasks_lib
from bigen_jax.data import input_pipeline
from bigen_jax.tasks import qa

VISUAL_FIELDS = ("dense", "cluster_ids")
TEXT_FIELDS = ("text_ids", "text_mask")
CONDITION = {"i2t": VISUAL_FIELDS, "itm": VISUAL_FIELDS, "t2i": TEXT_FIELDS, "ccc": TEXT_FIELDS}  # others: images
# Tasks left out: SCST's loss is a policy-gradient surrogate over sampled captions, not a held-out loss (the
# captioning evaluator's CIDEr-D measures it); the CLIP loss scores relaxed samples (the generation evaluator's
# CLIPScore measures decoded images).
NO_HELD_OUT_LOSS = ("scst", "clip")


def roll_fields(batch: dict[str, jax.Array], fields: tuple[str, ...], *, shift: int = 1) -> dict[str, jax.Array]:
  """``batch`` with ``fields`` rolled by ``shift`` along the batch axis, the rest kept: with the visual
  fields (dense [B, 64, D], cluster_ids [B, 64]) caption i meets image i - shift; with the text fields
  (text_ids, text_mask [B, L]) image i meets caption i - shift. Boxes (one grid for all) never move."""
  return {k: jnp.roll(v, shift, axis=0) if k in fields else v for k, v in batch.items()}


def roll_images(batch: dict[str, jax.Array], *, shift: int = 1) -> dict[str, jax.Array]:
  """``roll_fields`` of the visual side."""
  return roll_fields(batch, VISUAL_FIELDS, shift=shift)


class Evaluator:
  """``validation_loss/<task>/{loss,accuracy,shuffled_loss,gap}`` over ``config.eval.num_batches`` batches
  of the eval split."""

  def __init__(self, ctx):
    self.ctx = ctx
    config = ctx.config
    batch_size = config.eval.batch_size or config.batch_size
    data = input_pipeline.create_iterator(
        records_dir=config.data.records_dir, split=config.data.eval_split, global_batch_size=batch_size,
        seed=config.seed, vocab_dir=config.data.vocab_dir, shuffle_buffer=1, pad_id=ctx.tokenizer.pad_id,
        questions=config.data.get("questions", False), answers_file=config.data.get("answers_file", ""))
    num = min(config.eval.num_batches, data.batches_per_epoch)
    self.tasks = [name for name, cfg in config.tasks.items() if cfg.weight > 0 and name not in NO_HELD_OUT_LOSS]
    fields = experiment.TRAIN_FIELDS + (qa.QUESTION_FIELDS if "qa" in self.tasks else ())
    self.batches = [ctx.batch_to_global(next(data), fields) for _ in range(num)]
    self.losses = {name: jax.jit(self._loss_fn(name)) for name in self.tasks}

  def _loss_fn(self, task):
    loss_fn, cfg = tasks_lib.get_task(task), self.ctx.task_cfgs[task]

    def evaluate(params, batch, rng, frozen):
      def metrics(b):
        return loss_fn(params, b, rng, model=self.ctx.model, cfg=cfg, frozen=frozen, deterministic=True)[1]

      true = metrics(batch)
      shuffled = roll_fields(batch, CONDITION.get(task, VISUAL_FIELDS))
      return {"loss": true["loss"], "accuracy": true["accuracy"], "shuffled_loss": metrics(shuffled)["loss"]}

    return evaluate

  def run(self, params, *, step: int) -> dict[str, float]:
    del step
    out = {}
    for task in self.tasks:
      rng = jax.random.key(self.ctx.config.seed)
      metrics = jax.device_get([self.losses[task](params, b, jax.random.fold_in(rng, i), self.ctx.frozen)
                                for i, b in enumerate(self.batches)])
      means = {key: float(np.mean([m[key] for m in metrics])) for key in ("loss", "accuracy", "shuffled_loss")}
      means["gap"] = means["shuffled_loss"] - means["loss"]
      out.update({f"validation_loss/{task}/{key}": value for key, value in means.items()})
    return out
