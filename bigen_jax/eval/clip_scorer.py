"""A frozen CLIP as the evaluators' image–text scorer (METHOD.md §8): normalised embeddings of images and texts,
CLIPScore of aligned pairs, and the ``score_fn`` that ``r_precision`` ranks with.

``config.eval.clip``: ``path`` ("" off) is a ``bigen_jax.train_clip`` run directory (the demo world's CLIP) or
params converted by ``tools/convert_clip.py`` (OpenAI / open_clip weights for COCO) with ``variant``, the
``clip_config`` name they were converted as (e.g. ``ViT-B-32-quickgelu``). Images of any size are resized and
normalised in JAX (``clip.preprocess``); texts are tokenised by open_clip's tokenizer and embedded once each.
``evaluate_clip`` scores a CLIP itself on held-out real pairs (``bigen_jax.train_clip``'s report).
"""

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from bigen_jax.data import batching
from bigen_jax.data import records
from bigen_jax.eval import clip_score
from bigen_jax.eval import r_precision
from bigen_jax.eval import sources
from bigen_jax.models import clip


class ClipScorer:
  """Embeds images and texts with one frozen CLIP; every embedding is L2-normalised, float32 [N, E]."""

  def __init__(self, model: clip.CLIP, params, *, batch_size: int = 64):
    self.model, self.params, self.batch_size = model, params, batch_size
    self._image = jax.jit(lambda p, x: model.apply(
        {"params": p}, clip.preprocess(x, image_size=model.image_size), normalize=True, method="encode_image"))
    self._text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, normalize=True, method="encode_text"))
    self._texts: dict[str, np.ndarray] = {}  # text -> embedding [E]: R-precision asks for the same texts often

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "ClipScorer | None":
    """The scorer of ``config.eval.clip`` (path, variant, batch_size); None when its path is empty."""
    if not cfg.path:
      return None
    from bigen_jax import train_clip  # pylint: disable=g-import-not-at-top  (the trainer loads run directories)
    model, params, _ = train_clip.load_clip(cfg.path, cfg.variant)
    return cls(model, params, batch_size=cfg.batch_size)

  def image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """images uint8 [N, H, W, 3] -> [N, E]."""
    n, b = len(images), self.batch_size
    out = [np.asarray(self._image(self.params, batching.pad_rows(images[i:i + b], b))) for i in range(0, n, b)]
    return np.concatenate(out)[:n] if out else np.zeros((0, self.model.embed_dim), np.float32)

  def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
    """texts [N] -> [N, E]; each distinct text is embedded once per scorer."""
    new = [t for t in dict.fromkeys(texts) if t not in self._texts]
    for i in range(0, len(new), self.batch_size):
      chunk = new[i:i + self.batch_size]
      ids = clip.tokenize(chunk, context_length=self.model.context_length)
      emb = np.asarray(self._text(self.params, batching.pad_rows(ids, self.batch_size)))
      self._texts.update(zip(chunk, emb[:len(chunk)]))
    if not texts:
      return np.zeros((0, self.model.embed_dim), np.float32)
    return np.stack([self._texts[t] for t in texts])

  def score_fn(self, image_emb: np.ndarray):
    """``r_precision``'s ``score_fn(index, texts) -> [K]``: cosine of image ``image_emb[index]`` [K, E] with
    each of ``texts``."""
    return lambda index, texts: np.sum(image_emb[index] * self.text_embeddings(list(texts)), axis=-1)


def world_negatives(records_dir: str, split: str, indices: list[int]) -> tuple[Any, Any, str]:
  """(negatives_fn, contexts, source) of ``r_precision.hard`` for the records ``indices`` of ``split``: the
  world's (its plug-in's scene graphs, source "world"), else English word swaps (``swap_negatives``)."""
  plugin = sources.plugin(records.read_manifest(records_dir).get("source", {}))
  if plugin is not None:
    negatives_fn, contexts = plugin.hard_negatives(split=split, indices=indices)
    if contexts is not None:
      return negatives_fn, contexts, "world"
  return r_precision.swap_negatives, None, "word_swaps"


def evaluate_clip(scorer: ClipScorer, images: np.ndarray, captions: list[str], *,
                  negatives_fn: Any = r_precision.swap_negatives, contexts: Any = None, num_negatives: int = 99,
                  seed: int = 0) -> dict[str, Any]:
  """How well a CLIP pairs real image i (uint8 [N, H, W, 3]) with ``captions[i]``: r_precision_easy (R@1 among
  itself and ``num_negatives`` other captions; chance 1 / easy_candidates), r_precision_hard (above each of its
  hard negatives, per category too; None without trials, as JSON keeps it), clip_s_real and clip_s_shuffled
  (mean CLIP-S of the true pairs and of a seeded derangement of the captions), logit_scale (exp)."""
  n = len(captions)
  image_emb, text_emb = scorer.image_embeddings(images), scorer.text_embeddings(captions)
  index = np.arange(n)
  easy = r_precision.easy(index, captions, scorer.score_fn(image_emb), num_negatives=num_negatives, seed=seed)
  hard = r_precision.hard(index, captions, scorer.score_fn(image_emb), negatives_fn=negatives_fn,
                          contexts=contexts, seed=seed)
  order = np.random.default_rng(seed).permutation(n)
  partner = np.empty(n, np.int64)
  partner[order] = np.roll(order, -1)  # image order[k] gets the caption of order[k + 1]: nobody keeps their own
  return {"num_images": n, "easy_candidates": 1 + num_negatives, **easy.metrics("r_precision_easy"),
          **(hard.metrics("r_precision_hard") if hard.num_trials else {"r_precision_hard": None}),
          "hard_trials": hard.num_trials,
          "clip_s_real": float(np.mean(clip_score.captioning_clip_score(image_emb, text_emb))),
          "clip_s_shuffled": float(np.mean(clip_score.captioning_clip_score(image_emb, text_emb[partner]))),
          "logit_scale": float(np.exp(np.asarray(scorer.params["logit_scale"])))}
