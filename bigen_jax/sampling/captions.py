"""Image-to-text decoding as compiled loops (METHOD.md §5): greedy, beam search and sampling, and X-LXMERT's
Gibbs sampling (``gibbs_captions``: a fixed-length all-[MASK] caption whose words are redrawn in sweeps).

Step l (1..L-1) puts one [MASK] at l after the words decoded so far, hides every later position, runs the
model and reads the text head at l (``layout="mask"``, the paper's; ``"causal"``: the words so far read left
to right, the cells see [CLS] only, and the head reads position l - 1, as ``tasks.i2t.layout`` trained it).
A bidirectional prefix changes every hidden state at each step, so there is no key/value cache: each step runs the
language and cross-modality layers. The vision stream (visual embedding + vision layers) depends on the image
alone: every decoder computes it once (``encode_vision``) before its loop. Captions stop at [SEP]; positions after
it are [PAD]. Every decoder is one ``lax.scan`` over positions, so it compiles once for any batch.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bigen_jax.models import apply

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Tokens:
  """The special token ids decoding needs; ``banned`` words (and [CLS]/[MASK]/[PAD]) are never produced."""
  cls_id: int
  sep_id: int
  mask_id: int
  pad_id: int
  banned: tuple[int, ...] = ()

  @classmethod
  def from_tokenizer(cls, tokenizer, banned: tuple[int, ...] = ()) -> "Tokens":
    return cls(cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, mask_id=tokenizer.mask_id,
               pad_id=tokenizer.pad_id, banned=banned)


def _start(batch: int, max_len: int, tokens: Tokens) -> Array:
  return jnp.full((batch, max_len), tokens.pad_id, jnp.int32).at[:, 0].set(tokens.cls_id)


def encode_vision(params: Any, *, model, visual: dict[str, Array], boxes: Array) -> Array | None:
  """The images' vision stream [B, M, H] (``apply.encode_vision``, no dropout), for ``next_word_log_probs``'s
  ``vision``: computed once per decode instead of once per step. None for a model whose cells read the caption
  (``caption_to_cells``): its steps then run the whole model."""
  if not apply.can_encode_vision(model):
    return None
  return apply.encode_vision(model, params, task="i2t", boxes=boxes, **visual)


def _image_inputs(visual: dict[str, Array], boxes: Array, vision: Array | None) -> dict[str, Array]:
  """The model's image keyword arguments: the precomputed vision stream, else the visual input and boxes."""
  return {"boxes": boxes, **visual} if vision is None else {"vision_encoder": vision}


def next_word_log_probs(params: Any, ids: Array, l: Array, *, model, visual: dict[str, Array], boxes: Array,
                        tokens: Tokens, layout: str = "mask", vision: Array | None = None) -> Array:
  """Log-probabilities [B, V] of the word at position ``l`` given ``ids`` [B, L] before it, in the I2T
  ``layout`` the model was trained with ("mask" or "causal").

  vision [B, M, H]: ``encode_vision`` of these images, to skip the vision layers (``visual`` and ``boxes`` are
  then not read); None runs the whole model. Never-produced words get -inf; at the last position only [SEP] is
  allowed, so every caption ends.
  """
  max_len = ids.shape[1]
  positions = jnp.arange(max_len)[None, :]
  if layout == "mask":
    read, inputs, extra = l, jnp.where(positions == l, tokens.mask_id, ids), {}
    key_mask = jnp.broadcast_to((positions <= l).astype(jnp.int32), ids.shape)
  elif layout == "causal":
    read, inputs = l - 1, ids
    key_mask = jnp.broadcast_to((positions < l).astype(jnp.int32), ids.shape)
    extra = {"text_attention": apply.causal_attention(key_mask.astype(bool)),
             "vision_text_mask": apply.cls_only(ids.shape)}
  else:
    raise ValueError(f"I2T layout {layout!r}: expected 'mask' or 'causal'")

  def head(module, out):
    return module.predict_text(jax.lax.dynamic_index_in_dim(out.language, read, axis=1, keepdims=False))

  logits = apply.apply_model(model, params, task="i2t", rng=None, head=head, text_ids=inputs,
                             text_mask=key_mask, **extra, **_image_inputs(visual, boxes, vision))
  return word_log_probs(logits, l == max_len - 1, tokens)


