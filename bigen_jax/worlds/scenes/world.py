"""The captioned-scenes world: a seeded, procedurally generated image–caption dataset (the embedded default).

Each image shows 1–4 non-overlapping shapes (7 shapes, 8 colours, 2 sizes) on a textured background. Its scene
graph (JSON-serialisable) is::

  {"image_size": 128, "relation_margin": 8.0, "render_seed": int,
   "background": {"type": "striped", "colour": [r, g, b], "tint": [r, g, b], "angle", "strength", "period",
                  "pattern_angle", "amplitude", "noise"},
   "objects": [{"shape": "circle", "colour": "red", "size": "large", "x": cx, "y": cy, "r": radius,
                "bbox": [x1, y1, x2, y2]}, ...],            # pixels, tight box
   "relations": [[subject, "left of", object], ...]}        # every relation that holds (``relation_holds``)

An example (``make_example``) depends only on (seed, split, index), so any one can be regenerated alone, and
so can the scene graphs of a named dataset's records (``scene_graphs``). The named datasets (``DATASETS``) are the
TFDS builder's configs (``tfds_builder``, the one module of the world that needs TensorFlow).
"""

import dataclasses
import json
import zlib
from typing import Any, Sequence

import numpy as np

from bigen_jax.worlds.scenes import lexicon as V
from bigen_jax.worlds.scenes.captions import captions
from bigen_jax.worlds.scenes.grammar import check_caption, hard_negatives, parse_caption
from bigen_jax.worlds.scenes.lexicon import (BACKGROUNDS, COLOURS, MAX_WORDS, NEGATIVE_CATEGORIES, NUMBERS,
                                              RELATIONS, SHAPES, SIZES)
from bigen_jax.worlds.scenes.qa import ANSWERS, questions
from bigen_jax.worlds.scenes.render import BACKGROUND_RGB, render, unit_extent

__all__ = ["SceneConfig", "sample_scene", "render", "captions", "check_caption", "parse_caption",
           "hard_negatives", "questions", "make_example", "example_rng", "image_id", "SHAPES",
           "COLOURS", "SIZES", "NUMBERS", "RELATIONS", "BACKGROUNDS", "ANSWERS", "NEGATIVE_CATEGORIES",
           "MAX_WORDS", "SPLITS", "DatasetConfig", "DATASETS", "scene_graphs"]

