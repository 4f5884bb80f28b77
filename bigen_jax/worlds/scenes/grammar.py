"""Reads captions of the captioned-scenes grammar back into claims, checks them against a scene graph, and
makes hard negatives (one word swapped within its category, false for the scene).

Grammar (lowercase words, no punctuation)::

  caption  := FRONT np "there is" np [bg]            "to the left of a blue star there is a red circle"
            | "the" np "is" REL "the" np [bg]          "the red circle is above the small box"
            | [INTRO] item ("and" item)* ["including" np] [bg]
  item     := np [REL np] | NUMBER [SIZE] [COLOUR] noun(s)      "two green triangles", "a red disc below a star"
  np       := "a" [SIZE] [COLOUR] noun                noun: a shape word, or "shape"/"object" for any shape
  bg       := "on a" BACKGROUND "background"

Meaning: each ``np`` is a different object of the scene (``the`` also says it is the only one fitting its
description); ``NUMBER noun`` says exactly that many objects fit; ``REL`` compares centres (``relation_holds``).
"""

import itertools
import json
from typing import Any, Mapping, Sequence

import numpy as np

from bigen_jax.worlds.scenes import lexicon as V

REL_PHRASES = {("to", "the", "left", "of"): "left of", ("left", "of"): "left of",
               ("to", "the", "right", "of"): "right of", ("right", "of"): "right of",
               ("above",): "above", ("below",): "below"}
FRONT_PHRASES = (("to", "the", "left", "of"), ("to", "the", "right", "of"), ("above",), ("below",))
INTROS = (("there", "is"), ("there", "are"), ("a", "picture", "of"), ("an", "image", "of"))


class ParseError(ValueError):
  """The caption is not a sentence of the scenes grammar."""


def _expect(words: Sequence[str], i: int, phrase: Sequence[str]) -> int:
  if tuple(words[i:i + len(phrase)]) != tuple(phrase):
    raise ParseError(f"expected {' '.join(phrase)!r} at word {i} of {' '.join(words)!r}")
  return i + len(phrase)


def _desc(words: Sequence[str], i: int, plural: bool) -> tuple[dict[str, Any], int]:
  """``[SIZE] [COLOUR] noun`` → ({"size", "colour", "shape"} with None for unsaid, next index)."""
  desc = {"size": None, "colour": None, "shape": None}
  if i < len(words) and words[i] in V.SIZE_WORDS:
    desc["size"], i = V.SIZE_WORDS[words[i]], i + 1
  if i < len(words) and words[i] in V.COLOURS:
    desc["colour"], i = words[i], i + 1
  nouns, generic = (V.SHAPE_PLURAL, V.GENERIC_PLURAL) if plural else (V.SHAPE_SINGULAR, V.GENERIC_SINGULAR)
  if i < len(words) and words[i] in nouns:
    desc["shape"] = nouns[words[i]]
  elif not (i < len(words) and words[i] in generic):
    raise ParseError(f"expected a {'plural ' if plural else ''}noun at word {i} of {' '.join(words)!r}")
  return desc, i + 1


def _np(words: Sequence[str], i: int, article: str, claims: dict[str, Any]) -> int:
  i = _expect(words, i, (article,))
  desc, i = _desc(words, i, plural=False)
  claims["mentions"].append(dict(desc, definite=article == "the"))
  return i


def _phrase(words: Sequence[str], i: int, table: Sequence[Sequence[str]]) -> tuple[Any, int]:
  for phrase in table:
    if tuple(words[i:i + len(phrase)]) == tuple(phrase):
      return phrase, i + len(phrase)
  return None, i


def _relation(words: Sequence[str], i: int) -> tuple[str | None, int]:
  phrase, j = _phrase(words, i, list(REL_PHRASES))
  return (REL_PHRASES[phrase] if phrase else None), j


def _item(words: Sequence[str], i: int, claims: dict[str, Any]) -> int:
  if i < len(words) and words[i] in V.NUMBER_VALUE:
    n = V.NUMBER_VALUE[words[i]]
    desc, i = _desc(words, i + 1, plural=n > 1)
    claims["counts"].append((desc, n))
    return i
  i = _np(words, i, "a", claims)
  rel, j = _relation(words, i)
  if rel is not None:
    subject = len(claims["mentions"]) - 1
    j = _np(words, j, "a", claims)
    claims["relations"].append((subject, rel, subject + 1))
  return j