def word_log_probs(logits: Array, last: Array, tokens: Tokens) -> Array:
  """The decoders' word distribution: log-softmax of ``logits`` [..., V] (float32) with the never-produced words
  at -inf and only [SEP] allowed where ``last`` (bool, broadcast against logits[..., 0]: the caption's last
  position)."""
  logits = logits.astype(jnp.float32)
  never = jnp.asarray((tokens.cls_id, tokens.mask_id, tokens.pad_id) + tuple(tokens.banned), jnp.int32)
  logits = logits.at[..., never].set(-jnp.inf)
  only_sep = jnp.where(jnp.arange(logits.shape[-1]) == tokens.sep_id, 0.0, -jnp.inf)
  logits = jnp.where(jnp.asarray(last)[..., None], only_sep, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def _decode_one_by_one(params, *, model, visual, boxes, max_len: int, tokens: Tokens, choose,
                       layout: str = "mask") -> Array:
  """Shared loop of greedy and sampling: ``choose(log_probs [B, V], l) -> word [B]``."""
  batch = boxes.shape[0]
  vision = encode_vision(params, model=model, visual=visual, boxes=boxes)

  def step(carry, l):
    ids, done = carry
    log_probs = next_word_log_probs(params, ids, l, model=model, visual=visual, boxes=boxes, tokens=tokens,
                                    layout=layout, vision=vision)
    word = jnp.where(done, tokens.pad_id, choose(log_probs, l).astype(jnp.int32))
    ids = jax.lax.dynamic_update_index_in_dim(ids, word, l, axis=1)
    return (ids, done | (word == tokens.sep_id)), None

  start = (_start(batch, max_len, tokens), jnp.zeros((batch,), bool))
  (ids, _), _ = jax.lax.scan(step, start, jnp.arange(1, max_len))
  return ids


def greedy_captions(params: Any, *, model, visual: dict[str, Array], boxes: Array, max_len: int,
                    tokens: Tokens, layout: str = "mask") -> Array:
  """Greedy captions int32 [B, max_len] (``[CLS] w1 .. [SEP] [PAD]..``) for a batch of images.

  visual: the model's visual input (``{"visual_feats": [B, M, D]}`` or cluster ids with the codebook);
  boxes [B, M, 4].
  """
  return _decode_one_by_one(params, model=model, visual=visual, boxes=boxes, max_len=max_len, tokens=tokens,
                            choose=lambda log_probs, l: jnp.argmax(log_probs, axis=-1), layout=layout)


def filter_logits(log_probs: Array, *, temperature: float | Array = 1.0, top_k: int = 0,
                  top_p: float | Array = 1.0) -> Array:
  """The sampling distribution: log-probabilities [B, V] of ``softmax(log_probs / temperature)`` restricted to
  its ``top_k`` most likely words (0: all; ties with the k-th kept), then to the nucleus, and renormalised;
  the other words get -inf.

  The nucleus is the smallest set of most likely words whose probability under the tempered, top-k-renormalised
  distribution reaches ``top_p`` (a word is kept when the mass of the words more likely than it is below
  ``top_p``; the most likely word is always kept). log_probs [B, V]: any logits or log-probabilities (-inf for
  never-produced words); temperature > 0 and top_p may be traced values, top_k must be static. Jittable.
  """
  log_probs = jax.nn.log_softmax(log_probs / temperature, axis=-1)
  if top_k:
    kth = jax.lax.top_k(log_probs, top_k)[0][:, -1:]
    log_probs = jax.nn.log_softmax(jnp.where(log_probs < kth, -jnp.inf, log_probs), axis=-1)
  if isinstance(top_p, (int, float)) and top_p >= 1.0:
    return log_probs
  order = jnp.argsort(-log_probs, axis=-1)
  sorted_probs = jnp.exp(jnp.take_along_axis(log_probs, order, axis=-1))
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the more likely words
  keep_sorted = (before < top_p) | (jnp.arange(log_probs.shape[-1]) == 0) | (top_p >= 1.0)
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(log_probs.shape[0])[:, None], order].set(keep_sorted)
  return jax.nn.log_softmax(jnp.where(keep, log_probs, -jnp.inf), axis=-1)


