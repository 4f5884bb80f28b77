"""Stage-2 text-to-image by the CLIP loss (METHOD.md §4, eq. 4): L = -max(cos(I(X), T(Y)), 0), X the image the model
draws for caption Y, I and T the frozen CLIP image and text towers. The gradient reaches the transformer through a
Gumbel-softmax relaxation of the last decoding pass.

In one compiled step: the first ``num_steps - 1`` passes of the decoder (``sampling.image_tokens.decode_passes``;
argmax in the paper, any of the generation evaluator's decoders by the config; without gradient: which cells each
pass keeps is a discrete choice) leave ids int32 [B, 64] and the cells still masked; the last pass
(``image_tokens.pass_logits``) runs with gradients and gives logits [B, 64, K]. At those masked cells the cluster is
relaxed by Gumbel-softmax at ``tau`` (``hard``: straight-through, a one-hot forward and the soft gradient); the
cells earlier passes fixed are the constant one-hot of their ids (at inference the image is the ids, and the
model's outputs there are never used). The relaxed one-hots [B, 64, K] times the centroid codebook [K, D] give the
soft grid [B, 8, 8, D]; the frozen SPADE generator draws it (images [B, S, S, 3] in [-1, 1]), ``clip.preprocess``
resizes it (bicubic) to CLIP's input, and the frozen CLIP scores it against the caption's prompt ("a photo depicts "
+ caption in CLIP's BPE ids, ``frozen["clip_text"]``): loss = -scale * mean relu(100 cos) (the paper's code:
scale 2.5, tau 1, 4 passes). Codebook, generator and CLIP are constants (``stop_gradient``).

``rng`` is split in three: the decoder's key (used by the "random" and "maskgit" orders), the Gumbel noise, the
generator's noise. No dropout in any case. ``deterministic`` (evaluation): no Gumbel noise, the relaxation is
softmax(logits / tau) (``hard``: its argmax, so the drawn grid is ``parallel_decode``'s).
"""

import jax
import jax.numpy as jnp
import jax.scipy.special

from bigen_jax.models import clip
from bigen_jax.models import spade
from bigen_jax.sampling import image_tokens
from bigen_jax.tasks import layouts

Array = jax.Array
FROZEN_KEYS = {"codebook": "the visual vocabulary's centroids [K, D]",
               "generator": "the frozen SPADE generator's variables",
               "clip": "the frozen CLIP's params",
               "clip_text": "the captions' CLIP token ids [N, C, T]"}


def gumbel_softmax(logits: Array, rng: Array | None, *, tau: float, hard: bool) -> Array:
  """float32 [..., K]: softmax((logits + g) / tau) of ``logits`` [..., K], g iid Gumbel(0, 1) from ``rng`` (None:
  no noise). ``hard``: the one-hot of its argmax in the forward pass, the soft gradient in the backward one
  (straight-through), so the forward value is an exact one-hot."""
  logits = jnp.asarray(logits, jnp.float32)
  if rng is not None:
    logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  soft = jax.nn.softmax(logits / tau, axis=-1)
  if not hard:
    return soft
  one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return one_hot + (soft - jax.lax.stop_gradient(soft))


def relaxed_one_hot(logits: Array, ids: Array, masked: Array, rng: Array | None, *, tau: float,
                    hard: bool) -> Array:
  """float32 [B, M, K]: ``gumbel_softmax`` of the last pass's logits [B, M, K] at the ``masked`` cells [B, M],
  the constant one-hot of ``ids`` [B, M] at the others."""
  relaxed = gumbel_softmax(logits, rng, tau=tau, hard=hard)
  fixed = jax.nn.one_hot(ids, logits.shape[-1], dtype=jnp.float32)
  return jnp.where(masked[..., None], relaxed, fixed)


