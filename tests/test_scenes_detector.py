"""The captioned-scenes grid detector: targets, feature shapes, determinism, cached and resumed training."""

import os

import numpy as np
import pytest
import torch

from bigen_jax.features import backbones
from bigen_jax.worlds.scenes import detector as D
from bigen_jax.worlds.scenes import world as scenes

TINY = dict(steps=4, batch_size=4, num_train_scenes=8, width=8, feature_dim=16, eval_scenes=0,
            checkpoint_every=2, log_every=1)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
  """Every parameter and BatchNorm statistic equal (step counters aside: loading does not keep them)."""
  for k, v in a.state_dict().items():
    if not k.endswith("num_batches_tracked"):
      torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def _scene(objects):
  scene = scenes.sample_scene(np.random.default_rng(0))
  return dict(scene, objects=objects)


def test_cell_targets_follow_the_scene_graph():
  # A large red circle centred in cell (row 2, col 5) and nothing else.
  obj = {"shape": "circle", "colour": "red", "size": "large", "x": 5.5 * 16, "y": 2.5 * 16, "r": 19.0,
         "bbox": [0, 0, 0, 0]}
  t = D.cell_targets(_scene([obj]))
  centre_cell = 2 * 8 + 5
  assert t["object"][centre_cell] == 1 and t["coverage"][centre_cell] == pytest.approx(1.0, abs=1e-3)
  assert t["shape"][centre_cell] == 0 and t["colour"][centre_cell] == 0 and t["size"][centre_cell] == 1
  np.testing.assert_allclose(t["centre"][centre_cell], [0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(t["centre"][centre_cell + 1], [-1 / D.CENTRE_RANGE, 0.0], atol=1e-6)
  assert t["radius"][centre_cell] == pytest.approx(19.0 / 16)
  far = 7 * 8 + 0  # bottom-left corner: no object
  assert t["object"][far] == 0 and t["coverage"][far] == 0
  assert t["object"].sum() == 9  # a 38-px circle centred in a cell covers its 3x3 neighbourhood
  assert set(t) == {"object", "shape", "colour", "size", "background", "coverage", "centre", "radius"}


def test_empty_scene_has_no_object_cells():
  t = D.cell_targets(_scene([]))
  assert t["object"].sum() == 0 and (t["background"] == t["background"][0]).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("detector"))
  path, report = D.load_or_train(directory, **TINY)
  return directory, path, report


def test_backbone_shapes_and_determinism(trained):
  _, path, _ = trained
  backbone = backbones.build_backbone("scenes_detector", weights=path)
  images = np.stack([scenes.render(scenes.sample_scene(np.random.default_rng(i))) for i in range(3)])
  a, b = backbone(images), backbone(images)
  assert a.shape == (3, 64, TINY["feature_dim"]) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(backbone(images[1:2])[0], a[1], atol=1e-5)  # batch-independent (eval-mode BN)
  cfg = backbone.config()
  assert cfg["name"] == "scenes_detector" and cfg["feature_dim"] == TINY["feature_dim"] and cfg["weights_sha256"]


def test_gated_logits_keep_object_cells_and_collapse_empty_ones(trained):
  _, path, _ = trained
  images = np.stack([scenes.render(scenes.sample_scene(np.random.default_rng(i))) for i in range(3)])
  nets = [backbones.build_backbone("scenes_detector", weights=path, layer=layer) for layer in ("logits",
                                                                                           "gated_logits")]
  logits = nets[0](images)
  says_object = logits[..., 1] - logits[..., 0]
  for net in nets:  # the 4-step net calls every cell one thing: move its threshold so that it says both
    with torch.no_grad():
      net.net.heads.bias[1] -= float(np.median(says_object))
  logits, gated = nets[0](images), nets[1](images)
  assert gated.shape == logits.shape == (3, 64, 27)
  widths = dict(D.CLASS_HEADS)
  start = {name: sum(w for n, w in (D.CLASS_HEADS + D.REGRESSION_HEADS)[:i])
           for i, (name, _) in enumerate(D.CLASS_HEADS + D.REGRESSION_HEADS)}
  part = lambda x, name: x[..., start[name]:start[name] + widths[name]]
  empty = part(logits, "object").argmax(-1) == 0
  assert 0.3 < empty.mean() < 0.7
  np.testing.assert_array_equal(gated[~empty], logits[~empty])
  kinds = part(logits, "background").argmax(-1)[empty]
  expected = D.empty_cell_logits(torch.from_numpy(kinds)).numpy()
  np.testing.assert_array_equal(gated[empty], expected)
  assert len(np.unique(gated[empty], axis=0)) == len(np.unique(kinds))  # one vector per background type
  assert (part(gated, "object")[empty].argmax(-1) == 0).all()


def test_training_is_deterministic_and_cached(trained):
  directory, path, report = trained
  assert os.path.exists(path) and report["complete"]
  again, _ = D.train_detector(None, **TINY)
  _same_weights(D.load_detector(path)[0], again)
  cached_path, cached = D.load_or_train(directory, **TINY)  # a second call loads the file
  assert cached_path == path and cached["train_seconds"] == report["train_seconds"]


def test_interrupted_training_resumes_exactly(trained, tmp_path):
  _, path, _ = trained
  part_path, part = D.load_or_train(str(tmp_path), stop_at=2, **TINY)
  assert part_path == "" and not part["complete"]
  checkpoint = D.detector_path(str(tmp_path), **TINY) + D.TRAINING_SUFFIX
  assert os.path.exists(checkpoint)
  resumed_path, report = D.load_or_train(str(tmp_path), **TINY)
  assert report["resumed_from"] == 2 and report["complete"]
  assert not os.path.exists(checkpoint)
  _same_weights(D.load_detector(path)[0], D.load_detector(resumed_path)[0])


def test_missing_weights_are_named(tmp_path):
  with pytest.raises(backbones.WeightsError, match="needs --weights"):
    backbones.build_backbone("scenes_detector")
  with pytest.raises(backbones.WeightsError, match="does not exist"):
    backbones.build_backbone("scenes_detector", weights=str(tmp_path / "nope.pt"))
