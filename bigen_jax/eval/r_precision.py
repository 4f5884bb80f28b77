"""R-precision of generated images with any image-text scorer: does an image's caption outscore distractors?

``score_fn(images, captions) -> [N]`` scores aligned pairs (image k with caption k); ``images`` is whatever the
scorer takes (an array [N, ...] is indexed, any other sequence becomes a list).

* ``easy``: each image against its caption and ``num_negatives`` (99) other captions of the corpus, drawn with
  a seeded rng (distinct texts, none equal to the true caption).
* ``hard``: each image against its caption with one word swapped within a category (noun, verb, colour,
  number): ``swap_negatives`` for English captions with small built-in word lists, or any
  ``negatives_fn(caption, rng)`` / ``negatives_fn(caption, context, rng)`` such as
  ``bigen_jax.worlds.scenes.world.hard_negatives(caption, scene_graph, rng)``, or precomputed negatives. One trial per
  (image, category): the caption against that category's negatives.

A trial succeeds when the true caption scores strictly highest. Ties: ``ties="fail"`` (default) counts them
as failures, so a collapsed scorer gets 0; ``ties="random"`` breaks them uniformly at random (seeded), so a
constant scorer gets chance (1 / candidates). A NaN score fails the trial.
"""

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

ScoreFn = Callable[[Any, list[str]], np.ndarray]
NegativesFn = Callable[..., Sequence[tuple[str, str]]]

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
           "silver")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NOUNS = {"man": "men", "woman": "women", "person": "people", "child": "children", "boy": "boys",
         "girl": "girls", "dog": "dogs", "cat": "cats", "horse": "horses", "cow": "cows", "elephant": "elephants",
         "giraffe": "giraffes", "zebra": "zebras", "bear": "bears", "bird": "birds", "car": "cars",
         "bus": "buses", "truck": "trucks", "train": "trains", "bicycle": "bicycles",
         "motorcycle": "motorcycles", "boat": "boats", "airplane": "airplanes", "table": "tables",
         "chair": "chairs", "couch": "couches", "bed": "beds", "bench": "benches", "pizza": "pizzas",
         "sandwich": "sandwiches", "cake": "cakes", "banana": "bananas", "laptop": "laptops",
         "clock": "clocks", "umbrella": "umbrellas", "kite": "kites", "surfboard": "surfboards",
         "skateboard": "skateboards", "frisbee": "frisbees", "building": "buildings", "kitchen": "kitchens",
         "toilet": "toilets", "tree": "trees", "plate": "plates", "bowl": "bowls"}
VERBS = ("sitting", "standing", "walking", "running", "riding", "eating", "holding", "playing", "flying",
         "looking", "laying", "carrying", "driving", "swimming", "throwing", "catching", "jumping", "talking",
         "drinking", "cutting", "watching", "sleeping", "skiing", "surfing")
CATEGORIES = ("noun", "verb", "colour", "number")
_SINGULAR_OF = {p: s for s, p in NOUNS.items()}
_WORD = re.compile(r"^(\W*)([A-Za-z]+)(\W*)$")


@dataclasses.dataclass(frozen=True)
class RPrecision:
  """overall: successes / trials; per_category and counts (trials) per category (empty for ``easy``)."""
  overall: float
  num_trials: int
  per_category: dict[str, float] = dataclasses.field(default_factory=dict)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  def metrics(self, prefix: str) -> dict[str, float]:
    """{prefix: overall, f"{prefix}/{category}": precision} for metric writers."""
    return {prefix: self.overall, **{f"{prefix}/{c}": v for c, v in self.per_category.items()}}


def _category_swaps(word: str) -> tuple[str | None, tuple[str, ...]]:
  """(category, replacements) of a lower-case word; (None, ()) if no list holds it."""
  if word in NOUNS:
    return "noun", tuple(s for s in NOUNS if s != word)
  if word in _SINGULAR_OF:
    return "noun", tuple(p for p in _SINGULAR_OF if p != word)
  for category, words in (("verb", VERBS), ("colour", COLOURS), ("number", NUMBERS)):
    if word in words:
      return category, tuple(w for w in words if w != word)
  return None, ()


def swap_negatives(caption: str, rng: np.random.Generator) -> list[tuple[str, str]]:
  """Up to one (category, negative) per category of ``CATEGORIES``: ``caption`` with one word replaced by
  another of its list (singular nouns by singular, plural by plural), picked uniformly over all (position,
  replacement) options. Capitalisation and punctuation around the word are kept, and after "a"/"an" only
  words taking the same article are used, so exactly one word changes."""
  words = caption.split()
  options: dict[str, list[str]] = {c: [] for c in CATEGORIES}
  for pos, token in enumerate(words):
    match = _WORD.match(token)
    if not match:
      continue
    lead, word, trail = match.groups()
    category, replacements = _category_swaps(word.lower())
    article = words[pos - 1].lower() if pos else ""
    for new in replacements:
      if article in ("a", "an") and (article == "an") != (new[0] in "aeiou"):
        continue
      new = new.capitalize() if word[0].isupper() else new
      options[category].append(" ".join(words[:pos] + [lead + new + trail] + words[pos + 1:]))
  return [(c, options[c][rng.integers(len(options[c]))]) for c in CATEGORIES if options[c]]


