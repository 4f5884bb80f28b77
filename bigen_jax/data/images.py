"""Image files -> uint8 RGB arrays: the one decoder of the feature tool, the evaluators and any serving code.

Every PIL mode is handled on purpose rather than by ``Image.convert("RGB")``, which clips 16-bit data:
  EXIF orientation  applied first (``ImageOps.exif_transpose``), so pixels are upright as a viewer shows them
  I;16 / I;16B / I  16-bit grey is scaled to 8 bits by its high byte (value >> 8: 0 -> 0, 65535 -> 255, and
                    8-bit data stored as 16 bits, v * 257, comes back as v); PIL itself does the same to
                    16-bit-per-channel RGB(A) PNGs. Mode ``I`` (32-bit) must hold values in 0..65535.
  F                 32-bit float has no agreed range: rejected with a DataError naming the file
  LA / La / RGBA / RGBa / PA, and P / L / RGB with a transparent colour (``info["transparency"]``)
                    composited over ``BACKGROUND`` (white), the colour transparent pixels show on a page
  P, 1, L, CMYK, YCbCr, LAB, HSV, RGBX
                    PIL's conversion to RGB (CMYK without its ICC profile: embedded profiles are ignored)
Multi-frame files (GIF, TIFF) give their first frame. A missing or unreadable file raises ``DataError``
naming it.
"""

import concurrent.futures
import io
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from bigen_jax.data.records import DataError

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
# What PIL raises for files it cannot parse (SyntaxError: some plugins' "not a ... file").
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _sixteen_to_eight(img: Image.Image, name: str) -> Image.Image:
  """A 16-bit grey image (``I;16*``, or ``I`` holding 0..65535) -> mode ``L``, value >> 8 (not clipped)."""
  values = np.asarray(img)
  if img.mode == "I":
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
      raise DataError(f"{name}: 32-bit integer image (mode I) with values {lo}..{hi}, outside the 16-bit "
                      "range 0..65535 this decoder scales from; convert it to an 8- or 16-bit image")
  return Image.fromarray((values.astype(np.uint16) >> 8).astype(np.uint8), "L")


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = BACKGROUND, name: str = "image") -> Image.Image:
  """Any PIL image -> an upright mode ``RGB`` image of the same picture (see the module docstring).

  ``name`` (a file name) is used in error messages.
  """
  img = ImageOps.exif_transpose(img)
  if img.mode == "F":
    raise DataError(f"{name}: 32-bit float image (mode F) has no agreed value range; convert it to an 8- or "
                    "16-bit image")
  if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
    img = _sixteen_to_eight(img, name)
  if img.mode in ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("LA").convert("RGBA") if img.mode == "La" else img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, (*background, 255)), rgba).convert("RGB")
  return img.convert("RGB")


def _open(source: str | os.PathLike | bytes, draft: bool, background: tuple[int, int, int],
          name: str | None) -> Image.Image:
  """Opens, decodes and converts ``source``; with ``draft`` JPEGs decode at 1/8 scale (still reading every
  byte, so truncation is found)."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    name = name or "encoded image"
    stream = io.BytesIO(source)
  else:
    path = os.fspath(source)
    name = name or path
    if not os.path.isfile(path):
      raise DataError(f"image {name} does not exist")
    stream = path
  try:
    with Image.open(stream) as im:
      if draft:
        im.draft(None, (1, 1))
      im.load()
      return to_rgb(im, background=background, name=f"image {name}")
  except DataError:
    raise
  except _READ_ERRORS as e:
    raise DataError(f"image {name} cannot be read: {e}") from e


def decode_image(source: str | os.PathLike | bytes, *, background: tuple[int, int, int] = BACKGROUND,
                 name: str | None = None) -> np.ndarray:
  """A file path or encoded bytes -> uint8 [H, W, 3] RGB (upright, 16-bit scaled, alpha composited).

  ``name`` replaces the path (or "encoded image") in error messages.
  """
  return np.asarray(_open(source, False, background, name), dtype=np.uint8)


def check_image(path: str | os.PathLike) -> None:
  """Raises ``DataError`` naming the file if ``decode_image(path)`` would fail; JPEGs are decoded at 1/8
  scale, so this is several times faster than decoding."""
  _open(path, True, BACKGROUND, None)


def find_bad_images(paths: Sequence[str], *, workers: int = 1) -> list[tuple[str, str]]:
  """``(path, reason)`` of every path in ``paths`` that is missing or unreadable, in input order.

  ``workers`` threads check files in parallel (PIL decodes without holding the GIL).
  """

  def reason(path: str) -> str | None:
    try:
      check_image(path)
    except DataError as e:
      return str(e)
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    reasons: Iterable[str | None] = pool.map(reason, paths)
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]