SPLITS = ("train", "validation", "test")
IMAGE_ID_STRIDE = 10_000_000  # image_id = split position * stride + index: unique across splits
# Object side lengths in pixels at 128 px (scaled with the image size).
SIZE_RANGE = {"small": (18.0, 24.0), "large": (34.0, 44.0)}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """What scenes look like. ``relation_margin`` (pixels) defaults to image_size / 16."""
  image_size: int = 128
  min_objects: int = 1
  max_objects: int = 4
  num_captions: int = 5
  num_questions: int = 6
  duplicate_prob: float = 0.35  # chance that an object repeats a previous one's shape and/or colour
  relation_margin: float | None = None
  seed: int = 0


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of one example, from (seed, split, index) alone."""
  return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def image_id(split: str, index: int) -> int:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return SPLITS.index(split) * IMAGE_ID_STRIDE + int(index)


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator, scale: float) -> dict[str, Any]:
  base, tint = rng.choice(len(BACKGROUND_RGB), size=2, replace=False)
  kind = _pick(rng, BACKGROUNDS)
  return {"type": kind, "colour": list(BACKGROUND_RGB[base]), "tint": list(BACKGROUND_RGB[tint]),
          "angle": float(rng.integers(0, 360)), "strength": round(float(rng.uniform(0.3, 0.9)), 3),
          "period": round(float(rng.uniform(8.0, 16.0) * scale), 2),
          "pattern_angle": float(_pick(rng, (0, 45, 90, 135))),
          "amplitude": round(float(rng.uniform(10.0, 18.0) if kind != "dotted" else rng.uniform(25.0, 35.0))
                             * _pick(rng, (-1, 1)), 2),
          "noise": round(float(rng.uniform(3.0, 7.0)), 2)}


def _place(rng: np.random.Generator, r: float, boxes: list[tuple[float, ...]], size: int, gap: float,
           tries: int = 100) -> tuple[float, float] | None:
  """Rejection-samples a centre whose box (side 2r) keeps ``gap`` pixels from every other box."""
  for _ in range(tries):
    x, y = rng.uniform(r + gap, size - r - gap, size=2)
    if all(x + r + gap <= b[0] or b[2] + gap <= x - r or y + r + gap <= b[1] or b[3] + gap <= y - r
           for b in boxes):
      return float(x), float(y)
  return None


def sample_scene(rng: np.random.Generator, cfg: SceneConfig = SceneConfig()) -> dict[str, Any]:
  """Draws one scene graph (see the module docstring). Objects that find no free place are left out."""
  size = int(cfg.image_size)
  scale = size / 128.0
  margin = cfg.relation_margin if cfg.relation_margin is not None else size / 16.0
  objects: list[dict[str, Any]] = []
  boxes: list[tuple[float, ...]] = []
  for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
    shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
    if objects and rng.random() < cfg.duplicate_prob:
      prev, mode = _pick(rng, objects), _pick(rng, ("both", "both", "shape", "colour"))
      shape = prev["shape"] if mode != "colour" else shape
      colour = prev["colour"] if mode != "shape" else colour
    size_word = _pick(rng, SIZES)
    r = round(float(rng.uniform(*SIZE_RANGE[size_word])) * scale / 2, 2)
    centre = _place(rng, r, boxes, size, gap=2.0 * scale)
    if centre is None:
      continue
    x, y = round(centre[0], 2), round(centre[1], 2)
    ex = unit_extent(shape)
    objects.append({"shape": shape, "colour": colour, "size": size_word, "x": x, "y": y, "r": r,
                    "bbox": [round(x + ex[0] * r, 2), round(y + ex[1] * r, 2), round(x + ex[2] * r, 2),
                             round(y + ex[3] * r, 2)]})
    boxes.append((x - r, y - r, x + r, y + r))
  relations = [[a, rel, b] for a in range(len(objects)) for b in range(len(objects)) if a != b
               for rel in RELATIONS if V.relation_holds(objects[a], rel, objects[b], margin)]
  return {"image_size": size, "relation_margin": float(margin), "render_seed": int(rng.integers(2**31)),
          "background": _background(rng, scale), "objects": objects, "relations": relations}


def make_example(index: int, cfg: SceneConfig = SceneConfig(), *, split: str = "train") -> dict[str, Any]:
  """Everything for one image, a source dict: image_id, key, image [S, S, 3] uint8, captions (list),
  scene_graph (JSON), hard_negatives [{caption, category, negative}], qa [{question, answer}]."""
  rng = example_rng(cfg.seed, split, index)
  scene = sample_scene(rng, cfg)
  caps = captions(scene, rng, n=cfg.num_captions)
  negs = [{"caption": c, "category": cat, "negative": neg}
          for c in caps for cat, neg in hard_negatives(c, scene, rng)]
  qa = [{"question": q, "answer": a} for q, a in questions(scene, rng, n=cfg.num_questions)]
  return {"image_id": image_id(split, index), "key": f"scenes/{split}/{index:06d}", "image": render(scene),
          "captions": caps, "scene_graph": json.dumps(scene, sort_keys=True), "hard_negatives": negs, "qa": qa}


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Split sizes and scene settings of one prepared variant of the dataset."""
  description: str = ""
  num_train: int = 2000
  num_validation: int = 250
  num_test: int = 250
  image_size: int = 128
  min_objects: int = 1
  max_objects: int = 4
  seed: int = 0

  def scene_config(self) -> SceneConfig:
    return SceneConfig(image_size=self.image_size, min_objects=self.min_objects, max_objects=self.max_objects,
                       seed=self.seed)

  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


DATASETS = {
    "demo": DatasetConfig(description="2000/250/250 scenes at 128 px"),
    "tiny": DatasetConfig(description="64/16/16 scenes at 64 px (tests)", num_train=64, num_validation=16,
                          num_test=16, image_size=64),
    "large": DatasetConfig(description="50000/5000/5000 scenes at 128 px", num_train=50000, num_validation=5000,
                           num_test=5000),
}


def scene_graphs(dataset: str, split: str, indices: Sequence[int]) -> list[dict[str, Any]]:
  """Ground-truth scene graphs of the examples ``indices`` of ``split`` of the named dataset (``DATASETS``),
  regenerated from its seed."""
  cfg = DATASETS[dataset].scene_config()
  return [sample_scene(example_rng(cfg.seed, split, int(i)), cfg) for i in indices]