def parse_caption(caption: str) -> dict[str, Any]:
  """Caption → claims ``{"mentions": [desc], "relations": [(i, rel, j)], "counts": [(desc, n)],
  "background": str | None}``; raises ``ParseError`` outside the grammar."""
  words = tuple(caption.split())
  claims = {"mentions": [], "relations": [], "counts": [], "background": None}
  front, i = _phrase(words, 0, FRONT_PHRASES)
  if front is not None:
    i = _np(words, i, "a", claims)
    i = _np(words, _expect(words, i, ("there", "is")), "a", claims)
    claims["relations"].append((1, REL_PHRASES[front], 0))
  elif words[:1] == ("the",):
    i = _np(words, 0, "the", claims)
    rel, i = _relation(words, _expect(words, i, ("is",)))
    if rel is None:
      raise ParseError(f"expected a relation in {caption!r}")
    i = _np(words, i, "the", claims)
    claims["relations"].append((0, rel, 1))
  else:
    _, i = _phrase(words, 0, INTROS)
    i = _item(words, i, claims)
    while words[i:i + 1] == ("and",):
      i = _item(words, i + 1, claims)
    if words[i:i + 1] == ("including",):
      i = _np(words, i + 1, "a", claims)
  if words[i:i + 2] == ("on", "a"):
    if len(words) != i + 4 or words[i + 2] not in V.BACKGROUNDS or words[i + 3] != "background":
      raise ParseError(f"expected 'on a BACKGROUND background' at the end of {caption!r}")
    claims["background"], i = words[i + 2], i + 4
  if i != len(words):
    raise ParseError(f"unexpected {' '.join(words[i:])!r} at the end of {caption!r}")
  return claims


def fits(obj: Mapping[str, Any], desc: Mapping[str, Any]) -> bool:
  """Whether an object has every attribute a description states."""
  for key in ("shape", "colour", "size"):
    value = desc.get(key)
    if value is not None and value != obj[key]:
      return False
  return True


def check_claims(claims: Mapping[str, Any], scene: Mapping[str, Any], *, margin: float | None = None) -> bool:
  """Whether every claim holds; mentions must be distinct objects (searched over all assignments)."""
  objs = scene["objects"]
  margin = scene["relation_margin"] if margin is None else margin
  if claims["background"] not in (None, scene["background"]["type"]):
    return False
  if any(sum(fits(o, d) for o in objs) != n for d, n in claims["counts"]):
    return False
  mentions = claims["mentions"]
  if any(m["definite"] and sum(fits(o, m) for o in objs) != 1 for m in mentions):
    return False
  for pick in itertools.permutations(range(len(objs)), len(mentions)):
    if all(fits(objs[k], m) for k, m in zip(pick, mentions)) and all(
        V.relation_holds(objs[pick[a]], rel, objs[pick[b]], margin) for a, rel, b in claims["relations"]):
      return True
  return False


def load_scene(scene: Mapping[str, Any] | str) -> Mapping[str, Any]:
  return json.loads(scene) if isinstance(scene, str) else scene


def check_caption(caption: str, scene: Mapping[str, Any] | str, *, margin: float | None = None) -> bool:
  """Whether a caption is true of a scene graph (dict or JSON); False also for captions outside the grammar.

  ``margin`` (pixels) overrides the scene's relation margin; 0 is the most lenient reading of relations.
  """
  try:
    claims = parse_caption(caption)
  except ParseError:
    return False
  return check_claims(claims, load_scene(scene), margin=margin)


def word_swaps(word: str) -> tuple[str | None, tuple[str, ...]]:
  """(category, replacements) for one caption word; (None, ()) for words no hard negative swaps."""
  if word in V.SHAPE_SINGULAR:
    return "shape", tuple(s for s in V.SHAPES if s != V.SHAPE_SINGULAR[word])
  if word in V.SHAPE_PLURAL:
    return "shape", tuple(V.PLURAL_OF[s] for s in V.SHAPES if s != V.SHAPE_PLURAL[word])
  if word in V.COLOURS:
    return "colour", tuple(c for c in V.COLOURS if c != word)
  if word in V.PLURAL_NUMBERS:
    return "number", tuple(n for n in V.PLURAL_NUMBERS if n != word)
  if word in V.RELATION_SWAPS:
    return "relation", (V.RELATION_SWAPS[word],)
  if word in V.SIZE_WORDS:
    return "size", tuple(s for s in V.SIZES if s != V.SIZE_WORDS[word])
  return None, ()


def hard_negatives(caption: str, scene: Mapping[str, Any] | str, rng: np.random.Generator
                   ) -> list[tuple[str, str]]:
  """Up to one (category, negative) per category of ``NEGATIVE_CATEGORIES``: the caption with one word
  swapped within its category, false for the scene even with relations read leniently (margin 0)."""
  scene = load_scene(scene)
  words = caption.split()
  options: dict[str, list[str]] = {c: [] for c in V.NEGATIVE_CATEGORIES}
  for pos, word in enumerate(words):
    category, replacements = word_swaps(word)
    for new in replacements:
      options[category].append(" ".join(words[:pos] + [new] + words[pos + 1:]))
  out = []
  for category in V.NEGATIVE_CATEGORIES:  # the first false one in random order: a uniform pick, fewer checks
    for k in rng.permutation(len(options[category])):
      negative = options[category][k]
      if not check_claims(parse_caption(negative), scene, margin=0.0):
        out.append((category, negative))
        break
  return out
