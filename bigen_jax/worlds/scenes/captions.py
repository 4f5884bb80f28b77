"""Writes varied, true captions for a scene graph from templates of the scenes grammar (``scenes_grammar``).

Every template picks objects and words at random and may decline (returns None); each caption it writes is
checked against the scene before use, so a template bug shows up as an error, never as a false caption.
"""

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bigen_jax.worlds.scenes import grammar as G
from bigen_jax.worlds.scenes import lexicon as V

Scene = Mapping[str, Any]
REL_WORDS = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
             "above": ("above",), "below": ("below",)}
FRONT_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _words(desc: Mapping[str, Any], rng: np.random.Generator, plural: bool = False) -> str:
  """Description → "[size] [colour] noun" with a random synonym; a None shape says "shape"/"object"."""
  noun = _pick(rng, V.SYNONYMS.get(desc["shape"], (desc["shape"],))) if desc["shape"] else _pick(
      rng, V.GENERIC_SINGULAR)
  if plural:
    noun = V.PLURAL_OF[noun]
  size = {"small": "small", "large": _pick(rng, ("large", "large", "big")), None: None}[desc["size"]]
  return " ".join(w for w in (size, desc["colour"], noun) if w)


def _describe(objs: Sequence[Scene], k: int, rng: np.random.Generator, *, unique: bool = False
              ) -> dict[str, Any] | None:
  """A random true description of object ``k``; with ``unique``, one that fits no other object."""
  o = objs[k]
  options = [{"size": None, "colour": o["colour"], "shape": o["shape"]},
             {"size": o["size"], "colour": o["colour"], "shape": o["shape"]},
             {"size": None, "colour": None, "shape": o["shape"]},
             {"size": None, "colour": o["colour"], "shape": None},
             {"size": o["size"], "colour": None, "shape": o["shape"]}]
  weights = np.array([0.5, 0.2, 0.12, 0.08, 0.1])
  order = rng.choice(len(options), size=len(options), replace=False, p=weights)
  for idx in order:
    desc = options[idx]
    if not unique or sum(G.fits(other, desc) for other in objs) == 1:
      return desc
  return None


def _bg(scene: Scene, rng: np.random.Generator, p: float = 0.25) -> str:
  return f" on a {scene['background']['type']} background" if rng.random() < p else ""


def _relation(scene: Scene, rng: np.random.Generator) -> tuple[int, str, int] | None:
  """A relation from the graph, preferring the axis along which the two objects are further apart."""
  rels = scene["relations"]
  if not rels:
    return None
  objs = scene["objects"]

  def dominant(r):
    a, rel, b = r
    dx, dy = abs(objs[a]["x"] - objs[b]["x"]), abs(objs[a]["y"] - objs[b]["y"])
    return (dx >= dy) == (rel in ("left of", "right of"))

  best = [r for r in rels if dominant(r)] or rels
  return tuple(_pick(rng, best))


def t_exist(scene: Scene, rng: np.random.Generator) -> str | None:
  objs = scene["objects"]
  desc = _describe(objs, int(rng.integers(len(objs))), rng)
  intro = _pick(rng, ("", "there is ", "a picture of ", "an image of "))
  return f"{intro}a {_words(desc, rng)}{_bg(scene, rng, 0.4)}"


def t_and(scene: Scene, rng: np.random.Generator) -> str | None:
  objs = scene["objects"]
  if len(objs) < 2:
    return None
  a, b = rng.choice(len(objs), size=2, replace=False)
  da, db = _describe(objs, int(a), rng), _describe(objs, int(b), rng)
  intro = _pick(rng, ("", "there is ", "a picture of "))
  return f"{intro}a {_words(da, rng)} and a {_words(db, rng)}"


def t_relation(scene: Scene, rng: np.random.Generator) -> str | None:
  rel = _relation(scene, rng)
  if rel is None:
    return None
  a, r, b = rel
  objs = scene["objects"]
  da, db = _describe(objs, a, rng), _describe(objs, b, rng)
  intro = _pick(rng, ("", "", "there is "))
  return f"{intro}a {_words(da, rng)} {_pick(rng, REL_WORDS[r])} a {_words(db, rng)}"


