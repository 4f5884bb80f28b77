"""ResNet-50 in Flax linen, inference only, NHWC, and a perceptual loss over its stage outputs.

The network is ``torchvision.models.resnet50`` (ResNet v1.5: the stride of a downsampling bottleneck sits on its
3x3 conv), with the same module names so that ``bigen_jax.convert.resnet`` maps a torchvision state dict one
to one: ``conv1``/``bn1``/``relu`` stem (7x7/2 conv, padding 3), a 3x3/2 max pool (padding 1), ``layer1`` ..
``layer4`` of 3, 4, 6, 3 bottlenecks (``layerN.i.conv1``/``conv2``/``conv3`` with ``bn1``..``bn3``, and
``layerN.0.downsample.0``/``.1``: a 1x1 conv and its BatchNorm), the global mean pool and ``fc``. BatchNorm
uses its running statistics (eps 1e-5): the net is a frozen feature extractor, never trained here.

As with the Inception of ``bigen_jax.models.inception``, the frozen net's variables ({"params",
"batch_stats"}) are plain arrays without logical axis names: 25.6M parameters, replicated on every device and
passed to jitted functions as arguments (``jax.device_put`` once), never sharded and never updated.

``imagenet_normalize`` maps images in [-1, 1] or [0, 1] to torchvision's ImageNet mean/std normalisation;
``perceptual_loss`` is the pix2pixHD/SPADE feature-matching loss with this net in place of VGG-19.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The outputs of ``ResNet50`` in network order: the stem after its ReLU (stride 2, 64 channels), the four
# stages (strides 4, 8, 16, 32; 256, 512, 1024, 2048 channels), the pooled features and the logits.
STAGES = ("relu", "layer1", "layer2", "layer3", "layer4", "pool", "logits")
# (bottlenecks, width, stride of the first bottleneck) of layer1 .. layer4; each outputs 4 x width channels.
LAYERS = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
EXPANSION = 4
NUM_CLASSES = 1000
BN_EPSILON = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# pix2pixHD/SPADE's VGG loss weights relu1_1 .. relu5_1 by 1/32, 1/16, 1/8, 1/4, 1: the shallow, wide maps
# least. The five ResNet outputs at the same strides (2 .. 32) take the same weights.
PERCEPTUAL_LAYERS = ("relu", "layer1", "layer2", "layer3", "layer4")
PERCEPTUAL_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def imagenet_normalize(images: jax.Array, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
  """Images [..., 3] with values in ``value_range`` -> float32 ``(x01 - mean) / std`` per channel, as
  torchvision's ``Normalize(IMAGENET_MEAN, IMAGENET_STD)`` after ``ToTensor``; differentiable (generator
  outputs go through it in the perceptual loss)."""
  low, high = value_range
  x = (images.astype(jnp.float32) - low) / (high - low)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def _conv(name: str, features: int, kernel: int, stride: int, dtype: Any) -> nn.Conv:
  """Bias-free ``kernel`` x ``kernel`` conv padded by ``kernel // 2`` on each side, as torch pads: "SAME"
  would pad a stride-2 conv of an even-sized input on one side only."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, name=name)


def _bn(name: str, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=dtype, name=name)


class Downsample(nn.Module):
  """The shortcut of a stage's first bottleneck: 1x1/``stride`` conv ("0") and BatchNorm ("1"), torchvision's
  ``downsample`` Sequential; [B, H, W, C] -> [B, H / stride, W / stride, features]."""
  features: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _bn("1", self.dtype)(_conv("0", self.features, 1, self.stride, self.dtype)(x))


class Bottleneck(nn.Module):
  """1x1 (``width``) -> 3x3/``stride`` (``width``) -> 1x1 (4 x ``width``) convs, each with BatchNorm, plus the
  shortcut, then ReLU: [B, H, W, C] -> [B, H / stride, W / stride, 4 x width]. ``downsample`` gives the
  shortcut a projection (the first bottleneck of each stage)."""
  width: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(_bn("bn1", self.dtype)(_conv("conv1", self.width, 1, 1, self.dtype)(x)))
    y = nn.relu(_bn("bn2", self.dtype)(_conv("conv2", self.width, 3, self.stride, self.dtype)(y)))
    y = _bn("bn3", self.dtype)(_conv("conv3", self.width * EXPANSION, 1, 1, self.dtype)(y))
    if self.downsample:
      x = Downsample(self.width * EXPANSION, self.stride, self.dtype, name="downsample")(x)
    return nn.relu(y + x)


