"""Stage-2 image-to-text by self-critical sequence training (METHOD.md §4, eq. 2): maximise the CIDEr-D of
sampled captions, the greedy caption's CIDEr-D the baseline.

In one compiled step: the greedy caption and ``num_samples`` multinomial samples of each image are decoded
(``sampling.captions``, ``lax.scan`` loops, no gradient), each scored in-graph by CIDEr-D against every reference
caption of its image (``batch["caption_ids"]``, the input pipeline's ``with_all_captions``) with the document
frequencies of the training split's captions (``frozen["cider"]``, ``reference_table``), and the loss is
-mean over samples of (r_sample - r_greedy) * log p(sample | image), the log-probability recomputed with
gradients by a teacher-forced pass over the sampled ids. No dropout: the log-probabilities are those of the
distribution the sampler drew from. CIDEr-D reads word-piece ids after [CLS], up to [SEP].
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bigen_jax.eval import cider
from bigen_jax.models import apply
from bigen_jax.sampling import captions
from bigen_jax.tasks import layouts

Array = jax.Array


def reference_table(caption_ids: Sequence[np.ndarray], *, pad_id: int, sep_id: int) -> cider.CiderTable:
  """CIDEr-D document frequencies (device form) of a corpus: one document per image, its captions ids
  [N_i, L] (``[CLS] w.. [SEP] [PAD]..``, as stored in the records)."""
  docs = [np.asarray(ids)[:, 1:] for ids in caption_ids]
  return cider.cider_table(cider.document_frequencies_from_ids(docs, pad_id=pad_id, end_id=sep_id))


def rewards(candidates: Array, references: Array, table: cider.CiderTable, *, pad_id: int, sep_id: int) -> Array:
  """CIDEr-D float32 [N] of candidates [N, L] against references [N, R, L'], both ``[CLS] w.. [SEP] [PAD]..``;
  reference rows that start with [PAD] are absent."""
  return cider.cider_d_ids(candidates[:, 1:], references[..., 1:], table, pad_id=pad_id, end_id=sep_id,
                           ref_mask=references[..., 0] != pad_id)


def scored_positions(ids: Array, sep_id: int) -> Array:
  """bool [N, L]: the positions of ``ids`` [N, L] a caption's log-probability sums over, its words and its
  first [SEP] ([CLS] and everything after the [SEP] left out)."""
  is_sep = ids == sep_id
  ended = (jnp.cumsum(is_sep, axis=1) - is_sep) > 0
  return (jnp.arange(ids.shape[1]) >= 1) & ~ended


def sequence_log_probs(params, ids: Array, *, model, visual: dict[str, Array], boxes: Array,
                       tokens: captions.Tokens, layout: str, temperature: float = 1.0) -> Array:
  """float32 [N]: sum over the ``scored_positions`` l of ids [N, L] of log p(ids[:, l] | ids[:, :l], image)
  under the sampling distribution (``captions.filter_logits`` at ``temperature``), differentiable in ``params``.

  The "causal" layout reads every position's distribution from one teacher-forced pass (position l - 1 sees
  ids[:, :l] only, as decoding step l does); the "mask" layout needs one pass per position
  (``captions.next_word_log_probs``, the vision stream computed once), L - 1 times the language and cross-modality
  layers' work."""
  scored = scored_positions(ids, tokens.sep_id)
  targets = jnp.where(scored, ids, tokens.sep_id)  # [SEP] is never -inf: no inf * 0 in the gradient
  if layout == "causal":
    per_word = _causal_word_log_probs(params, ids, model=model, visual=visual, boxes=boxes, tokens=tokens,
                                      temperature=temperature)
    per_word = jnp.take_along_axis(per_word, targets[:, 1:, None], axis=-1)[..., 0]  # [N, L - 1]
  else:
    vision = captions.encode_vision(params, model=model, visual=visual, boxes=boxes)  # once, not per position

    def word(_, l):
      log_probs = captions.next_word_log_probs(params, ids, l, model=model, visual=visual, boxes=boxes,
                                               tokens=tokens, layout=layout, vision=vision)
      log_probs = captions.filter_logits(log_probs, temperature=temperature)
      return None, jnp.take_along_axis(log_probs, targets[:, l, None], axis=-1)[:, 0]

    _, per_word = jax.lax.scan(word, None, jnp.arange(1, ids.shape[1]))  # [L - 1, N]
    per_word = per_word.T
  return jnp.sum(jnp.where(scored[:, 1:], per_word, 0.0), axis=1)


