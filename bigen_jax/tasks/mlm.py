"""Masked language modelling, X-LXMERT's text-side pretraining objective (METHOD.md §7).

BERT's masking of the caption (``layouts.mlm_inputs``: rate ``mask_rate``, 0.15; of the chosen words 80% [MASK],
10% a random word, 10% unchanged; at least one per caption), the caption attending bidirectionally, the image
whole; cross-entropy of the text head at the chosen positions. Its text head is the one X-LXMERT's Gibbs
captioner reads (``sampling.captions.gibbs_captions``).
"""

import jax

from bigen_jax.models import apply
from bigen_jax.tasks import layouts
from bigen_jax.tasks import losses


def vocab_size(model) -> int:
  """The word vocabulary of ``model`` (of its I2T half for the two-model ablation)."""
  return apply.first_model(model).vocab_size


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: text_ids/text_mask [B, L], dense [B, M, D] or cluster_ids [B, M], boxes [B, M, 4].

  cfg: mask_rate, label_smoothing, visual_input, mask_id, cls_id, sep_id, pad_id (unk_id, when given, is neither
  chosen nor a random replacement). Returns (loss, metrics: loss, accuracy, masked_words per caption).
  """
  mask_rng, dropout_rng = jax.random.split(rng)
  special = (cfg.cls_id, cfg.sep_id, cfg.pad_id) + ((cfg.unk_id,) if "unk_id" in cfg else ())
  layout = layouts.mlm_inputs(mask_rng, text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                              rate=cfg.mask_rate, mask_id=cfg.mask_id, vocab_size=vocab_size(model),
                              special_ids=special)
  logits = apply.apply_model(
      model, params, task="i2t", rng=None if deterministic else dropout_rng,
      head=lambda module, out: module.predict_text(out.language), text_ids=layout.text_ids,
      text_mask=batch["text_mask"], boxes=batch["boxes"], **apply.visual_input(batch, cfg.visual_input, frozen))
  loss, metrics = losses.cross_entropy(logits, layout.targets, layout.chosen,
                                       label_smoothing=cfg.get("label_smoothing", 0.0))
  return loss, {**metrics, "masked_words": layout.chosen.sum(-1).mean()}
