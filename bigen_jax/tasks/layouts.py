"""Input layouts of the two tasks, as pure (jittable) functions.

I2T (image -> text, one word at a time): caption ``[CLS] w1 .. wn [SEP] [PAD]..``; at a position l the word
is replaced by [MASK], words after l are hidden (set to [PAD] and invisible to every query), the prefix and
the [MASK] attend to each other bidirectionally. The target is the original token at l.

I2T's causal layout (``tasks.i2t.layout = "causal"``, not the paper's): the whole caption in one pass, word j
sees words <= j, the visual cells see [CLS] only, and the hidden state at j predicts word j + 1: every word of
every caption is a target in each step (the paper's layout trains one word per caption per step), at the cost
of a prefix that reads left to right and an image encoding that does not depend on the words.

MLM (X-LXMERT's masked language modelling): BERT's masking of the caption's words (``mlm_inputs``); the caption
attends bidirectionally, the image is whole.

T2I (text -> image): a set of the 64 grid cells is masked (fed the learned mask feature) and their cluster
ids are predicted; masked cells stay visible as keys, like BERT's [MASK] tokens. The null caption
``[CLS] [SEP]`` stands for "no caption": T2I training drops captions to it (``caption_dropout``) and
classifier-free guidance decodes against it.
"""

import flax.struct
import jax
import jax.numpy as jnp

from bigen_jax.models import apply

Array = jax.Array


@flax.struct.dataclass
class I2TInputs:
  """text_ids [B, L] (with [MASK] at l, [PAD] after); text_mask [B, L] int32 (the key mask of every query:
  real tokens at positions <= l); targets [B] (token at l); positions [B]."""
  text_ids: Array
  text_mask: Array
  targets: Array
  positions: Array


def i2t_inputs(*, text_ids: Array, positions: Array, mask_id: int, pad_id: int,
               text_mask: Array | None = None) -> I2TInputs:
  """The I2T layout for predicting the token at ``positions`` [B] of ``text_ids`` [B, L].

  text_mask [B, L] marks real tokens (default: ``text_ids != pad_id``).
  """
  text_ids = jnp.asarray(text_ids)
  positions = jnp.asarray(positions, jnp.int32)
  real = (text_ids != pad_id) if text_mask is None else jnp.asarray(text_mask).astype(bool)
  index = jnp.arange(text_ids.shape[1])[None, :]
  l = positions[:, None]
  visible = real & (index <= l)
  ids = jnp.where(index == l, mask_id, jnp.where(index < l, text_ids, pad_id)).astype(text_ids.dtype)
  targets = jnp.take_along_axis(text_ids, l, axis=1)[:, 0]
  return I2TInputs(text_ids=ids, text_mask=visible.astype(jnp.int32), targets=targets, positions=positions)


@flax.struct.dataclass
class I2TCausalInputs:
  """text_attention bool [B, L, L] (word i sees word j <= i, both real); vision_text_mask int32 [B, L] ([CLS]
  only); targets [B, L] (the next word; [PAD] at the end); weights float32 [B, L] (1 where a next word exists)."""
  text_attention: Array
  vision_text_mask: Array
  targets: Array
  weights: Array


def i2t_causal_inputs(*, text_ids: Array, text_mask: Array, pad_id: int) -> I2TCausalInputs:
  """The causal I2T layout of captions ``text_ids`` [B, L] with real tokens ``text_mask`` [B, L]."""
  text_ids = jnp.asarray(text_ids)
  real = jnp.asarray(text_mask).astype(bool)
  targets = jnp.concatenate([text_ids[:, 1:], jnp.full_like(text_ids[:, :1], pad_id)], axis=1)
  weights = jnp.concatenate([real[:, 1:], jnp.zeros_like(real[:, :1])], axis=1).astype(jnp.float32)
  return I2TCausalInputs(text_attention=apply.causal_attention(real),
                         vision_text_mask=apply.cls_only(text_ids.shape), targets=targets, weights=weights)


def sample_i2t_positions(rng: Array, *, text_mask: Array) -> Array:
  """A uniform position l in 1..n-1 per caption (words and [SEP]; never [CLS]), n = real tokens.

  text_mask [B, L] -> int32 [B]; a caption with fewer than 2 tokens gets 1.
  """
  n = jnp.asarray(text_mask).astype(jnp.int32).sum(axis=1)
  high = jnp.maximum(n, 2)
  return jax.random.randint(rng, n.shape, 1, high).astype(jnp.int32)


@flax.struct.dataclass
class MLMInputs:
  """text_ids [B, L]: the caption with its chosen words replaced; targets [B, L]: the original ids; chosen bool
  [B, L]: the positions scored."""
  text_ids: Array
  targets: Array
  chosen: Array


