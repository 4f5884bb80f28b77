"""Inception-v3 in Flax linen, inference only, NHWC, in two variants that share every parameter.

``variant="fid"``: pytorch-fid's *FID Inception*, the network of the TF FID code (weights
``pt_inception-2015-12-05``): the 3x3/stride-1 average pools of the A, C and first E block (Mixed_7b) divide
by the number of real pixels under the window (``count_include_pad=False``), the last E block (Mixed_7c)
max-pools its pool branch, the classifier has 1008 outputs. This is the network published FID numbers use.

``variant="torchvision"``: ``torchvision.models.inception_v3``: those average pools count the zero padding
(``count_include_pad=True``) and Mixed_7c average-pools too; 1000 classes. Its pooled features give a
different number, reported as ``fid_torchvision`` (``bigen_jax.eval.fid.METRIC_NAMES``), never as FID.

The structure and module names follow ``torchvision.models.inception_v3(aux_logits=False)`` (pytorch-fid
builds its network from it) so that ``bigen_jax.convert.inception`` maps either state dict one to one: every
``BasicConv2d`` is a bias-free conv, BatchNorm with running statistics (eps 0.001) and ReLU; the stride-2 max
pools are unpadded (floor mode). Only the fc width tells the two weight files apart (``variant_for``). The
pooled 2048-d features ("pool") are what FID uses; the smallest input the net accepts is 75x75.

``resize_input`` gives the FID preprocessing: uint8 images -> [0, 1] -> bilinear resize to 299x299 without
antialiasing (``F.interpolate(..., mode="bilinear", align_corners=False)`` as pytorch-fid does) -> [-1, 1].
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FID_SIZE = 299
MIN_SIZE = 75
VARIANTS = ("fid", "torchvision")
NUM_CLASSES = {"fid": 1008, "torchvision": 1000}  # the TF graph's 1008 outputs: ImageNet's 1000 and 8 unused
# The pool of each A/C/E block's pool branch per variant: "avg_pad" (zero padding counted, torchvision), "avg"
# (padding not counted, TF) or "max".
_POOLS = {"fid": {"A": "avg", "C": "avg", "E_1": "avg", "E_2": "max"},
          "torchvision": {"A": "avg_pad", "C": "avg_pad", "E_1": "avg_pad", "E_2": "avg_pad"}}
# Per-channel (mean, std) of torchvision's ImageNet preprocessing; ``transform_input`` undoes the [-1, 1]
# scaling into it, as torchvision does for its ImageNet weights.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_input(images: jax.Array, size: int = FID_SIZE) -> jax.Array:
  """uint8 (or [0, 255] float) images [B, H, W, 3] -> float32 [B, size, size, 3] in [-1, 1].

  Bilinear with half-pixel centres and no antialiasing, matching ``F.interpolate(mode="bilinear",
  align_corners=False)`` in pytorch-fid, then ``2 * x - 1`` (pytorch-fid's ``normalize_input``, the range the
  TF FID Inception graph expects).
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="linear", antialias=False)
  return 2.0 * x - 1.0


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def variant_for(num_classes: int) -> str:
  """The variant whose weights have a classifier of ``num_classes`` outputs: 1008 is the FID Inception's."""
  return "fid" if num_classes == NUM_CLASSES["fid"] else "torchvision"