def _take(images: Any, index: np.ndarray) -> Any:
  if hasattr(images, "shape"):
    return images[index]
  return [images[i] for i in index]


def _wins(scores: np.ndarray, ties: str, rng: np.random.Generator) -> bool:
  """Whether scores[0] (the true caption) is the highest of scores [K] under the ``ties`` rule; any NaN
  score is a failure."""
  if np.any(np.isnan(scores)):
    return False
  best = np.max(scores[1:])
  if ties == "fail":
    return bool(scores[0] > best)
  if scores[0] < best:
    return False
  tied = int(np.sum(scores[1:] == scores[0]))
  return bool(rng.integers(tied + 1) == 0)


def _check(captions: Sequence[str], n: int, ties: str) -> None:
  if len(captions) != n:
    raise ValueError(f"{n} images but {len(captions)} captions")
  if ties not in ("fail", "random"):
    raise ValueError(f"ties must be 'fail' or 'random', got {ties!r}")


def _score(score_fn: ScoreFn, images: Any, captions: list[str]) -> np.ndarray:
  scores = np.asarray(score_fn(images, captions), np.float64).reshape(-1)
  if scores.shape[0] != len(captions):
    raise ValueError(f"score_fn returned {scores.shape[0]} scores for {len(captions)} pairs")
  return scores


def _sample_negatives(captions: Sequence[str], i: int, k: int, rng: np.random.Generator) -> list[str]:
  """k distinct caption texts of the corpus other than captions[i], by rejection sampling."""
  chosen: dict[str, None] = {}
  while len(chosen) < k:
    for j in rng.integers(len(captions), size=2 * k):
      text = captions[j]
      if text != captions[i] and text not in chosen and len(chosen) < k:
        chosen[text] = None
  return list(chosen)


def easy(images: Any, captions: Sequence[str], score_fn: ScoreFn, *, num_negatives: int = 99, seed: int = 0,
         ties: str = "fail") -> RPrecision:
  """R-precision of N images against their captions [N] among ``num_negatives`` random corpus captions;
  ``score_fn`` is called once per image with the image repeated 1 + num_negatives times."""
  n = len(captions)
  _check(captions, images.shape[0] if hasattr(images, "shape") else len(images), ties)
  if len(set(captions)) <= num_negatives:
    raise ValueError(f"{len(set(captions))} distinct captions cannot give {num_negatives} negatives each")
  rng = np.random.default_rng(seed)
  wins = 0
  for i in range(n):
    candidates = [captions[i]] + _sample_negatives(captions, i, num_negatives, rng)
    scores = _score(score_fn, _take(images, np.full(len(candidates), i)), candidates)
    wins += _wins(scores, ties, rng)
  return RPrecision(overall=wins / n, num_trials=n)


def hard(images: Any, captions: Sequence[str], score_fn: ScoreFn, *,
         negatives: Sequence[Sequence[tuple[str, str]]] | None = None,
         negatives_fn: NegativesFn = swap_negatives, contexts: Sequence[Any] | None = None, seed: int = 0,
         ties: str = "fail") -> RPrecision:
  """R-precision of N images against their captions [N] with hard negatives [(category, negative)] per image:
  ``negatives`` if given, else ``negatives_fn(caption, contexts[i], rng)`` when ``contexts`` (e.g. scene
  graphs) is given, else ``negatives_fn(caption, rng)``. One trial per (image, category); images without
  negatives are skipped. ``score_fn`` is called once per image."""
  n = images.shape[0] if hasattr(images, "shape") else len(images)
  _check(captions, n, ties)
  rng = np.random.default_rng(seed)
  wins: dict[str, int] = {}
  counts: dict[str, int] = {}
  for i in range(n):
    if negatives is not None:
      pairs = negatives[i]
    elif contexts is not None:
      pairs = negatives_fn(captions[i], contexts[i], rng)
    else:
      pairs = negatives_fn(captions[i], rng)
    if not pairs:
      continue
    candidates = [captions[i]] + [neg for _, neg in pairs]
    scores = _score(score_fn, _take(images, np.full(len(candidates), i)), candidates)
    categories = [str(c) for c, _ in pairs]
    for category in dict.fromkeys(categories):
      trial = np.concatenate([scores[:1], scores[1:][np.array(categories) == category]])
      wins[category] = wins.get(category, 0) + _wins(trial, ties, rng)
      counts[category] = counts.get(category, 0) + 1
  total = sum(counts.values())
  return RPrecision(overall=sum(wins.values()) / total if total else float("nan"), num_trials=total,
                    per_category={c: wins[c] / counts[c] for c in counts}, counts=counts)
