"""Draws a captioned-scenes scene graph: textured background, anti-aliased flat-coloured shapes, sensor noise.

Everything the picture needs (positions, background parameters, the noise seed) is in the scene graph, so
``render(scene)`` gives the same bytes for the same graph, also after a JSON round trip.
"""

import math
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

COLOUR_RGB = {
    "red": (215, 38, 38), "green": (36, 165, 60), "blue": (40, 78, 225), "yellow": (240, 214, 30),
    "purple": (136, 56, 186), "cyan": (40, 205, 215), "white": (245, 245, 245), "black": (22, 22, 22),
}
# Muted mid-tones, so that every object colour stands out from every background.
BACKGROUND_RGB = ((128, 128, 128), (152, 140, 116), (98, 112, 130), (120, 138, 110), (140, 116, 128))
SUPERSAMPLE = 4


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
  out = []
  for k in range(2 * points):
    rad = 1.0 if k % 2 == 0 else inner
    a = -math.pi / 2 + k * math.pi / points
    out.append((rad * math.cos(a), rad * math.sin(a)))
  return tuple(out)


def _regular(sides: int, start: float) -> tuple[tuple[float, float], ...]:
  return tuple((math.cos(start + 2 * math.pi * k / sides), math.sin(start + 2 * math.pi * k / sides))
               for k in range(sides))


_W = 0.34  # half-width of the cross's arms
# Unit outlines (radius 1 about the centre, y down); the circle is drawn as an ellipse of radius 0.95.
UNIT_POLYGONS = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)),
    "star": _star(),
    "diamond": ((0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0)),
    "cross": ((-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W),
              (-1, _W), (-1, -_W), (-_W, -_W)),
    "hexagon": _regular(6, 0.0),
}
CIRCLE_RADIUS = 0.95


def unit_extent(shape: str) -> tuple[float, float, float, float]:
  """Tight box (x1, y1, x2, y2) of a shape of radius 1 centred at the origin."""
  if shape == "circle":
    return (-CIRCLE_RADIUS, -CIRCLE_RADIUS, CIRCLE_RADIUS, CIRCLE_RADIUS)
  xs, ys = zip(*UNIT_POLYGONS[shape])
  return (min(xs), min(ys), max(xs), max(ys))


def _alpha(obj: Mapping[str, Any], size: int) -> tuple[int, int, np.ndarray]:
  """Coverage of one object over its box: (x0, y0, alpha [h, w] float32 in [0, 1])."""
  cx, cy, r = obj["x"], obj["y"], obj["r"]
  x0, y0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
  x1, y1 = min(int(math.ceil(cx + r)) + 1, size), min(int(math.ceil(cy + r)) + 1, size)
  w, h, s = x1 - x0, y1 - y0, SUPERSAMPLE
  mask = Image.new("L", (w * s, h * s), 0)
  draw = ImageDraw.Draw(mask)
  px, py = (cx - x0) * s, (cy - y0) * s
  if obj["shape"] == "circle":
    rc = CIRCLE_RADIUS * r * s
    draw.ellipse((px - rc, py - rc, px + rc, py + rc), fill=255)
  else:
    draw.polygon([(px + u * r * s, py + v * r * s) for u, v in UNIT_POLYGONS[obj["shape"]]], fill=255)
  alpha = np.asarray(mask.resize((w, h), Image.BOX), np.float32) / 255.0
  return x0, y0, alpha


def background(bg: Mapping[str, Any], size: int) -> np.ndarray:
  """Gradient between two tones plus a low-contrast pattern: [size, size, 3] float32 in 0..255."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  base, tint = np.asarray(bg["colour"], np.float32), np.asarray(bg["tint"], np.float32)
  a = math.radians(bg["angle"])
  t = (xx * math.cos(a) + yy * math.sin(a)) / size
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6) * bg["strength"]
  img = base + (tint - base) * t[..., None]
  period = bg["period"]
  kind = bg["type"]
  if kind == "striped":
    pa = math.radians(bg["pattern_angle"])
    pattern = np.sign(np.sin(2 * math.pi * (xx * math.cos(pa) + yy * math.sin(pa)) / period))
  elif kind == "checkered":
    pattern = ((np.floor(xx / period) + np.floor(yy / period)) % 2) * 2 - 1
  elif kind == "dotted":
    dx, dy = (xx % period) - period / 2, (yy % period) - period / 2
    pattern = (np.hypot(dx, dy) < period * 0.18).astype(np.float32)
  elif kind == "plain":
    pattern = np.zeros_like(xx)
  else:
    raise ValueError(f"unknown background type {kind!r}")
  return img + bg["amplitude"] * pattern[..., None]


def render(scene: Mapping[str, Any], cfg: Any = None) -> np.ndarray:
  """Scene graph → image, [image_size, image_size, 3] uint8. ``cfg`` is accepted for symmetry and unused."""
  del cfg
  size = int(scene["image_size"])
  img = background(scene["background"], size)
  for obj in scene["objects"]:
    x0, y0, alpha = _alpha(obj, size)
    h, w = alpha.shape
    patch = img[y0:y0 + h, x0:x0 + w]
    colour = np.asarray(COLOUR_RGB[obj["colour"]], np.float32)
    patch += alpha[..., None] * (colour - patch)
  rng = np.random.default_rng(scene["render_seed"])
  img += rng.standard_normal(img.shape, dtype=np.float32) * scene["background"]["noise"]
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)