def t_front(scene: Scene, rng: np.random.Generator) -> str | None:
  rel = _relation(scene, rng)
  if rel is None:
    return None
  a, r, b = rel
  objs = scene["objects"]
  da, db = _describe(objs, a, rng), _describe(objs, b, rng)
  return f"{FRONT_WORDS[r]} a {_words(db, rng)} there is a {_words(da, rng)}"


def t_definite(scene: Scene, rng: np.random.Generator) -> str | None:
  rel = _relation(scene, rng)
  if rel is None:
    return None
  a, r, b = rel
  objs = scene["objects"]
  da, db = _describe(objs, a, rng, unique=True), _describe(objs, b, rng, unique=True)
  if da is None or db is None:
    return None
  return f"the {_words(da, rng)} is {_pick(rng, REL_WORDS[r])} the {_words(db, rng)}"


def t_count(scene: Scene, rng: np.random.Generator) -> str | None:
  """"there are two red circles": exact counts of a colour+shape, a shape or a colour seen at least twice."""
  objs = scene["objects"]
  groups = []
  for keys in (("colour", "shape"), ("shape",), ("colour",)):
    for o in objs:
      desc = {"size": None, "colour": None, "shape": None, **{k: o[k] for k in keys}}
      n = sum(G.fits(other, desc) for other in objs)
      if n >= 2 and desc not in groups:
        groups.append(desc)
  if not groups:
    return None
  desc = _pick(rng, groups)
  n = sum(G.fits(o, desc) for o in objs)
  text = f"{_pick(rng, ('', 'there are '))}{V.NUMBERS[n - 1]} {_words(desc, rng, plural=True)}"
  rest = [k for k, o in enumerate(objs) if not G.fits(o, desc)]
  if rest and rng.random() < 0.5:
    other = _describe(objs, _pick(rng, rest), rng)
    if not any(G.fits(o, other) for o in objs if G.fits(o, desc)):
      return f"{text} and a {_words(other, rng)}"
  return text + _bg(scene, rng)


def t_scene(scene: Scene, rng: np.random.Generator) -> str | None:
  """Scene-level phrasing: "there are three shapes including a red circle", "there is one blue star"."""
  objs = scene["objects"]
  n = len(objs)
  if n == 1:
    desc = _describe(objs, 0, rng)
    return f"there is one {_words(desc, rng)}{_bg(scene, rng, 0.5)}"
  noun = _pick(rng, V.GENERIC_PLURAL)
  text = f"there are {V.NUMBERS[n - 1]} {noun}"
  if rng.random() < 0.6:
    return f"{text} including a {_words(_describe(objs, int(rng.integers(n)), rng), rng)}"
  return text + _bg(scene, rng, 0.6)


TEMPLATES: dict[str, Callable[[Scene, np.random.Generator], str | None]] = {
    "exist": t_exist, "and": t_and, "relation": t_relation, "front": t_front, "definite": t_definite,
    "count": t_count, "scene": t_scene}


def _new_caption(names: Sequence[str], scene: Scene, rng: np.random.Generator, taken: list[str]) -> str | None:
  """One caption from a random template of ``names``, or None if it declined, repeats or is too long."""
  text = TEMPLATES[_pick(rng, names)](scene, rng)
  if text is None or text in taken or len(text.split()) > V.MAX_WORDS:
    return None
  if not G.check_caption(text, scene):
    raise RuntimeError(f"caption template wrote a false caption {text!r} for scene {scene}")
  return text


def captions(scene: Scene | str, rng: np.random.Generator, n: int = 5, *, max_tries: int = 400) -> list[str]:
  """``n`` distinct true captions of at most ``MAX_WORDS`` words: one count/scene-level, one relational
  (when the scene has a relation), the rest from any template; returned in random order."""
  scene = G.load_scene(scene)
  out: list[str] = []
  for names in (("count", "scene"), ("relation", "front", "definite")):
    for _ in range(8):
      text = _new_caption(names, scene, rng, out)
      if text is not None:
        out.append(text)
        break
  for _ in range(max_tries):
    if len(out) >= n:
      break
    text = _new_caption(tuple(TEMPLATES), scene, rng, out)
    if text is not None:
      out.append(text)
  if len(out) < n:
    raise RuntimeError(f"found only {len(out)} distinct captions for scene {scene}")
  return [out[i] for i in rng.permutation(len(out))[:n]]
