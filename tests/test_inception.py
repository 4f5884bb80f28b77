"""Inception-v3 state dicts -> Flax InceptionV3: numerical parity of both variants (torchvision's network, and
pytorch-fid's FID Inception built here from torchvision's blocks with its pools), FID preprocessing, variant
detection and refusal, conversion errors, CLI."""

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


def _randomise_batch_norm(model):
  """Non-trivial BatchNorm: random affine parameters and running statistics matched to each conv's weights
  (variance ~ sum of squared weights / 2, the output variance for unit-variance ReLU inputs, times a random
  factor), so activations stay O(1) in all 94 layers."""
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
def torch_model():
  """torchvision's random inception_v3 in eval mode with non-trivial BatchNorm."""
  torch.manual_seed(0)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                          transform_input=False).eval()
  return _randomise_batch_norm(model)


def _tf_avg_pool(x):
  """TF's 3x3/1 average pool with SAME padding: the mean over the pixels inside the image only."""
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x):
  return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FidInceptionA(torchvision.models.inception.InceptionA):
  """torchvision's A block with the TF pool in its pool branch."""

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class _FidInceptionC(torchvision.models.inception.InceptionC):
  """torchvision's C block with the TF pool in its pool branch."""

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      bd = conv(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class _FidInceptionE(torchvision.models.inception.InceptionE):
  """torchvision's E block with ``pool`` (the TF average pool in Mixed_7b, a max pool in Mixed_7c)."""

  def __init__(self, in_channels, pool):
    super().__init__(in_channels)
    self.pool = pool

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)


@pytest.fixture(scope="module")
def fid_torch_model():
  """pytorch-fid's FID Inception architecture with random weights: torchvision's inception_v3 with 1008
  classes whose A, C and E blocks pool as the TF graph does, with non-trivial BatchNorm."""
  torch.manual_seed(1)
  model = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=True,
                                          transform_input=False)
  model.Mixed_5b = _FidInceptionA(192, pool_features=32)
  model.Mixed_5c = _FidInceptionA(256, pool_features=64)
  model.Mixed_5d = _FidInceptionA(288, pool_features=64)
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    setattr(model, name, _FidInceptionC(768, channels_7x7=c7))
  model.Mixed_7b = _FidInceptionE(1280, _tf_avg_pool)
  model.Mixed_7c = _FidInceptionE(2048, _max_pool_same)
  return _randomise_batch_norm(model.eval())


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
  out = jax.jit(inception.InceptionV3(variant="torchvision").apply)(variables, x)
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1000)
  assert np.std(features["pool"]) > 1e-2  # the comparison is not between near-zero activations
  assert _rel_err(out["pool"], features["pool"]) < TOL
  assert _rel_err(out["logits"], logits) < TOL
  assert np.max(np.abs(out["pool"] - features["pool"])) < TOL and np.max(np.abs(out["logits"] - logits)) < TOL


def _torch_outputs(model, x):
  """(pooled features, logits, the spatial size Mixed_7c sees) of a torch Inception on NHWC ``x``."""
  seen = {}
  hooks = [model.avgpool.register_forward_hook(lambda m, i, o: seen.update(pool=o.flatten(1).numpy())),
           model.Mixed_7c.register_forward_hook(lambda m, i, o: seen.update(size=tuple(i[0].shape[2:])))]
  with torch.no_grad():
    logits = model(_nchw(x)).numpy()
  for hook in hooks:
    hook.remove()
  return seen["pool"], logits, seen["size"]


def test_fid_variant_parity_with_pytorch_fid_architecture(fid_torch_model):
  """107x107 inputs: Mixed_7b/7c see 2x2 maps, so each of their pools (padding counted or not, max or mean)
  changes the result; the torchvision variant on the same weights is far off."""
  x = np.random.default_rng(3).uniform(-1, 1, size=(2, 107, 107, 3)).astype(np.float32)
  pool, logits, size = _torch_outputs(fid_torch_model, x)
  assert size == (2, 2) and np.std(pool) > 1e-2
  variables = convert.params_from_torch(fid_torch_model.state_dict(), variant="fid")
  assert convert.detect_variant(fid_torch_model.state_dict()) == "fid" and inception.variant_of(variables) == "fid"
  out = jax.jit(inception.InceptionV3(variant="fid").apply)(variables, x)
  assert out["logits"].shape == (2, 1008)
  assert _rel_err(out["pool"], pool) < TOL and _rel_err(out["logits"], logits) < TOL
  other = jax.jit(inception.InceptionV3(variant="torchvision", num_classes=1008).apply)(variables, x)
  assert _rel_err(other["pool"], pool) > 1e-2


def test_variants_are_detected_and_the_wrong_one_refused(torch_model, fid_torch_model):
  fid_state, tv_state = fid_torch_model.state_dict(), torch_model.state_dict()
  assert convert.detect_variant(tv_state) == "torchvision" and convert.detect_variant(fid_state) == "fid"
  assert inception.variant_of(convert.params_from_torch(fid_state)) == "fid"  # no variant asked: either
  with pytest.raises(convert.ConversionError, match=r"FID Inception .*1008 outputs.*--variant=fid"):
    convert.params_from_torch(fid_state, variant="torchvision")
  with pytest.raises(convert.ConversionError, match=r"torchvision's inception_v3 .*1000 outputs"):
    convert.params_from_torch(tv_state, variant="fid")


def test_resize_input_matches_pytorch_fid_preprocessing():
  images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 57, 3), dtype=np.uint8)
  for size in (97, 23):  # up- and down-sampling
    got = inception.resize_input(images, size)
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    want = 2 * F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - 1
    assert np.max(np.abs(np.asarray(got) - want.permute(0, 2, 3, 1).numpy())) < 1e-5


def test_too_small_input_raises():
  with pytest.raises(ValueError, match="at least 75x75"):
    inception.abstract_variables(inception.InceptionV3(variant="fid"), size=64)


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


def test_cli_and_feature_fn(fid_torch_model, tmp_path):
  """The CLI writes variables io.load_params restores and refuses, in one line naming the file, weights of the
  other variant; inception_features_fn runs the FID variant on uint8 images for FID weights."""
  weights, out = str(tmp_path / "pt_inception.pth"), str(tmp_path / "inception.npz")
  torch.save(fid_torch_model.state_dict(), weights)
  tool = [sys.executable, os.path.join(ROOT, "tools", "convert_inception.py"), f"--torch_weights={weights}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  refused = subprocess.run(tool + [f"--out={out}", "--variant=torchvision"], env=env, capture_output=True,
                           text=True)
  assert refused.returncode == 2 and not os.path.exists(out), refused.stderr
  assert refused.stderr.rstrip().splitlines()[-1].startswith(f"error: {weights}: a state dict of pytorch-fid's "
                                                             "FID Inception"), refused.stderr
  subprocess.run(tool + [f"--out={out}", "--variant=fid"], check=True, env=env)
  restored = io.load_params(out)
  jax.tree.map(np.testing.assert_array_equal, restored, convert.params_from_torch(fid_torch_model.state_dict()))
  images = np.random.default_rng(2).integers(0, 256, size=(3, 30, 30, 3), dtype=np.uint8)
  features = fid.compute_features(images, fid.inception_features_fn(restored, size=inception.MIN_SIZE),
                                  batch_size=2)
  resized = inception.resize_input(images, inception.MIN_SIZE)
  want = jax.jit(inception.InceptionV3(variant="fid").apply)(restored, resized)
  np.testing.assert_allclose(features, want["pool"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="transform_input"):
    fid.inception_features_fn(restored, transform_input=True)
