"""Pictures worth looking at: captioned image grids and k-means token maps, written as PNG."""

import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(k: int, seed: int = 0) -> np.ndarray:
  """A fixed random colour per cluster id, [k, 3] uint8 (bright enough to read ids on)."""
  rng = np.random.default_rng(seed)
  return rng.integers(40, 256, size=(k, 3), dtype=np.uint8)


def token_map(cluster_ids: np.ndarray, k: int, *, size: int, grid: int = 8) -> np.ndarray:
  """Colours each grid cell by its cluster id and writes the id in it: [64] ids → [size, size, 3] uint8."""
  ids = np.asarray(cluster_ids).reshape(grid, grid)
  cells = palette(k)[ids]
  img = Image.fromarray(cells).resize((size, size), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  step = size / grid
  font = ImageFont.load_default()
  for i in range(grid):
    for j in range(grid):
      draw.text((j * step + 1, i * step + 1), str(ids[i, j]), fill=(0, 0, 0), font=font)
  return np.asarray(img)


def captioned_grid(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str], *,
                   tile: int = 160, text_height: int = 64, wrap: int = 48) -> Image.Image:
  """Lays out rows of equally-sized tiles (e.g. image | token map) with a caption block under each row."""
  ncols = max(len(r) for r in rows)
  width = ncols * tile
  row_h = tile + text_height
  sheet = Image.new("RGB", (width, row_h * len(rows)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default()
  for r, (tiles, caption) in enumerate(zip(rows, captions)):
    for c, arr in enumerate(tiles):
      im = Image.fromarray(np.asarray(arr, np.uint8)).resize((tile, tile), Image.NEAREST)
      sheet.paste(im, (c * tile, r * row_h))
    lines = textwrap.wrap(caption, wrap * ncols // 2 or wrap)
    for n, line in enumerate(lines[: text_height // 11]):
      draw.text((4, r * row_h + tile + 2 + 11 * n), line, fill=(0, 0, 0), font=font)
  return sheet


def side_by_side(sheets: Sequence[Image.Image], gap: int = 8) -> Image.Image:
  """Places PIL images left to right (the blocks of a contact sheet)."""
  width = sum(s.width for s in sheets) + gap * (len(sheets) - 1)
  height = max(s.height for s in sheets)
  out = Image.new("RGB", (width, height), (255, 255, 255))
  x = 0
  for s in sheets:
    out.paste(s, (x, 0))
    x += s.width + gap
  return out


def save_png(image: Image.Image, path: str) -> str:
  """Writes atomically so an interrupted demo never leaves half a picture."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  image.save(tmp)
  os.replace(tmp, path)
  return path


def loss_curves(rows: Sequence[dict], path: str, *, keys: Sequence[str] | None = None) -> str:
  """Plots the logged scalars ending in ``/loss`` and ``/accuracy`` (metrics.jsonl rows) against the step:
  one panel for losses, one for accuracies; training and validation curves together. Writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = keys or sorted({k for r in rows for k in r if k.endswith(("/loss", "/accuracy"))})
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, kind in zip(axes, ("loss", "accuracy")):
    for key in [k for k in keys if k.endswith("/" + kind)]:
      points = [(r["step"], r[key]) for r in rows if key in r]
      ax.plot(*zip(*points), label=key, marker="o" if key.startswith("validation") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(kind)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path
