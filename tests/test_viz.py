"""Pictures: token maps colour each cell by its id; grids place tiles where they belong."""

import numpy as np
from PIL import Image, ImageFont

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


def test_wrap_text_keeps_every_word_within_the_width():
  font = ImageFont.load_default(size=12)
  text = "a small red circle is to the left of " * 6 + "x" * 80
  lines = viz.wrap_text(text, width=100, font=font)
  assert " ".join(line for line in lines if "x" not in line).split() == text.split()[:-1]
  assert "".join(line for line in lines if "x" in line) == "x" * 80  # a word wider than a line is split
  assert all(font.getlength(line) <= 100 for line in lines)
  assert len(lines) > 6


def test_caption_blocks_grow_to_fit_the_whole_caption():
  short = [("a red circle", (0, 0, 0))]
  long = [("a red circle above two small blue squares and " * 8, (0, 0, 0)), ("FALSE", (200, 0, 0))]
  short_block, long_block = viz.text_block(short, width=160), viz.text_block(long, width=160)
  assert long_block.size[0] == short_block.size[0] == 160
  assert long_block.size[1] > 5 * short_block.size[1]
  px = np.asarray(long_block).astype(int)
  line_h = short_block.size[1] - 8
  last = px[-4 - line_h:-4]  # the last line (the verdict) is drawn, in its colour
  assert ((last[..., 0] > 100) & (last[..., 1] < 60)).any()
  assert not ((px[:-4 - line_h, :, 0] > 100) & (px[:-4 - line_h, :, 1] < 60)).any()


def test_caption_cards_layout():
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 255
  blue = np.zeros((8, 8, 3), np.uint8)
  blue[..., 2] = 255
  texts = [[("a", (0, 0, 0))], [("b " * 40, (0, 0, 0))], [("c", (0, 0, 0))]]
  sheet = viz.caption_cards([red, blue, red], texts, tile=32, columns=2, gap=4)
  heights = [viz.text_block(t, width=32).size[1] for t in texts]
  assert sheet.size == (2 * 32 + 4, 32 + max(heights[:2]) + 4 + 32 + heights[2])
  px = np.asarray(sheet)
  np.testing.assert_array_equal(px[5, 5], [255, 0, 0])
  np.testing.assert_array_equal(px[5, 36 + 5], [0, 0, 255])
  second_row = 32 + max(heights[:2]) + 4
  np.testing.assert_array_equal(px[second_row + 5, 5], [255, 0, 0])
