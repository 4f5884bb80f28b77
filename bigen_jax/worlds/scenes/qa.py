"""Question–answer pairs about a scene graph, with answers from the fixed vocabulary ``ANSWERS``."""

import re
from typing import Any, Mapping

import numpy as np

from bigen_jax.worlds.scenes import grammar as G
from bigen_jax.worlds.scenes import lexicon as V

ANSWERS = V.ANSWERS
QUESTION_TYPES = ("count_all", "count_shape", "count_colour", "colour_of", "shape_of", "size_of",
                  "exists", "relation_shape", "relation_yes_no", "background")


def _n(objs, **attrs) -> int:
  return sum(all(o[k] == v for k, v in attrs.items()) for o in objs)


def _candidates(scene: Mapping[str, Any], rng: np.random.Generator) -> dict[str, list[tuple[str, str]]]:
  """Every question of each type the scene can answer unambiguously."""
  objs, margin = scene["objects"], scene["relation_margin"]
  out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
  out["count_all"].append(("how many shapes are there?", V.NUMBERS[len(objs) - 1]))
  out["background"].append(("what pattern is the background?", scene["background"]["type"]))
  for o in objs:
    shape, colour = o["shape"], o["colour"]
    out["count_shape"].append((f"how many {V.PLURAL_OF[shape]} are there?", V.NUMBERS[_n(objs, shape=shape) - 1]))
    out["count_colour"].append((f"how many {colour} shapes are there?", V.NUMBERS[_n(objs, colour=colour) - 1]))
    if _n(objs, shape=shape) == 1:
      out["colour_of"].append((f"what colour is the {shape}?", colour))
    if _n(objs, colour=colour) == 1:
      out["shape_of"].append((f"what shape is the {colour} object?", shape))
    if _n(objs, colour=colour, shape=shape) == 1:
      out["size_of"].append((f"what size is the {colour} {shape}?", o["size"]))
    out["exists"].append((f"is there a {colour} {shape}?", "yes"))
  for _ in range(8):
    colour, shape = V.COLOURS[int(rng.integers(len(V.COLOURS)))], V.SHAPES[int(rng.integers(len(V.SHAPES)))]
    if _n(objs, colour=colour, shape=shape) == 0:
      out["exists"].append((f"is there a {colour} {shape}?", "no"))
      break
  for a, rel, b in scene["relations"]:
    oa, ob = objs[a], objs[b]
    if _n(objs, colour=ob["colour"], shape=ob["shape"]) != 1:
      continue
    # The answer must be the only object in that relation, also under the most lenient reading.
    related = [o for o in objs if o is not ob and V.relation_holds(o, rel, ob, 0.0)]
    if len(related) == 1:
      out["relation_shape"].append((f"what shape is {rel} the {ob['colour']} {ob['shape']}?", oa["shape"]))
    if _n(objs, colour=oa["colour"], shape=oa["shape"]) == 1:
      subj, obj = f"the {oa['colour']} {oa['shape']}", f"the {ob['colour']} {ob['shape']}"
      out["relation_yes_no"].append((f"is {subj} {rel} {obj}?", "yes"))
      opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
      if not V.relation_holds(oa, opposite, ob, 0.0):
        out["relation_yes_no"].append((f"is {subj} {opposite} {obj}?", "no"))
  return out


def _words(words) -> str:
  return "|".join(sorted(words, key=len, reverse=True))


_SHAPE, _COLOUR, _REL = _words(V.SHAPES), _words(V.COLOURS), _words(V.RELATIONS)
_OBJECT = f"the (?:{_COLOUR}) (?:{_SHAPE})"
# The templates of ``_candidates``, one pattern per question type.
_PATTERNS = {
    "count_all": "how many shapes are there",
    "count_shape": f"how many (?:{_words(V.PLURAL_OF[s] for s in V.SHAPES)}) are there",
    "count_colour": f"how many (?:{_COLOUR}) shapes are there",
    "colour_of": f"what colour is the (?:{_SHAPE})",
    "shape_of": f"what shape is the (?:{_COLOUR}) object",
    "size_of": f"what size is {_OBJECT}",
    "exists": f"is there a (?:{_COLOUR}) (?:{_SHAPE})",
    "relation_shape": f"what shape is (?:{_REL}) {_OBJECT}",
    "relation_yes_no": f"is {_OBJECT} (?:{_REL}) {_OBJECT}",
    "background": "what pattern is the background",
}
_TYPE_OF = [(t, re.compile(p + r"\?")) for t, p in _PATTERNS.items()]


def question_type(question: str) -> str:
  """The ``QUESTION_TYPES`` entry of a question of this world, from its template (the TFDS dataset stores the
  questions and answers only); ValueError for a question no template makes."""
  for t, pattern in _TYPE_OF:
    if pattern.fullmatch(question):
      return t
  raise ValueError(f"{question!r} is not a question of the captioned-scenes world (no template matches it)")


def questions(scene: Mapping[str, Any] | str, rng: np.random.Generator, n: int = 6) -> list[tuple[str, str]]:
  """Up to ``n`` distinct (question, answer) pairs, at most one per question type while types last."""
  scene = G.load_scene(scene)
  cands = _candidates(scene, rng)
  types = [t for t in QUESTION_TYPES if cands[t]]
  out: list[tuple[str, str]] = []
  for t in rng.permutation(types):
    out.append(cands[t][int(rng.integers(len(cands[t])))])
  pool = [qa for t in types for qa in cands[t] if qa not in out]
  for k in rng.permutation(len(pool)):
    if pool[k] not in out:
      out.append(pool[k])
  return out[:n]
