"""torchvision inception_v3 -> Flax InceptionV3: numerical parity, FID preprocessing, conversion errors, CLI."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from bigen_jax.convert import inception as convert
from bigen_jax.convert import io
from bigen_jax.eval import fid
from bigen_jax.models import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _images():
  """Two test images [2, 75, 75, 3] in [-1, 1] (75x75: the smallest input the net accepts, for speed)."""
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, inception.MIN_SIZE, inception.MIN_SIZE, 3))
  return x.astype(np.float32)


def _nchw(x):
  return torch.tensor(x).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def torch_model():
  """torchvision's random inception_v3 in eval mode with non-trivial BatchNorm: random affine parameters and
  running statistics matched to each conv's weights (variance ~ sum of squared weights / 2, the output
  variance for unit-variance ReLU inputs, times a random factor), so activations stay O(1) in all 94 layers."""
  torch.manual_seed(0)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                          transform_input=False).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torchvision.models.inception.BasicConv2d):
        var = 0.5 * m.conv.weight.square().sum((1, 2, 3))
        m.bn.running_var.copy_(var * torch.empty_like(var).uniform_(0.7, 1.4))
        m.bn.running_mean.copy_(0.2 * var.sqrt() * torch.randn_like(var))
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_(0.0, 0.2)
  return model


@pytest.fixture(scope="module")
def variables(torch_model):
  return convert.params_from_torch(torch_model.state_dict())


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_parity_with_torchvision(torch_model, variables):
  x = _images()
  with torch.no_grad():
    features = {}
    torch_model.avgpool.register_forward_hook(lambda m, i, o: features.update(pool=o.flatten(1).numpy()))
    logits = torch_model(_nchw(x)).numpy()
  out = jax.jit(inception.InceptionV3().apply)(variables, x)
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1000)
  assert np.std(features["pool"]) > 1e-2  # the comparison is not between near-zero activations
  assert _rel_err(out["pool"], features["pool"]) < TOL
  assert _rel_err(out["logits"], logits) < TOL
  assert np.max(np.abs(out["pool"] - features["pool"])) < TOL and np.max(np.abs(out["logits"] - logits)) < TOL


def test_resize_input_matches_pytorch_fid_preprocessing():
  images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 57, 3), dtype=np.uint8)
  for size in (97, 23):  # up- and down-sampling
    got = inception.resize_input(images, size)
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    want = 2 * F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - 1
    assert np.max(np.abs(np.asarray(got) - want.permute(0, 2, 3, 1).numpy())) < 1e-5


def test_too_small_input_raises():
  with pytest.raises(ValueError, match="at least 75x75"):
    inception.abstract_variables(inception.InceptionV3(), size=64)


def test_conversion_errors(torch_model):
  state = torch_model.state_dict()
  state["AuxLogits.fc.weight"] = torch.zeros(3, 3)  # ignored
  convert.params_from_torch(state)
  broken = dict(state)
  del broken["Mixed_6c.branch7x7_2.bn.running_var"]
  broken["Mixed_6c.extra.weight"] = torch.zeros(1)
  with pytest.raises(convert.ConversionError) as e:
    convert.params_from_torch(broken)
  assert "Mixed_6c.branch7x7_2.bn.running_var" in str(e.value) and "Mixed_6c.extra.weight" in str(e.value)
  bad_shape = dict(state, **{"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)})
  with pytest.raises(convert.ConversionError, match="Conv2d_1a_3x3.conv.weight"):
    convert.params_from_torch(bad_shape)


def test_cli_and_feature_fn(torch_model, variables, tmp_path):
  """The CLI writes variables io.load_params restores; inception_features_fn runs on uint8 images."""
  weights, out = str(tmp_path / "inception.pth"), str(tmp_path / "inception.npz")
  torch.save(torch_model.state_dict(), weights)
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_inception.py"),
                  f"--torch_weights={weights}", f"--out={out}"], check=True, env=dict(os.environ, PYTHONPATH=ROOT))
  restored = io.load_params(out)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  images = np.random.default_rng(2).integers(0, 256, size=(3, 30, 30, 3), dtype=np.uint8)
  features = fid.compute_features(images, fid.inception_features_fn(restored, size=inception.MIN_SIZE),
                                  batch_size=2)
  assert features.shape == (3, 2048) and np.all(np.isfinite(features))
