"""A PyTorch twin of the SPADE generator (``bigen_jax.models.spade.Generator``), for speed benchmarks.

The same layers, NCHW, module names mirroring the Flax parameter tree (``block_0.norm_0.shared.weight`` <->
``block_0/norm_0/shared/kernel``), so ``load_flax_variables`` copies a Flax generator one to one. It is the
frozen (eval) generator: spectral norm is baked into the kernels (``spade.bake_spectral_norm``: each kernel
divided by the sigma its stored u gives), exactly what ``decode_image`` computes, so plain convs suffice.

  from torch_spade import from_flax
  net = from_flax(variables)                 # G's {"params", "spectral"}
  images = net(grid)                         # grid [B, D, 8, 8] -> [B, 3, S, S] in [-1, 1]
"""

import flax.linen as flax_nn
import flax.traverse_util
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from bigen_jax.models import spade

_SLOPE = 0.2
_NORM_EPS = 1e-5


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
  return F.instance_norm(x, eps=_NORM_EPS)


class SPADE(nn.Module):
  """instance_norm(x) (1 + gamma) + beta, gamma/beta from the condition resized (nearest) to x's size."""

  def __init__(self, channels: int, cond_channels: int, hidden: int):
    super().__init__()
    self.shared = _conv(cond_channels, hidden)
    self.gamma = _conv(hidden, channels)
    self.beta = _conv(hidden, channels)

  def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W], cond [B, E, 8, 8] -> [B, C, H, W]."""
    h = F.relu(self.shared(F.interpolate(cond, size=x.shape[2:], mode="nearest")))
    return _instance_norm(x) * (1.0 + self.gamma(h)) + self.beta(h)


class Noise(nn.Module):
  """x + scale[C] * noise [B, 1, H, W] (drawn with torch.randn when not given)."""

  def __init__(self, channels: int):
    super().__init__()
    self.scale = nn.Parameter(torch.zeros(channels))

  def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:
      noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
    return x + self.scale.view(1, -1, 1, 1) * noise


class UpBlock(nn.Module):
  """x = up(x); x + noise(conv(lrelu(SPADE(noise(conv(lrelu(SPADE(x))))))))."""

  def __init__(self, channels: int, cond_channels: int, hidden: int):
    super().__init__()
    self.norm_0 = SPADE(channels, cond_channels, hidden)
    self.conv_0 = _conv(channels, channels)
    self.noise_0 = Noise(channels)
    self.norm_1 = SPADE(channels, cond_channels, hidden)
    self.conv_1 = _conv(channels, channels)
    self.noise_1 = Noise(channels)

  def forward(self, x: torch.Tensor, cond: torch.Tensor, noise: tuple) -> torch.Tensor:
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    h = self.noise_0(self.conv_0(F.leaky_relu(self.norm_0(x, cond), _SLOPE)), noise[0])
    h = self.noise_1(self.conv_1(F.leaky_relu(self.norm_1(h, cond), _SLOPE)), noise[1])
    return x + h


class TorchGenerator(nn.Module):
  """Centroid grid [B, D, 8, 8] -> images [B, 3, S, S] in [-1, 1], S = 8 * 2**num_blocks."""

  def __init__(self, feature_dim: int, width: int = 32, bottleneck: int = 256, spade_hidden: int = 32,
               num_blocks: int = 5):
    super().__init__()
    self.num_blocks = num_blocks
    self.bottleneck = _conv(feature_dim, bottleneck, 1)
    self.stem = _conv(bottleneck, width)
    for i in range(num_blocks):
      self.add_module(f"block_{i}", UpBlock(width, bottleneck, spade_hidden))
      self.add_module(f"to_rgb_{i}", _conv(width, 3, 1))

  def forward(self, grid: torch.Tensor, noise: list | None = None) -> torch.Tensor:
    """noise: 2 * num_blocks maps [B, 1, H, W] in the Flax order, or None to draw them."""
    cond = torch.tanh(self.bottleneck(grid))
    x = self.stem(cond)
    rgb = None
    for i in range(self.num_blocks):
      maps = (None, None) if noise is None else noise[2 * i:2 * i + 2]
      x = getattr(self, f"block_{i}")(x, cond, maps)
      y = getattr(self, f"to_rgb_{i}")(F.leaky_relu(x, _SLOPE))
      rgb = y if rgb is None else F.interpolate(rgb, scale_factor=2, mode="nearest") + y
    return torch.tanh(rgb)


def load_flax_variables(net: TorchGenerator, variables) -> TorchGenerator:
  """Copies a Flax generator's variables (spectral norm baked in) into ``net``; every tensor must match."""
  state = {}
  for path, value in flax.traverse_util.flatten_dict(spade.bake_spectral_norm(variables)).items():
    value = np.array(value, np.float32)
    if path[-1] == "kernel":
      path, value = path[:-1] + ("weight",), value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    state[".".join(path)] = torch.from_numpy(np.ascontiguousarray(value))
  net.load_state_dict(state, strict=True)
  return net


def from_flax(variables) -> TorchGenerator:
  """A ``TorchGenerator`` of the same architecture as the Flax variables, holding their weights, eval mode."""
  g = spade.generator_from_variables(variables)
  feature_dim = flax_nn.unbox(variables)["params"]["bottleneck"]["kernel"].shape[2]
  net = TorchGenerator(feature_dim, width=g.width, bottleneck=g.bottleneck, spade_hidden=g.spade_hidden,
                       num_blocks=g.num_blocks)
  return load_flax_variables(net, variables).eval()
