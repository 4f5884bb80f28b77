"""torchvision resnet50 state dicts -> Flax ResNet50: parity of every stage, early stopping (``upto``), ImageNet
normalisation, the perceptual loss (value against torch features, gradients to x only), conversion errors,
CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

from bigen_jax.convert import io
from bigen_jax.convert import resnet as convert
from bigen_jax.models import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
NUM_CLASSES = 10  # a small classifier: the CLI test writes the whole state dict to disk


def _images(seed, size=64):
  """Two images [2, size, size, 3] in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _nhwc(x):
  return x.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else x.numpy()


@pytest.fixture(scope="module")
def torch_model():
  """torchvision's random resnet50 in eval mode with non-trivial BatchNorm: running statistics measured on
  random images (so every layer's activations are O(1)), then perturbed, with random affine parameters."""
  torch.manual_seed(0)
  model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # cumulative average: the running statistics become those of the batch below
  with torch.no_grad():
    model.train()(_nchw(resnet.imagenet_normalize(_images(10))))
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn_like(m.running_var))
        m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
  return model.eval()


@pytest.fixture(scope="module")
def variables(torch_model):
  return convert.params_from_torch(torch_model.state_dict())


def _torch_stages(model, x):
  """{stage: NHWC numpy output} of a torch resnet50 on NHWC ``x``, with the names of ``resnet.STAGES``."""
  seen, hooks = {}, []
  for name in resnet.STAGES[:5]:
    hooks.append(getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: seen.update({name: _nhwc(o)})))
  hooks.append(model.avgpool.register_forward_hook(lambda m, i, o: seen.update(pool=_nhwc(o.flatten(1)))))
  with torch.no_grad():
    seen["logits"] = model(_nchw(x)).numpy()
  for hook in hooks:
    hook.remove()
  return seen


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_parity_with_torchvision(torch_model, variables):
  x = np.asarray(resnet.imagenet_normalize(_images(0)))
  want = _torch_stages(torch_model, x)
  out = jax.jit(resnet.ResNet50(num_classes=NUM_CLASSES).apply)(variables, x)
  assert set(out) == set(resnet.STAGES)
  errors = {}
  for name in resnet.STAGES:
    assert out[name].shape == want[name].shape, name
    assert np.std(want[name]) > 1e-2, name  # the comparison is not between near-zero activations
    errors[name] = _rel_err(out[name], want[name])
  assert max(errors.values()) < TOL, errors


def test_upto_stops_early(variables):
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  out = jax.eval_shape(resnet.ResNet50(upto="layer2").apply, variables, x)
  assert {k: v.shape for k, v in out.items()} == {"relu": (2, 32, 32, 64), "layer1": (2, 16, 16, 256),
                                                   "layer2": (2, 8, 8, 512)}
  assert set(resnet.abstract_variables(resnet.ResNet50(upto="layer2"))["params"]) == {"conv1", "bn1", "layer1",
                                                                                       "layer2"}
  with pytest.raises(ValueError, match="unknown ResNet-50 stage 'layer5'"):
    resnet.abstract_variables(resnet.ResNet50(upto="layer5"))


def test_imagenet_normalize_matches_torchvision():
  x01 = np.random.default_rng(1).uniform(0, 1, size=(2, 5, 7, 3)).astype(np.float32)
  want = _nhwc(TF.normalize(_nchw(x01), resnet.IMAGENET_MEAN, resnet.IMAGENET_STD))
  np.testing.assert_allclose(resnet.imagenet_normalize(x01, value_range=(0.0, 1.0)), want, atol=1e-6)
  np.testing.assert_allclose(resnet.imagenet_normalize(2 * x01 - 1), want, atol=1e-6)
  np.testing.assert_allclose(resnet.imagenet_normalize((255 * x01).astype(np.uint8), value_range=(0.0, 255.0)),
                             want, atol=2e-2)