def _causal_word_log_probs(params, ids: Array, *, model, visual: dict[str, Array], boxes: Array,
                           tokens: captions.Tokens, temperature: float) -> Array:
  """float32 [N, L - 1, V]: the sampling distribution of word l = 1..L-1 given ids[:, :l], from one pass in the
  causal layout (``layouts.i2t_causal_inputs``'s attention; every position a key, later ones hidden)."""
  length = ids.shape[1]
  every = jnp.ones(ids.shape, jnp.int32)
  layout = layouts.i2t_causal_inputs(text_ids=ids, text_mask=every, pad_id=tokens.pad_id)
  logits = apply.apply_model(model, params, task="i2t", rng=None,
                             head=lambda module, out: module.predict_text(out.language[:, :-1]), text_ids=ids,
                             text_mask=every, text_attention=layout.text_attention,
                             vision_text_mask=layout.vision_text_mask, boxes=boxes, **visual)
  log_probs = captions.word_log_probs(logits, jnp.arange(1, length) == length - 1, tokens)
  flat = captions.filter_logits(log_probs.reshape(-1, log_probs.shape[-1]), temperature=temperature)
  return flat.reshape(log_probs.shape)


def decode_tokens(cfg) -> captions.Tokens:
  """The decoders' special tokens from a task config; [UNK] is never produced, as in the captioning evaluator."""
  banned = (cfg.unk_id,) if "unk_id" in cfg else ()
  return captions.Tokens(cls_id=cfg.cls_id, sep_id=cfg.sep_id, mask_id=cfg.mask_id, pad_id=cfg.pad_id,
                         banned=banned)


def _inputs(batch, cfg, frozen, repeats: int) -> tuple[dict[str, Array], Array]:
  """The visual inputs and boxes of ``batch``, each image repeated ``repeats`` times in a row."""
  tile = lambda x: jnp.repeat(x, repeats, axis=0)
  visual = apply.visual_input(batch, cfg.visual_input, frozen)
  return {k: v if k == "codebook" else tile(v) for k, v in visual.items()}, tile(batch["boxes"])


def rollouts(params, batch, rng, *, model, cfg, frozen) -> tuple[Array, Array]:
  """(samples int32 [B * num_samples, L], image i's samples at rows i * num_samples + s; greedy int32 [B, L]),
  decoded without gradient; L is ``cfg.max_len`` (-1: the references' length)."""
  params = jax.lax.stop_gradient(params)
  max_len = cfg.max_len if cfg.max_len > 0 else batch["caption_ids"].shape[-1]
  layout, tokens = cfg.get("layout", "mask"), decode_tokens(cfg)
  visual, boxes = _inputs(batch, cfg, frozen, 1)
  greedy = captions.greedy_captions(params, model=model, visual=visual, boxes=boxes, max_len=max_len,
                                    tokens=tokens, layout=layout)
  visual, boxes = _inputs(batch, cfg, frozen, cfg.num_samples)
  samples = captions.sample_captions(params, rng, model=model, visual=visual, boxes=boxes, max_len=max_len,
                                     tokens=tokens, temperature=cfg.temperature, layout=layout)
  return samples, greedy


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: caption_ids [B, R, L] (every reference, rows of [PAD] absent), dense [B, 64, D] or cluster_ids
  [B, 64], boxes [B, 64, 4]. frozen: "cider" (``reference_table`` of the training split), "codebook".

  cfg: num_samples, temperature, visual_input, layout, max_len, cls_id, sep_id, mask_id, pad_id (unk_id).
  Returns (loss, metrics: loss, reward_sample, reward_greedy, advantage, their means).
  """
  del deterministic  # no dropout in any case (module docstring)
  if "cider" not in frozen:
    raise ValueError("tasks.scst needs frozen['cider'], the training split's CIDEr-D table: "
                     "experiment.build_context builds it when --config.tasks.scst.weight > 0")
  samples, greedy = rollouts(params, batch, rng, model=model, cfg=cfg, frozen=frozen)
  k, references = cfg.num_samples, batch["caption_ids"]
  score = lambda ids, refs: rewards(ids, refs, frozen["cider"], pad_id=cfg.pad_id, sep_id=cfg.sep_id)
  reward_sample, reward_greedy = score(samples, jnp.repeat(references, k, axis=0)), score(greedy, references)
  advantage = jax.lax.stop_gradient(reward_sample - jnp.repeat(reward_greedy, k))
  visual, boxes = _inputs(batch, cfg, frozen, k)
  log_probs = sequence_log_probs(params, samples, model=model, visual=visual, boxes=boxes,
                                 tokens=decode_tokens(cfg), layout=cfg.get("layout", "mask"),
                                 temperature=cfg.temperature)
  loss = -jnp.mean(advantage * log_probs)
  return loss, {"loss": loss, "reward_sample": reward_sample.mean(), "reward_greedy": reward_greedy.mean(),
                "advantage": advantage.mean()}
