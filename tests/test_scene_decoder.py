"""The scene decoder reads a grid of cell descriptions back into the scene they came from, and draws it."""

import numpy as np
import pytest

from bigen_jax.worlds.scenes import detector as D
from bigen_jax.worlds.scenes import scene_decoder as SD
from bigen_jax.worlds.scenes import world as scenes

HEADS = {"names": np.array([n for n, _ in D.CLASS_HEADS + D.REGRESSION_HEADS]),
         "widths": np.array([w for _, w in D.CLASS_HEADS + D.REGRESSION_HEADS]),
         "cell": np.float32(D.CELL), "centre_range": np.float32(D.CENTRE_RANGE)}


def _perfect_logits(scene):
  """What a perfect detector's heads would output for each cell of ``scene``: [64, 27] logits."""
  t = D.cell_targets(scene)
  big = 20.0
  parts = []
  for name, width in D.CLASS_HEADS:
    parts.append(big * np.eye(width)[t[name]])
  parts += [t["coverage"][:, None], t["centre"], t["radius"][:, None]]
  return np.concatenate(parts, -1)


@pytest.mark.parametrize("index", range(6))
def test_perfect_cell_descriptions_give_back_the_scene(index):
  scene = scenes.sample_scene(np.random.default_rng([7, index]))
  codebook = _perfect_logits(scene)  # one "cluster" per cell
  attrs = SD.cluster_attributes(codebook, HEADS, layer="logits")
  decoded = SD.decode_scenes(np.arange(64)[None], attrs)[0]
  assert decoded["background"]["type"] == scene["background"]["type"]
  want = sorted((o["shape"], o["colour"], o["size"]) for o in scene["objects"])
  got = sorted((o["shape"], o["colour"], o["size"]) for o in decoded["objects"])
  assert got == want
  for obj in scene["objects"]:
    nearest = min(decoded["objects"], key=lambda o: np.hypot(o["x"] - obj["x"], o["y"] - obj["y"]))
    assert np.hypot(nearest["x"] - obj["x"], nearest["y"] - obj["y"]) < 1.0  # centres are exact votes
    assert (nearest["shape"], nearest["colour"]) == (obj["shape"], obj["colour"])


def test_fc6_layer_applies_the_linear_heads():
  rng = np.random.default_rng(0)
  width = int(HEADS["widths"].sum())
  heads = dict(HEADS, weight=rng.normal(size=(width, 16)), bias=rng.normal(size=width))
  codebook = rng.normal(size=(5, 16))
  via_fc6 = SD.cluster_attributes(codebook, heads, layer="fc6")
  via_logits = SD.cluster_attributes(codebook @ heads["weight"].T + heads["bias"], heads, layer="logits")
  for key in via_fc6:
    np.testing.assert_allclose(via_fc6[key], via_logits[key], rtol=1e-9)
  assert np.allclose(via_fc6["colour"].sum(-1), 1.0)
  with pytest.raises(ValueError, match="layer"):
    SD.cluster_attributes(codebook, heads, layer="fc7")


def test_render_scenes_draws_the_decoded_objects():
  scene = {"image_size": 128, "relation_margin": 8.0, "render_seed": 0, "relations": [],
           "background": {"type": "plain", "colour": [128, 128, 128], "tint": [128, 128, 128], "angle": 0.0,
                          "strength": 0.0, "period": 12.0, "pattern_angle": 45.0, "amplitude": 0.0, "noise": 0.0},
           "objects": [{"shape": "square", "colour": "red", "size": "large", "x": 40.0, "y": 40.0, "r": 19.0,
                        "bbox": [0, 0, 0, 0]}]}
  attrs = SD.cluster_attributes(_perfect_logits(scene), HEADS, layer="logits")
  image = SD.render_scenes(np.arange(64)[None], attrs)[0]
  assert image.shape == (128, 128, 3) and image.dtype == np.uint8
  red = np.array([215, 38, 38])
  assert np.abs(image[40, 40].astype(int) - red).max() < 30  # the square's centre is red
  assert np.abs(image[110, 110].astype(int) - red).max() > 60  # far from it is background


def test_heads_file_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="scene_decoder_heads"):
    SD.load_heads(str(tmp_path / "nope.heads.npz"))
  bad = tmp_path / "bad.heads.npz"
  np.savez(bad, weight=np.zeros((2, 2)))
  with pytest.raises(ValueError, match="missing"):
    SD.load_heads(str(bad))