def last_pass_state(params, rng: Array, *, model, inputs: dict[str, Array], cfg) -> tuple[Array, Array]:
  """(ids int32 [B, M], masked bool [B, M]): the decoder's state before its last pass, the earlier passes run
  without gradient; every cell masked when ``cfg.num_steps`` is 1. ``inputs``: text_ids, text_mask, boxes,
  codebook, and null_text_ids/null_text_mask with guidance."""
  batch, num_cells = inputs["boxes"].shape[:2]
  if cfg.num_steps == 1:
    return jnp.zeros((batch, num_cells), jnp.int32), jnp.ones((batch, num_cells), bool)
  ids, masked, _ = image_tokens.decode_passes(
      jax.lax.stop_gradient(params), rng, passes=cfg.num_steps - 1, model=model, num_steps=cfg.num_steps,
      order=cfg.order, schedule=cfg.schedule, temperature=cfg.get("temperature", 0.0),
      choice_temperature=cfg.get("choice_temperature", 0.0), guidance=cfg.get("guidance", 0.0), **inputs)
  return ids, masked


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: text_ids/text_mask int32 [B, L], boxes float32 [B, 64, 4], index and caption_index int32 [B] (the
  record and which of its captions text_ids is). frozen: ``FROZEN_KEYS``. cfg: the decoder (num_steps, schedule,
  order; temperature, choice_temperature and guidance, 0 in the paper: ``image_tokens.parallel_decode``'s), tau,
  hard, scale, clip_model (a ``clip.clip_config``'s fields). Returns (loss, metrics: loss, cos, clip_score =
  relu(100 cos), relaxed_cells per image, entropy of the last pass's softmax(logits) at those cells, their means)."""
  for key, what in FROZEN_KEYS.items():
    if key not in frozen:
      raise ValueError(f"tasks.clip needs frozen[{key!r}], {what}: experiment.build_context builds it when "
                       f"--config.tasks.clip.weight > 0")
  if cfg.num_steps < 1:
    raise ValueError(f"--config.tasks.clip.num_steps={cfg.num_steps}: expected at least 1 decoding pass")
  decode_rng, gumbel_rng, noise_rng = jax.random.split(rng, 3)
  codebook = jax.lax.stop_gradient(frozen["codebook"])
  inputs = dict(text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"], codebook=codebook)
  if cfg.get("guidance", 0.0):
    null_ids, null_mask = layouts.null_captions(batch["text_ids"], cls_id=cfg.cls_id, sep_id=cfg.sep_id,
                                                pad_id=cfg.pad_id)
    inputs.update(null_text_ids=null_ids, null_text_mask=null_mask)
  ids, masked = last_pass_state(params, decode_rng, model=model, inputs=inputs, cfg=cfg)
  logits = image_tokens.pass_logits(params, ids, masked, model=model, guidance=cfg.get("guidance", 0.0), **inputs)
  probs = relaxed_one_hot(logits, ids, masked, None if deterministic else gumbel_rng, tau=cfg.tau, hard=cfg.hard)
  grid = (probs @ codebook.astype(jnp.float32)).reshape(ids.shape[0], spade.GRID, spade.GRID, codebook.shape[-1])
  images = spade.decode_image(jax.lax.stop_gradient(frozen["generator"]), grid, noise_rng)
  clip_model = clip.build_model(cfg.clip_model)
  pixels = clip.preprocess(images, image_size=clip_model.image_size, value_range=(-1.0, 1.0))
  clip_ids = frozen["clip_text"][batch["index"], batch["caption_index"]]
  cos = clip.frozen_similarity(frozen["clip"], pixels, clip_ids, model=clip_model)
  score = jax.nn.relu(100.0 * cos)
  loss = -cfg.scale * jnp.mean(score)
  relaxed = masked.astype(jnp.float32)
  entropy = jnp.sum(jax.scipy.special.entr(jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)), axis=-1)
  return loss, {"loss": loss, "cos": cos.mean(), "clip_score": score.mean(), "relaxed_cells": relaxed.sum(-1).mean(),
                "entropy": jnp.sum(entropy * relaxed) / jnp.maximum(relaxed.sum(), 1.0)}
