"""Text-to-image decoding of the 8x8 grid of cluster ids as one compiled loop (METHOD.md §5).

``parallel_decode`` starts from a fully masked grid and runs ``num_steps`` model passes. Each pass predicts
every masked cell (argmax, or a sample at ``temperature``) and then chooses which cells stay masked for the
next pass: the linear schedule leaves floor(M * (K - 1 - t) / K) masked after pass t (64 -> 48 -> 32 -> 16
-> 0 for K = 4). The ``order`` says which:

  mask_predict   the least confident cells of the whole grid (Ghazvininejad et al.; X-LXMERT's default):
                 a cell decided earlier is re-masked when its probability is among the lowest.
  easy_first     the least confident of the still-masked cells: decided cells are final.
  left_to_right  raster order (top-left to bottom-right): the last cells stay masked.
  random         a random order per image, drawn once from ``rng``.

With K = M every order decides one cell per pass, X-LXMERT's sequential baselines.
"""

import jax
import jax.numpy as jnp

from bigen_jax.tasks import common

Array = jax.Array
ORDERS = ("mask_predict", "easy_first", "left_to_right", "random")


def masked_count(step: Array, *, num_steps: int, num_cells: int) -> Array:
  """Cells still masked after pass ``step`` (0-based) of the linear schedule."""
  return (num_cells * (num_steps - 1 - step)) // num_steps


def _ranks(priority: Array) -> Array:
  """Rank of each cell by ``priority`` [B, M] (0 = lowest; ties broken by position)."""
  return jnp.argsort(jnp.argsort(priority, axis=-1, stable=True), axis=-1, stable=True)


def parallel_decode(params, rng: Array, *, model, text_ids: Array, text_mask: Array, boxes: Array,
                    codebook: Array, num_steps: int = 4, order: str = "mask_predict",
                    temperature: float = 0.0) -> tuple[Array, Array]:
  """Cluster ids int32 [B, M] for captions ``text_ids``/``text_mask`` [B, L], and their probabilities [B, M].

  boxes [B, M, 4] (the grid); codebook [K, D] turns decided ids into the model's visual input. Pure and
  jittable: (params, text, rng) -> ids.
  """
  if order not in ORDERS:
    raise ValueError(f"unknown decoding order {order!r}: expected one of {ORDERS}")
  batch, num_cells = boxes.shape[:2]
  order_rng, sample_rng = jax.random.split(rng)
  raster = jnp.broadcast_to(-jnp.arange(num_cells, dtype=jnp.float32), (batch, num_cells))
  fixed_priority = {"left_to_right": raster,
                    "random": jax.random.uniform(order_rng, (batch, num_cells))}.get(order)

  def step(carry, t):
    ids, masked, confidence = carry
    logits = common.apply_model(model, params, task="t2i", rng=None,
                                head=lambda module, out: module.predict_image(out.vision),
                                text_ids=text_ids, text_mask=text_mask, boxes=boxes, cluster_ids=ids,
                                codebook=codebook, visual_mask=masked).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if temperature > 0:
      guess = jax.random.categorical(jax.random.fold_in(sample_rng, t), log_probs / temperature, axis=-1)
    else:
      guess = jnp.argmax(log_probs, axis=-1)
    guess_prob = jnp.exp(jnp.take_along_axis(log_probs, guess[..., None], axis=-1)[..., 0])
    ids = jnp.where(masked, guess.astype(jnp.int32), ids)
    confidence = jnp.where(masked, guess_prob, confidence)
    if order == "mask_predict":
      priority = confidence
    elif order == "easy_first":
      priority = jnp.where(masked, confidence, jnp.inf)
    else:
      priority = jnp.where(masked, fixed_priority, jnp.inf)
    masked = _ranks(priority) < masked_count(t, num_steps=num_steps, num_cells=num_cells)
    return (ids, masked, confidence), None

  start = (jnp.zeros((batch, num_cells), jnp.int32), jnp.ones((batch, num_cells), bool),
           jnp.zeros((batch, num_cells), jnp.float32))
  (ids, _, confidence), _ = jax.lax.scan(step, start, jnp.arange(num_steps))
  return ids, confidence


def cluster_features(ids: Array, codebook: Array) -> Array:
  """ids [B, M] -> centroid features [B, M, D]: the image generator's input."""
  return jnp.take(jnp.asarray(codebook), ids, axis=0)
