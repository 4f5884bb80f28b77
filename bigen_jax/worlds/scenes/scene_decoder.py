"""Cluster ids -> pictures in the captioned-scenes world, through the scenes detector's own heads.

The patch ``preview`` pastes one training cell per cluster; with features that say *what* a cell holds
rather than exactly where its pixels lie, the pasted pieces of one object do not line up. This decoder reads
each grid instead the way the detector was trained to describe it, and draws what it reads:

  1. every cluster centroid goes through the detector's linear heads (``detector``): P(object), shape,
     colour, size, coverage, where the object's centre lies and its radius, background type;
  2. connected object cells of one colour form an object, split where their votes for its centre disagree
     (shape, colour and size by coverage-weighted vote, centre and radius by weighted mean);
  3. the background's type is voted by all cells (its colours are not described: a middle grey is drawn);
  4. the scene graph is drawn by the world's renderer (``world.render``).

It uses nothing of the image but its 64 cluster ids, so it is a token decoder like the preview and the
SPADE generator (issue 13) that replaces both; the world's renderer makes it exact for this world only.
``decode_scenes`` returns the scene graphs, ``render_scenes`` the pictures.
"""

import math
import os
from typing import Any, Mapping

import numpy as np

from bigen_jax.worlds.scenes import render
from bigen_jax.worlds.scenes import world
from bigen_jax.worlds.scenes.lexicon import BACKGROUNDS, COLOURS, SHAPES, SIZES

HEADS_SUFFIX = ".heads.npz"  # written beside the detector's weights by ``detector.save_detector``
GRID = 8
CLASS_HEADS = ("object", "shape", "colour", "size", "background")
SPLIT_RADII = 1.6
# Stripes at 0 degrees on 12-px periods alias with the recogniser's 8-px cells (read as checkered 22% of the
# time); at 45 degrees every type is read back (measured on validation decodes).
_PATTERN = {"period": 12.0, "pattern_angle": 45.0, "amplitude": 14.0, "noise": 5.0}