def sample_captions(params: Any, rng: Array, *, model, visual: dict[str, Array], boxes: Array, max_len: int,
                    tokens: Tokens, temperature: float | Array = 1.0, top_k: int = 0,
                    top_p: float | Array = 1.0, layout: str = "mask") -> Array:
  """Sampled captions int32 [B, max_len] (SCST's sampler): each word drawn from ``filter_logits`` of the text
  head's log-probabilities (tempered by ``temperature``, then top-k, then nucleus ``top_p``); the word at
  position l uses ``fold_in(rng, l)``."""

  def choose(log_probs, l):
    filtered = filter_logits(log_probs, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(rng, l), filtered, axis=-1)

  return _decode_one_by_one(params, model=model, visual=visual, boxes=boxes, max_len=max_len, tokens=tokens,
                            choose=choose, layout=layout)


def beam_search_captions(params: Any, *, model, visual: dict[str, Array], boxes: Array, max_len: int,
                         tokens: Tokens, beam_size: int, length_penalty: float = 0.0, layout: str = "mask"
                         ) -> tuple[Array, Array]:
  """Beam search: (captions int32 [B, W, max_len] best first, scores [B, W]).

  A beam's score is its summed log-probability divided by ``num_words ** length_penalty`` (0: no
  normalisation, which makes beam size 1 exactly greedy). Finished beams carry their score unchanged.
  Each step runs the language and cross-modality layers on all B*W beams; the vision stream is computed once per
  image.
  """
  batch, width = boxes.shape[0], beam_size
  tile = lambda x: jnp.repeat(x, width, axis=0)  # [B, ...] -> [B*W, ...], beams of one image adjacent
  beam_visual = {k: v if k == "codebook" else tile(v) for k, v in visual.items()}
  beam_boxes = tile(boxes)
  vision = encode_vision(params, model=model, visual=visual, boxes=boxes)
  beam_vision = None if vision is None else tile(vision)
  ids = _start(batch * width, max_len, tokens).reshape(batch, width, max_len)
  scores = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))  # one live beam at first
  done = jnp.zeros((batch, width), bool)

  def step(carry, l):
    ids, scores, done = carry
    log_probs = next_word_log_probs(params, ids.reshape(batch * width, max_len), l, model=model,
                                    visual=beam_visual, boxes=beam_boxes, tokens=tokens, layout=layout,
                                    vision=beam_vision)
    vocab = log_probs.shape[-1]
    log_probs = log_probs.reshape(batch, width, vocab)
    pad_only = jnp.where(jnp.arange(vocab) == tokens.pad_id, 0.0, -jnp.inf)
    log_probs = jnp.where(done[..., None], pad_only, log_probs)  # a finished beam continues once, with [PAD]
    candidates = (scores[..., None] + log_probs).reshape(batch, width * vocab)
    scores, flat = jax.lax.top_k(candidates, width)
    parent, word = flat // vocab, (flat % vocab).astype(jnp.int32)
    ids = jnp.take_along_axis(ids, parent[..., None], axis=1)
    ids = jax.lax.dynamic_update_index_in_dim(ids, word[..., None], l, axis=2)
    done = jnp.take_along_axis(done, parent, axis=1) | (word == tokens.sep_id)
    return (ids, scores, done), None

  (ids, scores, _), _ = jax.lax.scan(step, (ids, scores, done), jnp.arange(1, max_len))
  if length_penalty:
    words = ((ids != tokens.pad_id) & (ids != tokens.cls_id)).sum(-1)
    scores = scores / words.astype(jnp.float32) ** length_penalty
    order = jnp.argsort(-scores, axis=-1)
    ids = jnp.take_along_axis(ids, order[..., None], axis=1)
    scores = jnp.take_along_axis(scores, order, axis=1)
  return ids, scores


GIBBS_ORDERS = ("left_to_right", "random")


def gibbs_visits(rng: Array, *, batch: int, length: int, num_sweeps: int, order: str) -> Array:
  """The positions Gibbs sampling resamples, int32 [B, num_sweeps * length]: each sweep visits 1..length once,
  in order ("left_to_right") or in a random permutation per image and sweep ("random")."""
  if order == "left_to_right":
    sweep = jnp.arange(1, length + 1, dtype=jnp.int32)
    return jnp.broadcast_to(jnp.tile(sweep, num_sweeps), (batch, num_sweeps * length))
  if order == "random":
    perm = jnp.argsort(jax.random.uniform(rng, (batch, num_sweeps, length)), axis=-1).astype(jnp.int32)
    return perm.reshape(batch, num_sweeps * length) + 1
  raise ValueError(f"Gibbs order {order!r} (eval.captioning.gibbs_order): expected one of {GIBBS_ORDERS}")


