"""Image–text matching (X-LXMERT's ITM objective, METHOD.md §7), used here as an auxiliary stage-1 task: does
this caption describe this image? It can only be answered through the cross-modality layers, so it pushes
the model to ground words in cells early.

A fraction ``mismatch_rate`` of the batch gets the image of another example (the batch rolled by one), and
the matching head on the pooled output predicts matched (1) / mismatched (0). The caption is whole.
"""

import jax
import jax.numpy as jnp

from bigen_jax.models import apply
from bigen_jax.tasks import losses


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: text_ids/text_mask [B, L], dense [B, M, D] or cluster_ids [B, M], boxes [B, M, 4].

  cfg: visual_input ("dense" or "discrete"), mismatch_rate. Returns (loss, metrics).
  """
  pick_rng, dropout_rng = jax.random.split(rng)
  visual = apply.visual_input(batch, cfg.visual_input, frozen)
  batch_size = batch["text_ids"].shape[0]
  mismatched = jax.random.uniform(pick_rng, (batch_size,)) < cfg.mismatch_rate
  key = "visual_feats" if cfg.visual_input == "dense" else "cluster_ids"
  other = jnp.roll(visual[key], 1, axis=0)
  where = mismatched.reshape((batch_size,) + (1,) * (other.ndim - 1))
  visual = {**visual, key: jnp.where(where, other, visual[key])}
  logits = apply.apply_model(
      model, params, task="i2t", rng=None if deterministic else dropout_rng,
      head=lambda module, out: module.predict_match(out.pooled), text_ids=batch["text_ids"],
      text_mask=batch["text_mask"], boxes=batch["boxes"], **visual)
  targets = (~mismatched).astype(jnp.int32)
  loss, metrics = losses.cross_entropy(logits, targets, jnp.ones_like(targets), label_smoothing=0.0)
  return loss, {**metrics, "mismatched": mismatched.mean()}