def _pool_same(x: jax.Array, kind: str) -> jax.Array:
  """3x3 stride-1 pool with padding 1 (same size): "avg_pad" divides by 9 everywhere (torch's
  count_include_pad=True), "avg" by the number of pixels inside the image, "max" ignores the padding."""
  window = dict(window_shape=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
  if kind == "max":
    return nn.max_pool(x, **window)
  if kind in ("avg", "avg_pad"):
    return nn.avg_pool(x, **window, count_include_pad=kind == "avg_pad")
  raise ValueError(f"unknown pool {kind!r}: expected 'avg_pad', 'avg' or 'max'")


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU: torchvision's ``BasicConv2d``."""
  features: int
  kernel: Sequence[int]
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _conv(name: str, features: int, kernel=(1, 1), stride: int = 1, padding=(0, 0)) -> BasicConv:
  return BasicConv(features, kernel, stride, padding, name=name)


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels; ``pool`` as
  ``_pool_same``'s ``kind``."""
  pool_features: int
  pool: str = "avg_pad"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = _conv("branch1x1", 64)(x)
    b5 = _conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(_conv("branch5x5_1", 48)(x))
    b3 = _conv("branch3x3dbl_1", 64)(x)
    b3 = _conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = _conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = _conv("branch_pool", self.pool_features)(_pool_same(x, self.pool))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction: strided 3x3, strided double 3x3 and max pool -> 480 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = _conv("branch3x3", 384, (3, 3), stride=2)(x)
    bd = _conv("branch3x3dbl_1", 64)(x)
    bd = _conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = _conv("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convs (``channels_7x7`` wide inside) -> 768 channels; ``pool`` as
  ``_pool_same``'s ``kind``."""
  channels_7x7: int
  pool: str = "avg_pad"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = _conv("branch1x1", 192)(x)
    b7 = _conv("branch7x7_1", c7)(x)
    b7 = _conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = _conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = _conv("branch7x7dbl_1", c7)(x)
    bd = _conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = _conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = _conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = _conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = _conv("branch_pool", 192)(_pool_same(x, self.pool))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction: 1x1 then strided 3x3, 1x1/7x7 then strided 3x3, max pool -> 512 + C_in."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = _conv("branch3x3_2", 320, (3, 3), stride=2)(_conv("branch3x3_1", 192)(x))
    b7 = _conv("branch7x7x3_1", 192)(x)
    b7 = _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = _conv("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 branches -> 2048 channels; ``pool`` as ``_pool_same``'s ``kind``."""
  pool: str = "avg_pad"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = _conv("branch1x1", 320)(x)
    b3 = _conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([_conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          _conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = _conv("branch3x3dbl_1", 448)(x)
    bd = _conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([_conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          _conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    bp = _conv("branch_pool", 192)(_pool_same(x, self.pool))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Images [B, H, W, 3] (H, W >= 75; 299 for FID), already normalised -> {"pool": [B, 2048], "logits":
  [B, num_classes]}.

  ``variant``: "fid" or "torchvision" (module docstring), required: weights of one run in the other without
  any error. ``num_classes`` 0 takes the variant's (1008 / 1000). ``transform_input`` maps [-1, 1] inputs to
  ImageNet mean/std normalisation first, as torchvision does for its ImageNet weights
  (``transform_input=True``); the FID Inception takes [-1, 1] as it is, and parity tests leave it off.
  """
  variant: str
  num_classes: int = 0
  transform_input: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown Inception variant {self.variant!r}: expected one of {VARIANTS}")
    if x.shape[1] < MIN_SIZE or x.shape[2] < MIN_SIZE:
      raise ValueError(f"Inception-v3 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1:3]}")
    pools = _POOLS[self.variant]
    if self.transform_input:
      mean, std = jnp.asarray(_IMAGENET_MEAN), jnp.asarray(_IMAGENET_STD)
      x = x * (std / 0.5) + (mean - 0.5) / 0.5
    x = _conv("Conv2d_1a_3x3", 32, (3, 3), stride=2)(x)
    x = _conv("Conv2d_2a_3x3", 32, (3, 3))(x)
    x = _conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)
    x = _max_pool(x)
    x = _conv("Conv2d_3b_1x1", 80)(x)
    x = _conv("Conv2d_4a_3x3", 192, (3, 3))(x)
    x = _max_pool(x)
    x = InceptionA(32, pools["A"], name="Mixed_5b")(x)
    x = InceptionA(64, pools["A"], name="Mixed_5c")(x)
    x = InceptionA(64, pools["A"], name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, pools["C"], name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(pools["E_1"], name="Mixed_7b")(x)
    x = InceptionE(pools["E_2"], name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    return {"pool": pool, "logits": nn.Dense(self.num_classes or NUM_CLASSES[self.variant], name="fc")(pool)}


def variant_of(variables: dict) -> str:
  """The variant of converted ``variables`` ({"params", "batch_stats"}), from the width of their classifier."""
  return variant_for(int(variables["params"]["fc"]["bias"].shape[0]))


def abstract_variables(model: InceptionV3, size: int = MIN_SIZE) -> dict:
  """The variables' shapes and dtypes ({"params", "batch_stats"} of ``jax.ShapeDtypeStruct``), no compute."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
