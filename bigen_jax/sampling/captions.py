"""Image-to-text decoding as compiled loops (METHOD.md §5): greedy, in the paper's layout.

Step l (1..L-1) puts one [MASK] at l after the words decoded so far, hides every later position, runs the
model and takes the text head's most likely word at l. A bidirectional prefix changes every hidden state at
each step, so there is no key/value cache: each step is a full forward pass. Captions stop at [SEP];
positions after it are [PAD].
"""

from typing import Any

import jax
import jax.numpy as jnp

from bigen_jax.tasks import common

Array = jax.Array


def greedy_captions(params: Any, *, model, visual: dict[str, Array], boxes: Array, max_len: int, cls_id: int,
                    sep_id: int, mask_id: int, pad_id: int, banned_ids: tuple[int, ...] = ()) -> Array:
  """Greedy captions int32 [B, max_len] (``[CLS] w1 .. [SEP] [PAD]..``) for a batch of images.

  visual: the model's visual input (``{"visual_feats": [B, M, D]}`` or cluster ids with the codebook);
  boxes [B, M, 4]. ``banned_ids`` (and [CLS]/[MASK]/[PAD]) are never produced.
  """
  batch = boxes.shape[0]
  ids = jnp.full((batch, max_len), pad_id, jnp.int32).at[:, 0].set(cls_id)
  positions = jnp.arange(max_len)[None, :]
  never = jnp.asarray((cls_id, mask_id, pad_id) + tuple(banned_ids), jnp.int32)

  def step(carry, l):
    ids, done = carry
    inputs = jnp.where(positions == l, mask_id, ids)
    key_mask = (positions <= l).astype(jnp.int32) * jnp.ones((batch, 1), jnp.int32)

    def head(module, out):
      return module.predict_text(jax.lax.dynamic_index_in_dim(out.language, l, axis=1, keepdims=False))

    logits = common.apply_model(model, params, task="i2t", rng=None, head=head, text_ids=inputs,
                                text_mask=key_mask, boxes=boxes, **visual)
    logits = logits.at[:, never].set(-jnp.inf)
    last = jnp.where(jnp.arange(logits.shape[-1]) == sep_id, 0.0, -jnp.inf)
    logits = jnp.where(l == max_len - 1, last, logits)  # the last position can only end the caption
    word = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    ids = jax.lax.dynamic_update_index_in_dim(ids, word, l, axis=1)
    return (ids, done | (word == sep_id)), None

  (ids, _), _ = jax.lax.scan(step, (ids, jnp.zeros((batch,), bool)), jnp.arange(1, max_len))
  return ids
