"""Semantic accuracy of generated images and captions in the captioned-scenes world: the grammar (``grammar``)
checks a caption's claims against a scene graph, the true one of a record or the one the recogniser
(``recognizer``) reads from an image.

Relations in recognised scenes are read with a lenient margin (``recognizer.LENIENT_MARGIN`` = 0 px: the
subject's centre only has to lie on the stated side of the object's centre): the dataset's 8-pixel margin is a
rule for *writing* true captions, and a generated image that puts a star a few pixels left of a circle does show
"a star left of a circle". Hard negatives are false even at margin 0, so this reading still rejects them.

Per-claim-type numbers split a caption's claims (``claim_parts``) into single checks: ``objects`` (each noun
phrase exists, distinct-object and "the" uniqueness rules kept), ``shapes`` / ``colours`` / ``sizes`` (some
object has each stated attribute), ``counts`` (each "two red circles" exactly), ``relations`` (each stated
relation with its two noun phrases) and ``background``.
"""

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bigen_jax.worlds.scenes import grammar as G
from bigen_jax.worlds.scenes import recognizer
from bigen_jax.worlds.scenes import recognizer_model as R
from bigen_jax.worlds.scenes import world

CLAIM_TYPES = ("objects", "shapes", "colours", "sizes", "counts", "relations", "background")
ATTRIBUTE_TYPES = (("shape", "shapes"), ("colour", "colours"), ("size", "sizes"))


def _claims(**kw) -> dict[str, Any]:
  return {"mentions": [], "relations": [], "counts": [], "background": None, **kw}


