"""Pictures: token maps colour each cell by its id; grids place tiles where they belong."""

import numpy as np
from PIL import Image

from bigen_jax import viz


def test_token_map_colours_cells_by_id():
  ids = np.arange(64) % 5
  img = viz.token_map(ids, 5, size=160)
  assert img.shape == (160, 160, 3)
  pal = viz.palette(5)
  step = 160 // 8
  for cell in (0, 9, 63):
    i, j = divmod(cell, 8)
    corner = img[i * step + step - 2, j * step + step - 2]  # away from the printed digits
    np.testing.assert_array_equal(corner, pal[ids[cell]])


def test_captioned_grid_layout(tmp_path):
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 255
  blue = np.zeros((8, 8, 3), np.uint8)
  blue[..., 2] = 255
  sheet = viz.captioned_grid([[red, blue], [blue, red]], ["a", "b"], tile=32, text_height=20)
  assert sheet.size == (64, 104)
  px = np.asarray(sheet)
  np.testing.assert_array_equal(px[5, 5], [255, 0, 0])
  np.testing.assert_array_equal(px[5, 40], [0, 0, 255])
  np.testing.assert_array_equal(px[52 + 5, 5], [0, 0, 255])
  path = viz.save_png(sheet, str(tmp_path / "g.png"))
  assert np.asarray(Image.open(path)).shape == (104, 64, 3)