def gibbs_start(batch: int, *, max_len: int, length: int, tokens: Tokens) -> tuple[Array, Array]:
  """The all-[MASK] caption ``[CLS] [MASK] x length [SEP] [PAD]..``: (ids int32 [B, max_len], text_mask int32
  [B, max_len])."""
  positions = jnp.arange(max_len)
  ids = jnp.where(positions == 0, tokens.cls_id, jnp.where(positions <= length, tokens.mask_id, jnp.where(
      positions == length + 1, tokens.sep_id, tokens.pad_id)))
  return (jnp.broadcast_to(ids, (batch, max_len)).astype(jnp.int32),
          jnp.broadcast_to(positions <= length + 1, (batch, max_len)).astype(jnp.int32))


def end_at_sep(ids: Array, tokens: Tokens) -> Array:
  """``ids`` [B, L] with every position after the first [SEP] set to [PAD]."""
  sep = ids == tokens.sep_id
  return jnp.where(jnp.cumsum(sep, axis=1) - sep > 0, tokens.pad_id, ids).astype(ids.dtype)


def gibbs_captions(params: Any, rng: Array, *, model, visual: dict[str, Array], boxes: Array, max_len: int,
                   tokens: Tokens, num_sweeps: int = 4, length: int = -1, order: str = "left_to_right",
                   temperature: float = 0.0) -> Array:
  """X-LXMERT's captioning by Gibbs sampling (Wang & Cho, 2019): captions int32 [B, max_len], ``[CLS] w1 ..
  [SEP] [PAD]..``.

  Starts from ``gibbs_start`` (``length`` word slots; -1: max_len - 2) and, for ``num_sweeps`` sweeps of
  ``gibbs_visits(order)``, puts [MASK] at the visited position, runs the model on the image and the whole caption
  (bidirectional: the MLM layout, ``tasks.mlm``) and redraws that word from the text head: argmax at
  ``temperature`` 0, else drawn from ``filter_logits`` at that temperature (step t uses ``fold_in(rng, t)``).
  [CLS], [MASK], [PAD] and ``tokens.banned`` are never drawn. The caption ends at its first [SEP]. One
  ``lax.fori_loop`` of num_sweeps x length forward passes of the language and cross-modality layers (the vision
  stream computed once, ``encode_vision``); visual and boxes as ``greedy_captions``.
  """
  length = max_len - 2 if length == -1 else length
  if not 1 <= length <= max_len - 2:
    raise ValueError(f"Gibbs caption length {length} (eval.captioning.gibbs_length): expected 1..{max_len - 2} "
                     "(the model's max_len - 2), or -1 for that")
  batch = boxes.shape[0]
  order_rng, sample_rng = jax.random.split(rng)
  visits = gibbs_visits(order_rng, batch=batch, length=length, num_sweeps=num_sweeps, order=order)
  ids, text_mask = gibbs_start(batch, max_len=max_len, length=length, tokens=tokens)
  not_last = jnp.zeros((batch,), bool)
  image = _image_inputs(visual, boxes, encode_vision(params, model=model, visual=visual, boxes=boxes))

  def step(t, ids):
    here = jnp.arange(max_len)[None, :] == visits[:, t][:, None]

    def head(module, out):
      return module.predict_text(jnp.take_along_axis(out.language, visits[:, t][:, None, None], axis=1)[:, 0])

    logits = apply.apply_model(model, params, task="i2t", rng=None, head=head,
                               text_ids=jnp.where(here, tokens.mask_id, ids), text_mask=text_mask, **image)
    log_probs = word_log_probs(logits, not_last, tokens)
    if temperature == 0:
      word = jnp.argmax(log_probs, axis=-1)
    else:
      word = jax.random.categorical(jax.random.fold_in(sample_rng, t),
                                    filter_logits(log_probs, temperature=temperature), axis=-1)
    return jnp.where(here, word[:, None].astype(ids.dtype), ids)

  return end_at_sep(jax.lax.fori_loop(0, num_sweeps * length, step, ids), tokens)
