"""Stage-1 text-to-image (METHOD.md §3, eq. 3): predict the cluster ids of masked grid cells.

A set of cells is masked (the paper's code: one count ~ U{6..64} per batch; X-LXMERT: a ratio ~ U(0, 1] per
example, ``mask_schedule="uniform"``), fed the learned mask feature, and their cluster ids are predicted from the
caption and the rest. The same loss is X-LXMERT's masked cluster-centroid classification (CCC, the ``ccc`` task of
the registry, its own config block). ``objective="regression"`` regresses the masked cells' input features instead
of classifying them (LXMERT's masked feature regression, X-LXMERT's comparison to CCC).
With ``caption_dropout`` p > 0 each training caption is replaced, with probability p, by the null caption
``[CLS] [SEP]`` (``layouts.null_captions``), which teaches the unconditional model that classifier-free guidance
decodes against (``sampling.image_tokens``).
"""

import jax
import jax.numpy as jnp
import optax

from bigen_jax.models import apply
from bigen_jax.models import heads
from bigen_jax.tasks import layouts
from bigen_jax.tasks import losses

Array = jax.Array
OBJECTIVES = ("ccc", "regression")


def drop_captions(rng: Array, *, text_ids: Array, text_mask: Array, rate: float, cls_id: int, sep_id: int,
                  pad_id: int) -> tuple[Array, Array, Array]:
  """Each caption of ``text_ids``/``text_mask`` [B, L] replaced by the null caption with probability
  ``rate``: (text_ids, text_mask, dropped bool [B])."""
  dropped = jax.random.bernoulli(rng, rate, (text_ids.shape[0],))
  null_ids, null_mask = layouts.null_captions(text_ids, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id)
  text_ids = jnp.where(dropped[:, None], null_ids, text_ids)
  text_mask = jnp.where(dropped[:, None], null_mask, text_mask).astype(jnp.asarray(text_mask).dtype)
  return text_ids, text_mask, dropped


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: text_ids/text_mask [B, L], cluster_ids [B, 64] (targets), boxes [B, 64, 4], dense for the
  "dense only" ablation. cfg: mask_schedule, min_masked, max_masked, label_smoothing, visual_input,
  caption_dropout, feature_regression and code_bag (training only), objective ("ccc", default: cross-entropy of
  the cluster ids; "regression": ``regression_loss`` of the image head's feature against the masked cells' input
  features, accuracy by the nearest centroid), cls_id, sep_id, pad_id."""
  objective = cfg.get("objective", "ccc")
  if objective not in OBJECTIVES:
    raise ValueError(f"tasks.<t2i|ccc>.objective {objective!r}: expected one of {OBJECTIVES}")
  mask_rng, dropout_rng = jax.random.split(rng)
  targets = batch["cluster_ids"]
  text_ids, text_mask = batch["text_ids"], batch["text_mask"]
  dropped = jnp.zeros(text_ids.shape[:1], bool)
  if cfg.caption_dropout > 0 and not deterministic:
    text_ids, text_mask, dropped = drop_captions(
        jax.random.fold_in(rng, 1), text_ids=text_ids, text_mask=text_mask, rate=cfg.caption_dropout,
        cls_id=cfg.cls_id, sep_id=cfg.sep_id, pad_id=cfg.pad_id)
  visual_mask = layouts.t2i_mask(mask_rng, batch_size=targets.shape[0], num_cells=targets.shape[1],
                               schedule=cfg.mask_schedule, min_masked=cfg.min_masked,
                               max_masked=cfg.max_masked)
  regression = cfg.get("feature_regression", 0.0)
  code_bag = 0.0 if deterministic else cfg.get("code_bag", 0.0)  # training aids: evaluation reports the CE alone

  def head(module, out):
    logits, feats = module.image_head(out.vision, with_features=True)
    if not code_bag:
      return logits, feats, None
    bag = module.predict_code_bag(out.vision)
    if module.code_bag_head == "codes":
      return logits, feats, code_bag_loss(bag, targets, visual_mask)
    return logits, feats, feature_bag_loss(bag, targets, visual_mask, frozen["codebook"])

  visual = apply.visual_input(batch, cfg.visual_input, frozen)
  logits, feats, bag_error = apply.apply_model(
      model, params, task="t2i", rng=None if deterministic else dropout_rng, head=head,
      text_ids=text_ids, text_mask=text_mask, boxes=batch["boxes"], visual_mask=visual_mask, **visual)
  if objective == "regression":
    inputs = visual["visual_feats"] if "visual_feats" in visual else jnp.asarray(frozen["codebook"])[targets]
    loss = regression_loss(feats, inputs, visual_mask, frozen["codebook"])
    metrics = {"loss": loss, "accuracy": nearest_centroid_accuracy(feats, targets, visual_mask, frozen["codebook"])}
  else:
    loss, metrics = losses.cross_entropy(logits, targets, visual_mask, label_smoothing=cfg.label_smoothing)
  metrics = {**metrics, "masked_cells": visual_mask.sum(-1).mean(), "caption_dropped": dropped.mean()}
  if regression and not deterministic:
    error = feature_regression_loss(feats, targets, visual_mask, frozen["codebook"])
    loss = loss + regression * error
    metrics.update(feature_regression=error, loss=loss)
  if code_bag:
    loss = loss + code_bag * bag_error
    metrics.update(code_bag=bag_error, loss=loss)
  return loss, metrics


def code_bag_loss(logits: Array, targets: Array, weights: Array) -> Array:
  """Cross-entropy of every cell's ``logits`` [B, N, K] against the image's code bag: the uniform distribution
  over the distinct codes of ``targets`` [B, N]; mean over the cells of ``weights`` [B, N].

  Why: a caption says which objects an image holds, not which cells they cover, so each cell's own target
  depends on the caption only through the few cells an object covers (18% in the demo world), and a model
  trained on it alone stays on the codes' marginal (``scripts/t2i_word_probe.py``). Which codes the image
  contains depends on the caption at every cell, and a code counts once however many cells it covers, so the
  background's codes do not drown the objects'.
  """
  bag = _code_bag(targets, logits.shape[-1])
  return _cell_mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), bag[:, None, :]), weights)


def feature_bag_loss(feats: Array, targets: Array, weights: Array, codebook: Array) -> Array:
  """Mean squared error of every cell's ``feats`` [B, N, D] against the mean of the image's distinct codes'
  centroids, the codebook standardised per feature column (``codebook`` [K, D]; ``targets`` [B, N]); mean over
  the cells of ``weights`` [B, N]. The code bag of ``code_bag_loss`` in feature space, where codes that share an
  attribute share a direction."""
  codebook = heads.standardise_columns(codebook)
  mean = _code_bag(targets, codebook.shape[0]) @ codebook
  return _cell_mean(jnp.mean(jnp.square(feats - mean[:, None, :]), -1), weights)


def _code_bag(targets: Array, num_codes: int) -> Array:
  """float32 [B, K]: the uniform distribution over the distinct codes of each row of ``targets`` [B, N]."""
  b = targets.shape[0]
  present = jnp.zeros((b, num_codes), jnp.float32).at[jnp.arange(b)[:, None], targets].set(1.0)
  return present / present.sum(-1, keepdims=True)


def _cell_mean(error: Array, weights: Array) -> Array:
  """The mean of ``error`` [B, N] over the cells of ``weights`` [B, N]."""
  weights = weights.astype(jnp.float32)
  return (error * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def regression_loss(feats: Array, target_feats: Array, weights: Array, codebook: Array) -> Array:
  """Mean squared error between the predicted features [B, N, D] and ``target_feats`` [B, N, D] over the cells of
  ``weights`` [B, N], divided by the mean square of ``codebook`` [K, D] (1.0 for predicting zeros)."""
  codebook = jnp.asarray(codebook, jnp.float32)
  if feats.shape[-1] != target_feats.shape[-1]:
    raise ValueError(f"regressing features needs the image head's feature as wide as the visual features "
                     f"({target_feats.shape[-1]}), got {feats.shape[-1]}: set --config.model.image_head_dim=0")
  error = jnp.mean(jnp.square(feats - target_feats.astype(jnp.float32)), -1) / jnp.mean(jnp.square(codebook))
  return _cell_mean(error, weights)


def nearest_centroid_accuracy(feats: Array, targets: Array, weights: Array, codebook: Array) -> Array:
  """The fraction of the cells of ``weights`` [B, N] whose feature [B, N, D] is nearest (Euclidean) to the centroid
  of its target cluster (``targets`` [B, N], ``codebook`` [K, D])."""
  codebook = jnp.asarray(codebook, jnp.float32)
  score = 2.0 * jnp.einsum("bnd,kd->bnk", feats, codebook) - jnp.sum(jnp.square(codebook), -1)
  return _cell_mean((jnp.argmax(score, -1) == targets).astype(jnp.float32), weights)


def feature_regression_loss(feats: Array, targets: Array, weights: Array, codebook: Array) -> Array:
  """Mean squared error between the predicted features [B, N, D] and the target clusters' centroids
  (``codebook`` [K, D] at ``targets`` [B, N]) over the cells of ``weights`` [B, N], divided by the codebook's
  mean square (1.0 for predicting zeros).

  The cluster softmax moves one of K logits per target; this loss moves every attribute the feature space
  spells out (in the demo world: the detector's colour, shape and size logits) at once, so what a caption
  says of an object's colour reaches the masked cells before the K-way classifier has sorted it out.
  """
  codebook = jnp.asarray(codebook, jnp.float32)
  if feats.shape[-1] != codebook.shape[-1]:
    raise ValueError(f"--config.tasks.t2i.feature_regression needs the image head's feature as wide as the "
                     f"codebook ({codebook.shape[-1]}), got {feats.shape[-1]}: set --config.model.image_head_dim=0")
  return regression_loss(feats, codebook[targets], weights, codebook)
