"""Pictures worth looking at: captioned image grids and k-means token maps, written as PNG."""

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bigen_jax import fileio


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


Paragraph = tuple[str, tuple[int, int, int]]  # (text, RGB colour)


def wrap_text(text: str, *, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
  """``text`` broken into lines at most ``width`` pixels wide in ``font``; nothing is dropped (a word wider
  than a line is split across lines), so joining the lines gives back every word."""
  lines, line = [], ""
  for word in text.split():
    while len(word) > 1 and font.getlength(word) > width:
      cut = max([n for n in range(1, len(word)) if font.getlength(word[:n]) <= width], default=1)
      lines += [line, word[:cut]] if line else [word[:cut]]
      line, word = "", word[cut:]
    candidate = f"{line} {word}" if line else word
    if line and font.getlength(candidate) > width:
      lines.append(line)
      candidate = word
    line = candidate
  return lines + [line] if line else lines


def text_block(paragraphs: Sequence[Paragraph], *, width: int, font_size: int = 12, pad: int = 4
               ) -> Image.Image:
  """Paragraphs (text, colour) wrapped to ``width`` pixels and stacked, as an RGB image ``width`` wide and
  as tall as its lines need (``pad`` + lines x line height + ``pad``): no text is ever cut off."""
  font = ImageFont.load_default(size=font_size)
  line_h = sum(font.getmetrics())
  lines = [(line, colour) for text, colour in paragraphs
           for line in wrap_text(text, width=width - 2 * pad, font=font)]
  block = Image.new("RGB", (width, 2 * pad + line_h * len(lines)), (255, 255, 255))
  draw = ImageDraw.Draw(block)
  for n, (line, colour) in enumerate(lines):
    draw.text((pad, pad + n * line_h), line, fill=tuple(colour), font=font)
  return block


def caption_cards(images: Sequence[np.ndarray], paragraphs: Sequence[Sequence[Paragraph]], *, tile: int = 192,
                  columns: int = 4, gap: int = 8, font_size: int = 12) -> Image.Image:
  """Cards of image i ([h, w, 3] uint8, drawn ``tile`` x ``tile``) above its ``text_block`` of
  ``paragraphs[i]``, ``columns`` cards a row; each row is as tall as its tallest card."""
  blocks = [text_block(p, width=tile, font_size=font_size) for p in paragraphs]
  rows = [range(start, min(start + columns, len(images))) for start in range(0, len(images), columns)]
  heights = [tile + max(blocks[i].height for i in row) for row in rows]
  ncols = min(columns, len(images))
  sheet = Image.new("RGB", (ncols * tile + (ncols - 1) * gap, sum(heights) + gap * (len(rows) - 1)),
                    (255, 255, 255))
  y = 0
  for row, height in zip(rows, heights):
    for c, i in enumerate(row):
      x = c * (tile + gap)
      sheet.paste(Image.fromarray(np.asarray(images[i], np.uint8)).resize((tile, tile), Image.NEAREST), (x, y))
      sheet.paste(blocks[i], (x, y + tile))
    y += height + gap
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
  """Writes atomically (``fileio.open_atomic``: local or a URL) so an interrupted demo never leaves half a
  picture."""
  with fileio.open_atomic(path) as f:
    image.save(f, format="PNG")
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
  with fileio.open_atomic(path) as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return path