def mlm_inputs(rng: Array, *, text_ids: Array, text_mask: Array, rate: float, mask_id: int, vocab_size: int,
               special_ids: tuple[int, ...]) -> MLMInputs:
  """BERT's masking of captions ``text_ids`` [B, L] with real tokens ``text_mask`` [B, L].

  Each word (a real token not in ``special_ids``: never [CLS], [SEP] or [PAD]) is chosen with probability
  ``rate``, and a caption's word of least noise is chosen in any case (at least one per caption that has a word).
  A chosen word becomes [MASK] (80%), a random word (10%: uniform over the ids < ``vocab_size`` outside
  ``special_ids`` and [MASK]) or stays (10%).
  """
  text_ids = jnp.asarray(text_ids)
  choose_rng, how_rng, word_rng = jax.random.split(rng, 3)
  specials = sorted({int(i) for i in (*special_ids, mask_id) if 0 <= int(i) < vocab_size})
  word = jnp.asarray(text_mask).astype(bool) & ~jnp.isin(text_ids, jnp.asarray(specials, text_ids.dtype))
  noise = jnp.where(word, jax.random.uniform(choose_rng, text_ids.shape), 2.0)
  chosen = word & ((noise < rate) | (noise == noise.min(axis=1, keepdims=True)))
  how = jax.random.uniform(how_rng, text_ids.shape)
  random_word = jax.random.randint(word_rng, text_ids.shape, 0, vocab_size - len(specials))
  for special in specials:  # the r-th id outside ``specials``, in increasing order
    random_word = random_word + (random_word >= special)
  replaced = jnp.where(how < 0.8, mask_id, jnp.where(how < 0.9, random_word, text_ids)).astype(text_ids.dtype)
  return MLMInputs(text_ids=jnp.where(chosen, replaced, text_ids), targets=text_ids, chosen=chosen)


def random_cells_mask(rng: Array, *, num_masked: Array | int, batch_size: int, num_cells: int = 64) -> Array:
  """bool [B, num_cells] with exactly ``num_masked`` (scalar or [B]) random True cells per row."""
  noise = jax.random.uniform(rng, (batch_size, num_cells))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return rank < jnp.broadcast_to(jnp.asarray(num_masked, jnp.int32), (batch_size,))[:, None]


def t2i_mask(rng: Array, *, batch_size: int, num_cells: int = 64, schedule: str = "count",
             min_masked: int = 6, max_masked: int = 64) -> Array:
  """Cells to mask for T2I training, bool [B, num_cells].

  schedule "count" (the paper's code): one count ~ U{min_masked..max_masked} for the whole batch;
  "uniform" (X-LXMERT's uniform masking, CCC; "ratio" is its older name): a ratio r ~ U(0, 1] per example,
  ceil(r * num_cells) cells, at least one; "cosine" (MaskGIT): r = cos(pi/2 * u), u ~ U[0, 1) per example, which
  favours nearly full masks: the state every decoding starts from, where only the caption tells what to draw.
  """
  count_rng, cells_rng = jax.random.split(rng)
  if schedule == "count":
    num = jax.random.randint(count_rng, (), min_masked, min(max_masked, num_cells) + 1)
  elif schedule in ("uniform", "ratio", "cosine"):
    u = jax.random.uniform(count_rng, (batch_size,))
    ratio = jnp.cos(0.5 * jnp.pi * u) if schedule == "cosine" else 1.0 - u
    num = jnp.clip(jnp.ceil(ratio * num_cells), 1, num_cells).astype(jnp.int32)
  else:
    raise ValueError(f"unknown T2I mask schedule {schedule!r} (tasks.<t2i|ccc>.mask_schedule): expected 'count', "
                     "'uniform' ('ratio') or 'cosine'")
  return random_cells_mask(cells_rng, num_masked=num, batch_size=batch_size, num_cells=num_cells)


def null_captions(text_ids: Array, *, cls_id: int, sep_id: int, pad_id: int) -> tuple[Array, Array]:
  """The null caption ``[CLS] [SEP] [PAD]..`` in the shape of ``text_ids`` [B, L]: (ids like text_ids,
  text_mask int32 [B, L] = 1, 1, 0, ..)."""
  text_ids = jnp.asarray(text_ids)
  index = jnp.broadcast_to(jnp.arange(text_ids.shape[1]), text_ids.shape)
  ids = jnp.where(index == 0, cls_id, jnp.where(index == 1, sep_id, pad_id)).astype(text_ids.dtype)
  return ids, (index < 2).astype(jnp.int32)
