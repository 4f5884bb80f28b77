"""Text-to-image decoding of the 8x8 grid of cluster ids as one compiled loop (METHOD.md §5).

``parallel_decode`` starts from a fully masked grid and runs ``num_steps`` model passes. Each pass predicts
every masked cell (argmax, or a sample at ``temperature``) and then chooses which cells stay masked for the
next pass. The ``schedule`` says how many: ``linear`` leaves floor(M * (K - 1 - t) / K) masked after pass t
(64 -> 48 -> 32 -> 16 -> 0 for K = 4); ``cosine`` (MaskGIT) floor(M * cos(pi/2 * (t + 1) / K)), at least one
fewer than before and at least 1 until the last pass (64 -> 59 -> 45 -> 24 -> 0 for K = 4). The ``order``
says which:

  mask_predict   the least confident cells of the whole grid (Ghazvininejad et al.; X-LXMERT's default):
                 a cell decided earlier is re-masked when its probability is among the lowest.
  easy_first     the least confident of the still-masked cells: decided cells are final.
  left_to_right  raster order (top-left to bottom-right): the last cells stay masked.
  random         a random order per image, drawn once: image b's cells by decreasing
                 ``jax.random.uniform(jax.random.split(rng)[0], (B, M))[b]``.
  maskgit        MaskGIT's ``mask_by_random_topk``: the least confident of the still-masked cells, confidence
                 = log-probability of the decided id + ``choice_temperature * (1 - (t + 1) / K) * gumbel``;
                 with ``temperature`` > 0 every pass samples, so a blank grid need not collapse to one token.

With K = M every order decides one cell per pass, X-LXMERT's sequential baselines. ``guidance`` w > 0 adds
classifier-free guidance: each pass also runs the model on the null caption ``[CLS] [SEP]``
(``tasks.layouts.null_captions``; T2I trains on it with ``caption_dropout``) and decodes from the logits
(1 + w) * cond - w * uncond. ``decode_passes`` stops after the first passes and returns the state the next pass
starts from (stage 2's CLIP loss runs the last pass itself, with gradients).

The ``readout`` says how a pass reads the cells' cluster logits: "classifier" (the image head's D->K layer) or
"nearest_centroid", -||f - c_k||^2 of the image head's D-wide feature f and each centroid c_k of the frozen codebook
(``nearest_centroid_logits``): the readout of a model trained by feature regression (``tasks.t2i``'s objective
"regression"), whose classifier never trained.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from bigen_jax.models import apply

Array = jax.Array
ORDERS = ("mask_predict", "easy_first", "left_to_right", "random", "maskgit")
SCHEDULES = ("linear", "cosine")
READOUTS = ("classifier", "nearest_centroid")


def _cosine_counts(*, num_steps: int, num_cells: int) -> np.ndarray:
  """MaskGIT's cosine schedule, int32 [K]: masked cells after each pass."""
  counts, left = [], num_cells
  for t in range(num_steps):
    target = math.floor(num_cells * math.cos(math.pi / 2 * (t + 1) / num_steps))
    left = 0 if t == num_steps - 1 else max(1, min(left - 1, target))
    counts.append(left)
  return np.asarray(counts, np.int32)


def masked_count(step: Array, *, num_steps: int, num_cells: int, schedule: str = "linear") -> Array:
  """Cells still masked after pass ``step`` (0-based) of the ``schedule`` (module docstring)."""
  if schedule == "linear":
    return (num_cells * (num_steps - 1 - step)) // num_steps
  if schedule == "cosine":
    return jnp.asarray(_cosine_counts(num_steps=num_steps, num_cells=num_cells))[step]
  raise ValueError(f"unknown masking schedule {schedule!r}: expected one of {SCHEDULES}")


def _ranks(priority: Array) -> Array:
  """Rank of each cell by ``priority`` [B, M] (0 = lowest; ties broken by position)."""
  return jnp.argsort(jnp.argsort(priority, axis=-1, stable=True), axis=-1, stable=True)


