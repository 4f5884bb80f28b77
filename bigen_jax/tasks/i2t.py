"""Stage-1 image-to-text (METHOD.md §3, eq. 1): predict word l from words < l and the dense image.

One [MASK] at a uniform position l (words and [SEP], never [CLS]); later words are hidden; the prefix and
the [MASK] attend bidirectionally; cross-entropy with label smoothing (0.2 in the paper) at l only. The
``causal`` layout (an option, not the paper's) trains every word of the caption in one pass instead.
"""

import jax
import jax.numpy as jnp

from bigen_jax.models import apply
from bigen_jax.tasks import layouts
from bigen_jax.tasks import losses


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: text_ids/text_mask [B, L], dense [B, 64, D] or cluster_ids [B, 64], boxes [B, 64, 4].

  cfg: mask_id, pad_id, label_smoothing, visual_input ("dense" in the paper), layout ("mask": the paper's, one
  word per caption; "causal": every word, ``layouts.i2t_causal_inputs``). Returns (loss, metrics).
  """
  if cfg.get("layout", "mask") == "causal":
    return _causal_loss(params, batch, rng, model=model, cfg=cfg, frozen=frozen, deterministic=deterministic)
  if cfg.get("layout", "mask") != "mask":
    raise ValueError(f"tasks.i2t.layout {cfg.layout!r}: expected 'mask' or 'causal'")
  position_rng, dropout_rng = jax.random.split(rng)
  positions = layouts.sample_i2t_positions(position_rng, text_mask=batch["text_mask"])
  layout = layouts.i2t_inputs(text_ids=batch["text_ids"], positions=positions, mask_id=cfg.mask_id,
                              pad_id=cfg.pad_id, text_mask=batch["text_mask"])

  def head(module, out):
    hidden = jnp.take_along_axis(out.language, positions[:, None, None], axis=1)[:, 0]
    return module.predict_text(hidden)

  logits = apply.apply_model(
      model, params, task="i2t", rng=None if deterministic else dropout_rng,
      head=head, text_ids=layout.text_ids,
      text_mask=layout.text_mask, boxes=batch["boxes"],
      **apply.visual_input(batch, cfg.visual_input, frozen))
  return losses.cross_entropy(logits, layout.targets, jnp.ones_like(layout.targets),
                              label_smoothing=cfg.label_smoothing)


def _causal_loss(params, batch, rng, *, model, cfg, frozen, deterministic):
  """The causal layout's loss: mean cross-entropy over every next word of every caption."""
  layout = layouts.i2t_causal_inputs(text_ids=batch["text_ids"], text_mask=batch["text_mask"], pad_id=cfg.pad_id)
  logits = apply.apply_model(
      model, params, task="i2t", rng=None if deterministic else rng,
      head=lambda module, out: module.predict_text(out.language), text_ids=batch["text_ids"],
      text_mask=batch["text_mask"], text_attention=layout.text_attention,
      vision_text_mask=layout.vision_text_mask, boxes=batch["boxes"],
      **apply.visual_input(batch, cfg.visual_input, frozen))
  return losses.cross_entropy(logits, layout.targets, layout.weights, label_smoothing=cfg.label_smoothing)