def claim_parts(claims: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """A caption's claims (``parse_caption``) split into (type, single-check claims) for ``CLAIM_TYPES``."""
  parts = []
  descs = list(claims["mentions"]) + [d for d, _ in claims["counts"]]
  for m in claims["mentions"]:
    parts.append(("objects", _claims(mentions=[m])))
  for d, n in claims["counts"]:
    parts.append(("counts", _claims(counts=[(d, n)])))
  for d in descs:
    for key, kind in ATTRIBUTE_TYPES:
      if d[key] is not None:
        one = {"shape": None, "colour": None, "size": None, "definite": False, key: d[key]}
        parts.append((kind, _claims(mentions=[one])))
  for a, rel, b in claims["relations"]:
    parts.append(("relations", _claims(mentions=[claims["mentions"][a], claims["mentions"][b]],
                                       relations=[(0, rel, 1)])))
  if claims["background"] is not None:
    parts.append(("background", _claims(background=claims["background"])))
  return parts


def _parse(caption: str) -> dict[str, Any] | None:
  try:
    return G.parse_caption(caption)
  except G.ParseError:
    return None


def _claim_scores(claims_list: Sequence[Mapping[str, Any] | None], graphs: Sequence[Mapping[str, Any]],
                  margin: float | None) -> tuple[np.ndarray, dict[str, list[bool]]]:
  """Whole-caption truth [N] (False where unparseable) and each claim type's single-check outcomes."""
  whole = np.zeros(len(claims_list), bool)
  by_type: dict[str, list[bool]] = {t: [] for t in CLAIM_TYPES}
  for i, (claims, graph) in enumerate(zip(claims_list, graphs, strict=True)):
    if claims is None:
      continue
    whole[i] = G.check_claims(claims, graph, margin=margin)
    for kind, part in claim_parts(claims):
      by_type[kind].append(G.check_claims(part, graph, margin=margin))
  return whole, by_type


def _type_summary(by_type: Mapping[str, list[bool]], prefix: str) -> dict[str, float]:
  out = {}
  for kind, oks in by_type.items():
    out[f"{kind}_{prefix}"] = float(np.mean(oks)) if oks else float("nan")
    out[f"num_{kind}_claims"] = len(oks)
  return out


def caption_semantic_accuracy(captions: Sequence[str], scene_graphs: Sequence[Mapping[str, Any] | str], *,
                              margin: float | None = None) -> dict[str, float]:
  """Generated captions against the ground-truth scene graphs of their images (one caption per graph).

  ``parseable``: fraction inside the grammar; ``accuracy``: fraction true (``check_caption``; unparseable
  ones count as false); ``<type>_precision``: fraction of the parseable captions' claims of that type that
  hold. ``margin`` (pixels) overrides the graphs' own relation margin (None: the dataset's 8 px).
  """
  graphs = [G.load_scene(g) for g in scene_graphs]
  claims = [_parse(c) for c in captions]
  whole, by_type = _claim_scores(claims, graphs, margin)
  return {"num_captions": len(captions), "parseable": float(np.mean([c is not None for c in claims])),
          "accuracy": float(whole.mean()) if len(whole) else float("nan"), **_type_summary(by_type, "precision")}


def image_semantic_accuracy(params: Any, images: np.ndarray, captions: Sequence[str], *,
                            margin: float = recognizer.LENIENT_MARGIN, threshold: float = 0.3) -> dict[str, float]:
  """Images generated from captions (image i from captions[i]), read by the recogniser.

  ``accuracy``: fraction of images whose caption's claims all hold in the recognised scene (relations at
  ``margin`` pixels, lenient by default); ``<type>_accuracy``: fraction of claims of each type that hold.
  Unparseable captions count as failures (``parseable`` reports their share).
  """
  return semantic_accuracy(recognizer.predict(params, images), captions, margin=margin, threshold=threshold)


def semantic_accuracy(probs: Mapping[str, np.ndarray], captions: Sequence[str], *,
                      margin: float = recognizer.LENIENT_MARGIN, threshold: float = 0.3) -> dict[str, float]:
  """``image_semantic_accuracy`` from the recogniser's outputs (``recognizer.predict``) of the images."""
  graphs = R.decode(probs, threshold=threshold, relation_margin=margin)
  claims = [_parse(c) for c in captions]
  whole, by_type = _claim_scores(claims, graphs, margin)
  return {"num_images": len(graphs), "parseable": float(np.mean([c is not None for c in claims])),
          "accuracy": float(whole.mean()) if len(whole) else float("nan"), **_type_summary(by_type, "accuracy")}


def _soft_match(probs: Mapping[str, np.ndarray], n: int, desc: tuple[str | None, str | None, str | None]) -> float:
  """Max over cells of P(object centre) x P(each stated attribute): how surely some object fits ``desc``
  (shape, colour, size; None where the caption does not say)."""
  p = probs["heat"][n].copy()
  for value, (key, vocab) in zip(desc, (("shape", world.SHAPES), ("colour", world.COLOURS), ("size", world.SIZES))):
    if value is not None:
      p = p * probs[key][n][..., vocab.index(value)]
  return float(p.max())


def caption_image_score(params: Any, images: np.ndarray, captions: Sequence[str], *,
                        margin: float = recognizer.LENIENT_MARGIN, threshold: float = 0.3) -> np.ndarray:
  """Image–caption agreement [N] in [0, 1] for ranking (image i against captions[i]); 0 if unparseable.

  The mean of three terms read from the recogniser: whether the whole caption holds in the recognised scene
  (0/1), the fraction of its single claims (``claim_parts``) that hold, and a soft term — the mean over its
  noun phrases and counted descriptions of ``_soft_match`` (the recogniser's probability that some object
  fits), plus P(background) for a stated background. The soft term breaks ties between hard judgements.
  """
  return caption_scores(recognizer.predict(params, images), captions, margin=margin, threshold=threshold)


def caption_scores(probs: Mapping[str, np.ndarray], captions: Sequence[str], *,
                   margin: float = recognizer.LENIENT_MARGIN, threshold: float = 0.3) -> np.ndarray:
  """``caption_image_score`` from the recogniser's outputs (``recognizer.predict``) of the images."""
  return caption_scorer(probs, margin=margin, threshold=threshold)(np.arange(len(captions)), captions)


def caption_scorer(probs: Mapping[str, np.ndarray], *, margin: float = recognizer.LENIENT_MARGIN,
                   threshold: float = 0.3) -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
  """``score(index, captions) -> [K]``: ``caption_image_score`` of image ``index[k]`` (a row of ``probs``, the
  recogniser's outputs of N images) against ``captions[k]``. Each image is decoded once and each distinct caption
  parsed once, however many captions it is ranked against (R-precision scores each image against 100); a single
  claim is checked once per image (captions share them), and the whole caption only when every single claim holds
  (it implies each of them: ``claim_parts`` restricts its mentions, counts and relations)."""
  graphs = R.decode(probs, threshold=threshold, relation_margin=margin)
  prepared: dict[str, tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], list[tuple[Any, ...]]] | None] = {}
  soft_cache: dict[tuple[int, tuple[Any, ...]], float] = {}
  part_cache: dict[tuple[int, str], bool] = {}

  def prepare(caption: str):
    if caption not in prepared:
      claims = _parse(caption)
      descs = None if claims is None else [
          (d["shape"], d["colour"], d["size"]) for d in list(claims["mentions"]) + [d for d, _ in claims["counts"]]]
      prepared[caption] = None if claims is None else (claims, [(repr(p), p) for _, p in claim_parts(claims)], descs)
    return prepared[caption]

  def soft(n: int, desc: tuple[Any, ...]) -> float:
    if (n, desc) not in soft_cache:
      soft_cache[n, desc] = _soft_match(probs, n, desc)
    return soft_cache[n, desc]

  def holds(n: int, key: str, part: dict[str, Any]) -> bool:
    if (n, key) not in part_cache:
      part_cache[n, key] = G.check_claims(part, graphs[n], margin=margin)
    return part_cache[n, key]

  def score(index: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    scores = np.zeros(len(captions), np.float32)
    for k, (n, caption) in enumerate(zip(np.asarray(index).tolist(), captions, strict=True)):
      entry = prepare(caption)
      if entry is None:
        continue
      claims, parts, descs = entry
      held = sum(holds(n, key, part) for key, part in parts)
      frac = held / len(parts) if parts else 1.0
      terms = [soft(n, d) for d in descs]
      if claims["background"] is not None:
        terms.append(float(probs["background"][n][world.BACKGROUNDS.index(claims["background"])]))
      whole = held == len(parts) and G.check_claims(claims, graphs[n], margin=margin)
      scores[k] = (float(whole) + frac + (sum(terms) / len(terms) if terms else 1.0)) / 3.0
    return scores

  return score