def load_heads(path: str) -> dict[str, Any]:
  """The detector's heads from ``<detector>.heads.npz``: weight [O, D], bias [O], names, widths, and the
  constants the targets were scaled by (cell size, centre range)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config.eval.generation.scene_decoder_heads={path}: no such file (the scenes "
                            "detector writes <weights>.heads.npz beside its weights)")
  with np.load(path, allow_pickle=False) as f:
    missing = {"weight", "bias", "names", "widths", "cell", "centre_range"} - set(f.files)
    if missing:
      raise ValueError(f"{path} is not a scenes-detector heads file: missing {sorted(missing)}")
    return {k: f[k] for k in f.files}


def cluster_attributes(codebook: np.ndarray, heads: Mapping[str, Any], *, layer: str = "fc6"
                       ) -> dict[str, np.ndarray]:
  """What the detector's heads say of each centroid [K, D]: class heads as probabilities [K, C],
  regressions [K, W].

  ``layer`` is the records' feature layer: "fc6" centroids go through the (linear) heads; "logits" and
  "gated_logits" centroids are already the heads' outputs. Either way a centroid's attributes are the mean
  logits of its cells.
  """
  codebook = np.asarray(codebook, np.float64)
  if layer == "fc6":
    out = codebook @ np.asarray(heads["weight"], np.float64).T + heads["bias"]
  elif layer in ("logits", "gated_logits"):
    out = codebook
  else:
    raise ValueError(f"scene decoder: unknown detector layer {layer!r}: expected 'fc6', 'logits' or "
                     "'gated_logits'")
  attrs, start = {}, 0
  for name, width in zip(heads["names"], heads["widths"]):
    part = out[:, start:start + int(width)]
    start += int(width)
    if str(name) in CLASS_HEADS:
      part = np.exp(part - part.max(-1, keepdims=True))
      part = part / part.sum(-1, keepdims=True)
    attrs[str(name)] = part
  attrs["cell"] = float(heads["cell"])
  attrs["centre_range"] = float(heads["centre_range"])
  return attrs


def _components(is_object: np.ndarray, colour: np.ndarray) -> list[list[int]]:
  """Groups of object cells (8-connected on the grid, same colour), each a list of cell indices."""
  seen, groups = np.zeros(GRID * GRID, bool), []
  for start in np.nonzero(is_object)[0]:
    if seen[start]:
      continue
    stack, group = [start], []
    seen[start] = True
    while stack:
      c = stack.pop()
      group.append(c)
      i, j = divmod(c, GRID)
      for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
          n = (i + di) * GRID + (j + dj)
          if (0 <= i + di < GRID and 0 <= j + dj < GRID and is_object[n] and not seen[n]
              and colour[n] == colour[start]):
            seen[n] = True
            stack.append(n)
    groups.append(group)
  return groups


def _split(cells: list[int], votes: np.ndarray, radius: np.ndarray, weight: np.ndarray) -> list[list[int]]:
  """Splits a component whose cells vote for distant centres (two same-coloured objects side by side):
  greedy, heaviest cell first; a cell joins the first group whose centre is within ``SPLIT_RADII`` of its
  radii (quantised votes scatter: 1.6 radii kept 67% of validation grids' object counts exact at k = 1024,
  against 24% at 1 radius)."""
  groups: list[list[int]] = []
  for c in sorted(cells, key=lambda c: -weight[c]):
    for g in groups:
      centre = np.average(votes[g], axis=0, weights=weight[g])
      if np.hypot(*(votes[c] - centre)) < SPLIT_RADII * max(float(np.average(radius[g], weights=weight[g])), 4.0):
        g.append(c)
        break
    else:
      groups.append([c])
  return groups


def _objects(a: Mapping[str, np.ndarray], attrs: Mapping[str, Any], min_weight: float) -> list[dict[str, Any]]:
  """Object cells of one grid (``a``: attributes of its 64 cells) grouped into objects: connected cells of
  one colour, split where their centre votes disagree."""
  cell = attrs["cell"]
  centres = (np.arange(GRID) + 0.5) * cell
  cy, cx = [v.reshape(-1) for v in np.meshgrid(centres, centres, indexing="ij")]
  is_object = a["object"][:, 1] > 0.5
  weight = np.clip(a["coverage"][:, 0], 0.05, 1.0)
  votes = np.stack([cx, cy], -1) + a["centre"] * attrs["centre_range"] * cell
  radius = np.maximum(a["radius"][:, 0] * cell, 4.0)
  colour = a["colour"].argmax(-1)
  groups = [g for comp in _components(is_object, colour) for g in _split(comp, votes, radius, weight)]
  objects = []
  for g in sorted(groups, key=lambda g: -weight[g].sum()):
    w = weight[g]
    if w.sum() < min_weight:
      continue
    size = SIZES[int(np.argmax(w @ a["size"][g]))]
    lo, hi = world.SIZE_RANGE[size]
    x, y = np.average(votes[g], axis=0, weights=w)
    obj = {"shape": SHAPES[int(np.argmax(w @ a["shape"][g]))], "colour": COLOURS[int(np.argmax(w @ a["colour"][g]))],
           "size": size, "x": float(x), "y": float(y),
           "r": float(np.clip(np.average(radius[g], weights=w), lo / 2, hi / 2))}
    if all(math.hypot(obj["x"] - o["x"], obj["y"] - o["y"]) > max(obj["r"], o["r"]) for o in objects):
      ex = render.unit_extent(obj["shape"])
      obj["bbox"] = [obj["x"] + ex[0] * obj["r"], obj["y"] + ex[1] * obj["r"], obj["x"] + ex[2] * obj["r"],
                     obj["y"] + ex[3] * obj["r"]]
      objects.append(obj)
  return objects


def _background(a: Mapping[str, np.ndarray], size: int) -> dict[str, Any]:
  """The background type by vote (the detector does not describe the background's colours: the world's
  middle tone, plain, is drawn)."""
  kind = BACKGROUNDS[int(np.argmax(a["background"].sum(0)))]
  tone = [float(v) for v in render.BACKGROUND_RGB[0]]
  return {"type": kind, "colour": tone, "tint": tone, "angle": 0.0, "strength": 0.0,
          **_PATTERN, "amplitude": 30.0 if kind == "dotted" else _PATTERN["amplitude"],
          "period": _PATTERN["period"] * size / 128}


def decode_scenes(cluster_ids: np.ndarray, attrs: Mapping[str, Any], *, image_size: int = 128,
                  min_weight: float = 0.25) -> list[dict[str, Any]]:
  """Scene graphs (``world`` format, without relations) read from cluster ids [N, 64].

  ``min_weight``: an object needs at least this much summed cell coverage (drops stray single cells).
  """
  ids = np.asarray(cluster_ids)
  out = []
  for row in ids:
    a = {k: v[row] for k, v in attrs.items() if isinstance(v, np.ndarray)}
    out.append({"image_size": image_size, "relation_margin": image_size / 16.0, "render_seed": 0,
                "background": _background(a, image_size), "objects": _objects(a, attrs, min_weight),
                "relations": []})
  return out


def render_scenes(cluster_ids: np.ndarray, attrs: Mapping[str, Any], **kwargs) -> np.ndarray:
  """Cluster ids [N, 64] -> pictures uint8 [N, S, S, 3] (``decode_scenes`` drawn by ``world.render``)."""
  return np.stack([world.render(s) for s in decode_scenes(cluster_ids, attrs, **kwargs)])