def parallel_decode(params, rng: Array, *, model, text_ids: Array, text_mask: Array, boxes: Array,
                    codebook: Array, num_steps: int = 4, order: str = "mask_predict",
                    temperature: float = 0.0, schedule: str = "linear", choice_temperature: float = 0.0,
                    guidance: float = 0.0, null_text_ids: Array | None = None,
                    null_text_mask: Array | None = None, readout: str = "classifier") -> tuple[Array, Array]:
  """Cluster ids int32 [B, M] for captions ``text_ids``/``text_mask`` [B, L], and their probabilities [B, M].

  boxes [B, M, 4] (the grid); codebook [K, D] turns decided ids into the model's visual input. ``schedule``:
  "linear" or "cosine"; ``choice_temperature``: the Gumbel noise of the "maskgit" order (ignored by the
  others); ``guidance`` w: classifier-free guidance against ``null_text_ids``/``null_text_mask`` [B, L]
  (``tasks.layouts.null_captions``), needed only when w != 0. ``readout``: "classifier" or "nearest_centroid"
  (module docstring). Probabilities are those of the (guided) model. Pure and jittable: (params, text, rng) -> ids.
  All ``num_steps`` passes of ``decode_passes``.
  """
  ids, _, confidence = decode_passes(
      params, rng, passes=num_steps, model=model, text_ids=text_ids, text_mask=text_mask, boxes=boxes,
      codebook=codebook, num_steps=num_steps, order=order, temperature=temperature, schedule=schedule,
      choice_temperature=choice_temperature, guidance=guidance, null_text_ids=null_text_ids,
      null_text_mask=null_text_mask, readout=readout)
  return ids, confidence


def decode_passes(params, rng: Array, *, passes: int, model, text_ids: Array, text_mask: Array, boxes: Array,
                  codebook: Array, num_steps: int = 4, order: str = "mask_predict", temperature: float = 0.0,
                  schedule: str = "linear", choice_temperature: float = 0.0, guidance: float = 0.0,
                  null_text_ids: Array | None = None,
                  null_text_mask: Array | None = None, readout: str = "classifier") -> tuple[Array, Array, Array]:
  """The decoder's state after the first ``passes`` of its ``num_steps`` passes (``parallel_decode``'s
  arguments): ids int32 [B, M] (0 where never decided), masked bool [B, M] (the cells the next pass
  predicts; none after the last pass) and their probabilities float32 [B, M].

  Why: stage 2's CLIP loss (``tasks.clip_loss``) runs the first passes without gradient and the last one
  itself, differentiably, from this state.
  """
  if not 1 <= passes <= num_steps:
    raise ValueError(f"decode_passes: passes={passes} is not in [1, num_steps={num_steps}]")
  if order not in ORDERS:
    raise ValueError(f"unknown decoding order {order!r}: expected one of {ORDERS}")
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown masking schedule {schedule!r}: expected one of {SCHEDULES}")
  if readout not in READOUTS:
    raise ValueError(f"unknown readout {readout!r}: expected one of {READOUTS}")
  if guidance and (null_text_ids is None or null_text_mask is None):
    raise ValueError("guidance needs the unconditional caption: pass null_text_ids and null_text_mask "
                     "(tasks.layouts.null_captions)")
  batch, num_cells = boxes.shape[:2]
  order_rng, sample_rng = jax.random.split(rng)
  raster = jnp.broadcast_to(-jnp.arange(num_cells, dtype=jnp.float32), (batch, num_cells))
  fixed_priority = {"left_to_right": raster,
                    "random": jax.random.uniform(order_rng, (batch, num_cells))}.get(order)

  def step(carry, t):
    ids, masked, confidence = carry
    logits = pass_logits(params, ids, masked, model=model, text_ids=text_ids, text_mask=text_mask, boxes=boxes,
                         codebook=codebook, guidance=guidance, null_text_ids=null_text_ids,
                         null_text_mask=null_text_mask, readout=readout)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if temperature > 0:
      guess = jax.random.categorical(jax.random.fold_in(sample_rng, t), log_probs / temperature, axis=-1)
    else:
      guess = jnp.argmax(log_probs, axis=-1)
    guess_log_prob = jnp.take_along_axis(log_probs, guess[..., None], axis=-1)[..., 0]
    ids = jnp.where(masked, guess.astype(jnp.int32), ids)
    confidence = jnp.where(masked, jnp.exp(guess_log_prob), confidence)
    if order == "mask_predict":
      priority = confidence
    elif order == "easy_first":
      priority = jnp.where(masked, confidence, jnp.inf)
    elif order == "maskgit":
      noise = jax.random.gumbel(jax.random.fold_in(order_rng, t), (batch, num_cells))
      anneal = choice_temperature * (1 - (t + 1) / num_steps)
      priority = jnp.where(masked, guess_log_prob + anneal * noise, jnp.inf)
    else:
      priority = jnp.where(masked, fixed_priority, jnp.inf)
    masked = _ranks(priority) < masked_count(t, num_steps=num_steps, num_cells=num_cells, schedule=schedule)
    return (ids, masked, confidence), None

  start = (jnp.zeros((batch, num_cells), jnp.int32), jnp.ones((batch, num_cells), bool),
           jnp.zeros((batch, num_cells), jnp.float32))
  (ids, masked, confidence), _ = jax.lax.scan(step, start, jnp.arange(passes))
  return ids, masked, confidence