def test_perceptual_loss(torch_model, variables):
  """The loss is the weighted mean L1 between torch features (within 3% in bfloat16); zero for x == y; its
  gradient reaches x, finite and nonzero, and neither y (the target) nor the variables."""
  x, y = _images(2, size=32), _images(3, size=32)
  loss_and_grads = jax.jit(jax.value_and_grad(resnet.perceptual_loss, argnums=(0, 1, 2)))
  loss, (g_vars, g_x, g_y) = loss_and_grads(variables, x, y)
  fx = _torch_stages(torch_model, resnet.imagenet_normalize(x))
  fy = _torch_stages(torch_model, resnet.imagenet_normalize(y))
  want = sum(w * np.mean(np.abs(fx[name] - fy[name]))
             for name, w in zip(resnet.PERCEPTUAL_LAYERS, resnet.PERCEPTUAL_WEIGHTS))
  assert loss > 0 and abs(float(loss) - want) < TOL * want, (float(loss), want)
  assert np.all(np.isfinite(g_x)) and np.max(np.abs(g_x)) > 0
  assert all(np.max(np.abs(g)) == 0 for g in jax.tree.leaves((g_vars, g_y)))
  same, _ = loss_and_grads(variables, x, x)
  assert float(same) == 0.0
  low = jax.jit(resnet.perceptual_loss, static_argnames="dtype")(variables, x, y, dtype=jnp.bfloat16)
  assert float(low) != float(loss) and abs(float(low) - want) < 0.03 * want, (float(low), want)  # 8-bit mantissa


def test_perceptual_loss_argument_errors(variables):
  x = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="one weight per layer"):
    resnet.perceptual_loss(variables, x, x, layers=("layer1", "layer2"), weights=(1.0,))
  with pytest.raises(ValueError, match=r"unknown ResNet-50 layers \['conv5'\]"):
    resnet.perceptual_loss(variables, x, x, layers=("conv5",), weights=(1.0,))
  with pytest.raises(ValueError, match="one shape"):
    resnet.perceptual_loss(variables, x, x[:, :16], layers=("relu",), weights=(1.0,))


def test_conversion_errors(torch_model):
  state = torch_model.state_dict()
  prefixed = convert.params_from_torch({f"module.{k}": v for k, v in state.items()})  # DataParallel's names
  assert prefixed["params"]["layer3"]["5"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)
  broken = dict(state)
  del broken["layer2.0.downsample.1.running_var"]
  broken["layer2.0.extra.weight"] = torch.zeros(1)
  with pytest.raises(convert.ConversionError) as e:
    convert.params_from_torch(broken)
  assert "1 keys missing from the state dict (layer2.0.downsample.1.running_var)" in str(e.value)
  assert "1 unknown keys (no counterpart in ResNet50) (layer2.0.extra.weight)" in str(e.value)
  bad_shape = dict(state, **{"layer1.0.conv2.weight": torch.zeros(64, 64, 1, 1)})
  with pytest.raises(convert.ConversionError, match=r"1 shape mismatches \(layer1.0.conv2.weight \(64, 64, 1, 1\) "
                     r"-> params/layer1/0/conv2/kernel expects \(3, 3, 64, 64\)\)"):
    convert.params_from_torch(bad_shape)
  with pytest.raises(convert.ConversionError, match="missing.*layer1.0.conv3.weight"):
    convert.params_from_torch(torchvision.models.resnet18(weights=None).state_dict())
  with pytest.raises(convert.ConversionError, match="not a state dict of torchvision resnet50"):
    convert.params_from_torch({"encoder.weight": np.zeros(3)})


def test_cli(torch_model, variables, tmp_path):
  """The CLI writes variables that io.load_params restores unchanged."""
  weights, out = str(tmp_path / "resnet50.pth"), str(tmp_path / "resnet50.npz")
  torch.save(torch_model.state_dict(), weights)
  tool = [sys.executable, os.path.join(ROOT, "tools", "convert_resnet.py"), f"--torch_weights={weights}",
          f"--out={out}"]
  subprocess.run(tool, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
  jax.tree.map(np.testing.assert_array_equal, io.load_params(out), variables)