class ResLayer(nn.Module):
  """One stage: ``blocks`` bottlenecks named "0", "1", ..., the first strided and projecting."""
  blocks: int
  width: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.blocks):
      x = Bottleneck(self.width, self.stride if i == 0 else 1, i == 0, self.dtype, name=str(i))(x)
    return x


class ResNet50(nn.Module):
  """Images [B, H, W, 3], already normalised (``imagenet_normalize``) -> {stage: output} for every name of
  ``STAGES`` up to and including ``upto``: "relu" [B, H/2, W/2, 64], "layer1" [B, H/4, W/4, 256], "layer2"
  [.., H/8, .., 512], "layer3" [.., H/16, .., 1024], "layer4" [.., H/32, .., 2048] (sizes rounded up), "pool"
  [B, 2048], "logits" [B, num_classes].

  ``upto`` stops the net early (a perceptual loss over the stages needs neither the pool nor the classifier);
  variables of the whole net apply to any ``upto``. ``dtype``: the compute dtype (parameters stay as given).
  """
  upto: str = "logits"
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if self.upto not in STAGES:
      raise ValueError(f"unknown ResNet-50 stage {self.upto!r}: expected one of {STAGES}")
    wanted = STAGES[:STAGES.index(self.upto) + 1]
    x = nn.relu(_bn("bn1", self.dtype)(_conv("conv1", 64, 7, 2, self.dtype)(x)))
    features = {"relu": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for name, (blocks, width, stride) in zip(STAGES[1:5], LAYERS):
      if name not in wanted:
        return features
      x = ResLayer(blocks, width, stride, self.dtype, name=name)(x)
      features[name] = x
    if "pool" in wanted:
      features["pool"] = jnp.mean(x, axis=(1, 2))
    if "logits" in wanted:
      features["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(features["pool"])
    return features


def num_classes_of(variables: dict) -> int:
  """The classifier width of converted ``variables`` ({"params", "batch_stats"})."""
  return int(variables["params"]["fc"]["bias"].shape[0])


def abstract_variables(model: ResNet50, size: int = 32) -> dict:
  """The variables' shapes and dtypes ({"params", "batch_stats"} of ``jax.ShapeDtypeStruct``), no compute."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))


def perceptual_loss(variables: dict, x: jax.Array, y: jax.Array, *, layers: Sequence[str] = PERCEPTUAL_LAYERS,
                    weights: Sequence[float] = PERCEPTUAL_WEIGHTS,
                    value_range: tuple[float, float] = (-1.0, 1.0), dtype: Any = jnp.float32) -> jax.Array:
  """sum_l weights[l] * mean |F_l(x) - F_l(y)| over the ResNet-50 outputs ``layers``: a float32 scalar.

  x: generated images [B, H, W, 3], y: real images of the same shape, both with values in ``value_range``
  (``imagenet_normalize`` maps them into the net's input range). The distance is L1, as pix2pixHD/SPADE's VGG
  loss: its gradient keeps its size as x's features approach y's, and the large activations of the deep stages
  do not dominate as they would squared. y's features are constants (``stop_gradient``, the real image is the
  target, as pix2pixHD detaches it) and so are the variables: the gradient reaches x only. x and y go through
  the net as one batch of 2B, and the net stops at the deepest of ``layers``. ``dtype``: the net's compute
  dtype (bfloat16 halves its cost on accelerators); the distances are taken in float32.
  """
  if len(layers) != len(weights) or not layers:
    raise ValueError(f"perceptual_loss needs one weight per layer, got layers {tuple(layers)} and weights "
                     f"{tuple(weights)}")
  unknown = [name for name in layers if name not in STAGES]
  if unknown:
    raise ValueError(f"unknown ResNet-50 layers {unknown}: expected names of {STAGES}")
  if x.shape != y.shape:
    raise ValueError(f"perceptual_loss compares images of one shape, got x {x.shape} and y {y.shape}")
  variables = jax.lax.stop_gradient(variables)
  upto = max(layers, key=STAGES.index)
  num_classes = num_classes_of(variables) if upto == "logits" else NUM_CLASSES
  model = ResNet50(upto=upto, num_classes=num_classes, dtype=dtype)
  features = model.apply(variables, imagenet_normalize(jnp.concatenate([x, y]), value_range=value_range))
  loss = jnp.zeros((), jnp.float32)
  for name, weight in zip(layers, weights):
    fx, fy = jnp.split(features[name].astype(jnp.float32), 2)
    loss += weight * jnp.mean(jnp.abs(fx - jax.lax.stop_gradient(fy)))
  return loss
