"""The one image decoder (``data.images``): 16-bit scaling, palette, alpha compositing, CMYK, EXIF orientation."""

import io

import numpy as np
from PIL import Image
import pytest

from bigen_jax.data import coco
from bigen_jax.data import images
from bigen_jax.data import records

# Both the decoder and the COCO reader built on it (the feature tool's path) must decode the same way.
DECODERS = [images.decode_image, coco.load_image]


def _save(tmp_path, name, img, **kw):
  path = tmp_path / name
  img.save(path, **kw)
  return str(path)


@pytest.mark.parametrize("decode", DECODERS)
def test_sixteen_bit_grey_is_scaled_by_its_high_byte(tmp_path, decode):
  values = np.linspace(0, 65535, 12 * 20).round().astype(np.uint16).reshape(12, 20)
  path = _save(tmp_path, "sixteen.png", Image.fromarray(values))
  assert Image.open(path).mode == "I;16"
  got = decode(path)
  assert got.dtype == np.uint8 and got.shape == (12, 20, 3)
  want = (values >> 8).astype(np.uint8)  # value >> 8: 0 -> 0, 65535 -> 255
  np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, -1))
  assert abs(got.mean() - 127.5) < 0.6 and (got == 255).mean() < 0.01  # not clipped to white
  eight_bit = np.arange(256, dtype=np.uint16).reshape(16, 16)  # 8-bit data stored as 16 bits comes back exact
  path = _save(tmp_path, "eight_as_sixteen.png", Image.fromarray(eight_bit * 257))
  np.testing.assert_array_equal(decode(path)[..., 0], eight_bit)


def test_sixteen_bit_big_endian_and_32_bit_modes():
  values = np.array([[0, 256, 40000, 65535]], np.uint16)
  big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
  assert np.asarray(images.to_rgb(big))[0, :, 0].tolist() == [0, 1, 156, 255]
  wide = Image.fromarray(values.astype(np.int32), "I")
  assert np.asarray(images.to_rgb(wide))[0, :, 0].tolist() == [0, 1, 156, 255]
  with pytest.raises(records.DataError, match=r"x\.tif: 32-bit integer image \(mode I\) with values 0\.\.70000"):
    images.to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32), "I"), name="x.tif")
  with pytest.raises(records.DataError, match=r"y\.tif: 32-bit float image \(mode F\)"):
    images.to_rgb(Image.new("F", (2, 2)), name="y.tif")


def test_palette_with_and_without_transparency(tmp_path):
  index = np.array([[0, 1], [2, 1]], np.uint8)
  palette = [10, 20, 30, 200, 100, 50, 0, 0, 255] + [0] * (256 * 3 - 9)
  img = Image.fromarray(index, "P")
  img.putpalette(palette)
  path = _save(tmp_path, "palette.png", img)
  assert Image.open(path).mode == "P"
  colours = np.array(palette[:9]).reshape(3, 3)
  np.testing.assert_array_equal(images.decode_image(path), colours[index])
  path = _save(tmp_path, "palette_trns.png", img, transparency=1)  # colour 1 is transparent
  want = colours[index]
  want[index == 1] = images.BACKGROUND
  for decode in DECODERS:
    np.testing.assert_array_equal(decode(path), want)


@pytest.mark.parametrize("decode", DECODERS)
def test_alpha_is_composited_on_white(tmp_path, decode):
  alpha = np.array([[0, 128, 255]], np.uint8)
  la = Image.fromarray(np.stack([np.full((1, 3), 100, np.uint8), alpha], -1), "LA")
  got = decode(_save(tmp_path, "la.png", la))
  a = alpha / 255.0
  want = np.round(100 * a + 255 * (1 - a))  # 255 (transparent), 177, 100 (opaque)
  np.testing.assert_allclose(got[0], np.repeat(want[0][:, None], 3, -1), atol=1)
  rgb = np.array([[[0, 0, 0], [200, 40, 0], [30, 60, 90]]], np.uint8)
  rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
  got = decode(_save(tmp_path, "rgba.png", rgba))
  np.testing.assert_allclose(got, np.round(rgb * a[..., None] + 255 * (1 - a[..., None])), atol=1)
  assert got[0, 0].tolist() == [255, 255, 255]  # a transparent black pixel shows the background, not black


def test_cmyk_jpeg(tmp_path):
  rgb = np.zeros((16, 16, 3), np.uint8)
  rgb[:, :8] = (220, 40, 30)
  rgb[:, 8:] = (250, 250, 250)
  path = _save(tmp_path, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
  assert Image.open(path).mode == "CMYK"
  got = images.decode_image(path)
  assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - rgb).mean() < 6  # not inverted: JPEG loss only


@pytest.mark.parametrize("decode", DECODERS)
def test_exif_orientation_is_applied(tmp_path, decode):
  stored = np.zeros((16, 32, 3), np.uint8)  # 16 rows x 32 columns: left half red, right half blue
  stored[:, :16] = (255, 0, 0)
  stored[:, 16:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation 6: shown rotated 90 degrees clockwise
  path = _save(tmp_path, "rotated.jpg", Image.fromarray(stored), exif=exif, quality=95)
  got = decode(path)
  assert got.shape == (32, 16, 3)  # upright: the stored left edge is now the top
  assert (np.abs(got[:14].astype(int) - (255, 0, 0)).max(-1) < 40).all()
  assert (np.abs(got[18:].astype(int) - (0, 0, 255)).max(-1) < 40).all()


def test_bytes_and_errors_name_the_file(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(np.full((3, 4), 9, np.uint8)).save(buf, format="PNG")
  assert images.decode_image(buf.getvalue()).shape == (3, 4, 3)
  with pytest.raises(records.DataError, match="image record 7 cannot be read"):
    images.decode_image(b"not an image", name="record 7")
  with pytest.raises(records.DataError, match="nope.png does not exist"):
    images.decode_image(str(tmp_path / "nope.png"))


def test_find_bad_images(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  good = _save(tmp_path, "good.jpg", Image.fromarray(rgb))
  data = open(good, "rb").read()
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(data[:len(data) // 2])
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  missing = str(tmp_path / "missing.jpg")
  images.check_image(good)
  with pytest.raises(records.DataError, match="truncated.jpg cannot be read: image file is truncated"):
    images.check_image(truncated)
  bad = images.find_bad_images([good, str(truncated), missing, str(empty), good], workers=2)
  assert [p for p, _ in bad] == [str(truncated), missing, str(empty)]
  assert "does not exist" in bad[1][1] and "cannot be read" in bad[2][1]
