"""Stage-1 text-to-image (METHOD.md §3, eq. 3): predict the cluster ids of masked grid cells.

A set of cells is masked (the paper's code: one count ~ U{6..64} per batch; X-LXMERT: a ratio ~ U(0, 1] per
example), fed the learned mask feature, and their cluster ids are predicted from the caption and the rest.
"""

import jax

from bigen_jax.models import masks
from bigen_jax.tasks import common


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: text_ids/text_mask [B, L], cluster_ids [B, 64] (targets), boxes [B, 64, 4], dense for the
  "dense only" ablation. cfg: mask_schedule, min_masked, max_masked, label_smoothing, visual_input."""
  mask_rng, dropout_rng = jax.random.split(rng)
  targets = batch["cluster_ids"]
  visual_mask = masks.t2i_mask(mask_rng, batch_size=targets.shape[0], num_cells=targets.shape[1],
                               schedule=cfg.mask_schedule, min_masked=cfg.min_masked,
                               max_masked=cfg.max_masked)
  logits = common.apply_model(
      model, params, task="t2i", rng=None if deterministic else dropout_rng,
      head=lambda module, out: module.predict_image(out.vision),
      text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"],
      visual_mask=visual_mask, **common.visual_input(batch, cfg.visual_input, frozen))
  loss, metrics = common.cross_entropy(logits, targets, visual_mask, label_smoothing=cfg.label_smoothing)
  return loss, {**metrics, "masked_cells": visual_mask.sum(-1).mean()}