def nearest_centroid_logits(feats: Array, codebook: Array) -> Array:
  """feats [..., D], codebook [K, D] -> float32 [..., K]: -||feats - codebook[k]||^2 (the largest is the nearest
  centroid)."""
  feats, codebook = feats.astype(jnp.float32), jnp.asarray(codebook, jnp.float32)
  return (2.0 * jnp.einsum("...d,kd->...k", feats, codebook) - jnp.sum(jnp.square(codebook), -1)
          - jnp.sum(jnp.square(feats), -1, keepdims=True))


def pass_logits(params, ids: Array, masked: Array, *, model, text_ids: Array, text_mask: Array, boxes: Array,
                codebook: Array, guidance: float = 0.0, null_text_ids: Array | None = None,
                null_text_mask: Array | None = None, readout: str = "classifier") -> Array:
  """float32 [B, M, K]: one pass's image logits for the grid ``ids`` [B, M] with the cells ``masked`` [B, M] fed
  the mask feature, read by the ``readout`` (module docstring); with ``guidance`` w, (1 + w) * cond - w * uncond
  against the null captions. Differentiable in ``params`` (stage 2's CLIP loss runs the last pass through it with
  gradients)."""
  def head(module, out):
    if readout == "classifier":
      return module.predict_image(out.vision)
    if readout != "nearest_centroid":
      raise ValueError(f"unknown readout {readout!r}: expected one of {READOUTS}")
    _, feats = module.image_head(out.vision, with_features=True)
    if feats.shape[-1] != codebook.shape[-1]:
      raise ValueError(f"the nearest-centroid readout needs the image head's feature as wide as the codebook "
                       f"({codebook.shape[-1]}), got {feats.shape[-1]}: a model with --config.model.image_head_dim=0")
    return nearest_centroid_logits(feats, codebook)

  def logits(caption_ids, caption_mask):
    return apply.apply_model(model, params, task="t2i", rng=None, head=head,
                             text_ids=caption_ids, text_mask=caption_mask, boxes=boxes, cluster_ids=ids,
                             codebook=codebook, visual_mask=masked).astype(jnp.float32)

  cond = logits(text_ids, text_mask)
  if not guidance:
    return cond
  return (1 + guidance) * cond - guidance * logits(null_text_ids, null_text_mask)


def cluster_features(ids: Array, codebook: Array) -> Array:
  """ids [B, M] -> centroid features [B, M, D]: the image generator's input."""
  return jnp.take(jnp.asarray(codebook), ids, axis=0)
