"""CLIP (Radford et al., 2021) in Flax linen, both towers, as open_clip builds it: a frozen scorer whose
params come from an open_clip state dict (``bigen_jax.convert.clip``).

Image tower (ViT): bias-free conv patch embedding, class token, learned positional embedding, ``ln_pre``,
pre-LN residual blocks (multi-head attention, MLP with GELU or QuickGELU), ``ln_post`` on the class token,
projection ``proj``. Text tower: token + positional embedding, the same blocks under a causal mask,
``ln_final``, the features at the EOT token (the argmax of the ids: open_clip's ``pool_type='argmax'`` for its
BPE tokenizer, whose EOT 49407 is the largest id), ``text_projection``. ``logit_scale`` is the log temperature.

Parameter tree (open_clip's names, ``.N.`` -> ``_N``; q/k/v are open_clip's ``in_proj`` split in three)::

  visual/{conv1, class_embedding, positional_embedding, ln_pre, transformer/resblocks_i, ln_post, proj}
  token_embedding, positional_embedding, transformer/resblocks_i, ln_final, text_projection, logit_scale
  resblocks_i/{ln_1, attn/{query, key, value, out}, ln_2, mlp/{c_fc, c_proj}}

Every param has logical axis names (``configs/model.py`` AXIS_RULES: embed, heads, mlp, vocab, position,
hidden, norm, conv_*). Layout: pixels NHWC [B, S, S, 3], already ``preprocess``-ed; ids [B, T] int with
T <= context_length (open_clip's tokenizer pads to 77; any T is exact, the EOT token attends only to its left).
Shapes: B batch, W tower width, E joint embedding width.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
constrain = nn.with_logical_constraint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_NAMES = {"ViT-B-32": "vit_b32", "ViT-B-16": "vit_b16"}  # "<name>-quickgelu" sets quick_gelu too
_ACT = ("act_batch", "act_length", "act_embed")


def clip_config(variant: str = "vit_b32", **overrides: Any) -> ml_collections.ConfigDict:
  """The config of ``variant``: vit_b32 / vit_b16 (open_clip's ViT-B-32 / ViT-B-16, also accepted by those
  names, with ``-quickgelu`` for OpenAI's weights) or tiny (a 64-wide, 2-layer model on 32 px images with
  the real 49408-token vocabulary and context 77, for tests), then ``overrides`` (known keys only)."""
  name = variant
  quick_gelu = name.endswith("-quickgelu")
  name = OPEN_CLIP_NAMES.get(name[:-len("-quickgelu")] if quick_gelu else name, name)
  config = ml_collections.ConfigDict(dict(
      embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
      context_length=77, vocab_size=49408, text_width=512, text_layers=12, text_heads=8, mlp_ratio=4.0,
      quick_gelu=quick_gelu, layer_norm_eps=1e-5, dtype="float32", param_dtype="float32"))
  if name == "vit_b16":
    config.patch_size = 16
  elif name == "tiny":
    config.update(dict(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                       vision_heads=2, text_width=64, text_layers=2, text_heads=2))
  elif name != "vit_b32":
    raise ValueError(f"clip_config: unknown variant {variant!r}: expected 'vit_b32', 'vit_b16', 'tiny' or one "
                     f"of {sorted(OPEN_CLIP_NAMES)} (optionally with -quickgelu)")
  config.lock()
  config.update(overrides)
  return config


@dataclasses.dataclass(frozen=True)
class TowerSpec:
  """One tower's transformer: ``layers`` pre-LN blocks of width W, ``heads`` heads, MLP width mlp_ratio W."""
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


def _normal(std: float, names: tuple[str, ...]) -> Any:
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _dense(spec: TowerSpec, features: int, names: tuple[str, str], *, name: str) -> nn.Dense:
  """Dense with kernel [in, out] and bias [out] named ``names``."""
  return nn.Dense(features, dtype=spec.dtype, param_dtype=spec.param_dtype,
                  kernel_init=_normal(spec.width ** -0.5, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]), name=name)


def _layer_norm(spec: TowerSpec, *, name: str) -> nn.LayerNorm:
  """torch's LayerNorm (eps 1e-5, two-pass variance); statistics in float32 whatever the dtype."""
  return nn.LayerNorm(epsilon=spec.layer_norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype,
                      use_fast_variance=False,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


class Attention(nn.Module):
  """Multi-head self-attention (torch's ``nn.MultiheadAttention``): x [B, T, W] -> [B, T, W]."""
  spec: TowerSpec
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    b, t, w = x.shape
    names = ("act_batch", "act_length", "act_heads", "act_kv")

    def project(name):
      y = _dense(s, w, ("embed", "heads"), name=name)(x)
      return constrain(y.reshape(b, t, s.heads, w // s.heads), names)

    y = jax.nn.dot_product_attention(project("query"), project("key"), project("value"), is_causal=self.causal)
    y = constrain(y, names).reshape(b, t, w)
    return _dense(s, w, ("heads", "embed"), name="out")(y)


class MLP(nn.Module):
  """c_fc (W -> mlp_ratio W), GELU (exact, torch's ``nn.GELU``) or QuickGELU, c_proj: [B, T, W] -> same."""
  spec: TowerSpec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    h = _dense(s, int(s.width * s.mlp_ratio), ("embed", "mlp"), name="c_fc")(x)
    h = h * jax.nn.sigmoid(1.702 * h) if s.quick_gelu else nn.gelu(h, approximate=False)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return _dense(s, s.width, ("mlp", "embed"), name="c_proj")(h)


class ResidualBlock(nn.Module):
  """open_clip's ``ResidualAttentionBlock``: x + attn(ln_1(x)), then x + mlp(ln_2(x)); [B, T, W] -> same."""
  spec: TowerSpec
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    x = x + Attention(s, self.causal, name="attn")(_layer_norm(s, name="ln_1")(x))
    x = x + MLP(s, name="mlp")(_layer_norm(s, name="ln_2")(x))
    return constrain(x, _ACT)


class Transformer(nn.Module):
  """``spec.layers`` residual blocks (params ``resblocks_i``); x [B, T, W] -> [B, T, W]."""
  spec: TowerSpec
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.spec.layers):
      x = ResidualBlock(self.spec, self.causal, name=f"resblocks_{i}")(x)
    return x


class VisionTransformer(nn.Module):
  """The image tower: pixels [B, S, S, 3] (preprocessed) -> image features [B, E] (not normalised)."""
  spec: TowerSpec
  image_size: int
  patch_size: int
  embed_dim: int

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    s, p = self.spec, self.patch_size
    if pixels.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"CLIP's image tower takes NHWC pixels [B, {self.image_size}, {self.image_size}, 3] "
                       f"(see preprocess), got {pixels.shape}")
    grid = self.image_size // p
    x = nn.Conv(s.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=s.dtype,
                param_dtype=s.param_dtype, name="conv1",
                kernel_init=_normal((3 * p * p) ** -0.5, ("conv_height", "conv_width", "conv_in", "embed")))(
                    pixels.astype(s.dtype))
    x = x.reshape(x.shape[0], grid * grid, s.width)  # row-major patches, as torch's flatten(2)
    cls = self.param("class_embedding", _normal(s.width ** -0.5, ("embed",)), (s.width,), s.param_dtype)
    pos = self.param("positional_embedding", _normal(s.width ** -0.5, ("position", "embed")),
                     (grid * grid + 1, s.width), s.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, s.width)), x], axis=1)
    x = constrain(x + pos.astype(x.dtype), _ACT)
    x = Transformer(s, name="transformer")(_layer_norm(s, name="ln_pre")(x))
    x = _layer_norm(s, name="ln_post")(x[:, 0])
    proj = self.param("proj", _normal(s.width ** -0.5, ("embed", "hidden")), (s.width, self.embed_dim),
                      s.param_dtype)
    return x @ proj.astype(x.dtype)


@flax.struct.dataclass
class CLIPOutput:
  """image_embeds [B, E] and text_embeds [C, E], unit norm (float32); logits [B, C] = exp(logit_scale) x
  cosine (open_clip's ``logits_per_image``; its transpose is ``logits_per_text``)."""
  image_embeds: Array
  text_embeds: Array
  logits: Array


def _normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps


class CLIP(nn.Module):
  """Both towers and ``logit_scale``; ``encode_image``, ``encode_text`` and ``__call__`` (all pairs)."""
  vision: TowerSpec
  text: TowerSpec
  image_size: int = 224
  patch_size: int = 32
  context_length: int = 77
  vocab_size: int = 49408
  embed_dim: int = 512

  def setup(self):
    t = self.text
    self.visual = VisionTransformer(self.vision, self.image_size, self.patch_size, self.embed_dim)
    self.token_embedding = nn.Embed(self.vocab_size, t.width, dtype=t.dtype, param_dtype=t.param_dtype,
                                    embedding_init=_normal(0.02, ("vocab", "embed")))
    self.positional_embedding = self.param("positional_embedding", _normal(0.01, ("position", "embed")),
                                           (self.context_length, t.width), t.param_dtype)
    self.transformer = Transformer(t, causal=True)
    self.ln_final = _layer_norm(t, name="ln_final")
    self.text_projection = self.param("text_projection", _normal(t.width ** -0.5, ("embed", "hidden")),
                                      (t.width, self.embed_dim), t.param_dtype)
    self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
        nn.initializers.constant(math.log(1 / 0.07)), ()), (), jnp.float32)

  def encode_image(self, pixels: Array, normalize: bool = False) -> Array:
    """pixels [B, S, S, 3] (NHWC, ``preprocess``-ed) -> [B, E] (float32; unit norm when ``normalize``)."""
    x = self.visual(pixels)
    return _normalize(x) if normalize else x.astype(jnp.float32)

  def encode_text(self, ids: Array, normalize: bool = False) -> Array:
    """ids [B, T] (open_clip's tokenizer, T <= context_length) -> [B, E] (float32; unit norm when
    ``normalize``): the features at each row's largest id, the EOT token."""
    b, t = ids.shape
    if t > self.context_length:
      raise ValueError(f"CLIP's text tower takes at most {self.context_length} tokens, got {t}")
    x = self.token_embedding(ids) + self.positional_embedding[:t].astype(self.text.dtype)
    x = self.ln_final(self.transformer(constrain(x, _ACT)))
    x = x[jnp.arange(b), jnp.argmax(ids, axis=-1)]
    x = x @ self.text_projection.astype(x.dtype)
    return _normalize(x) if normalize else x.astype(jnp.float32)

  def __call__(self, pixels: Array, ids: Array) -> CLIPOutput:
    """pixels [B, S, S, 3], ids [C, T] -> CLIPOutput (every image against every text)."""
    image, text = self.encode_image(pixels, normalize=True), self.encode_text(ids, normalize=True)
    return CLIPOutput(image, text, jnp.exp(self.logit_scale) * image @ text.T)


def build_model(config: ml_collections.ConfigDict) -> CLIP:
  """``CLIP`` from a ``clip_config``."""
  def spec(prefix):
    return TowerSpec(width=config[f"{prefix}_width"], layers=config[f"{prefix}_layers"],
                     heads=config[f"{prefix}_heads"], mlp_ratio=config.mlp_ratio, quick_gelu=config.quick_gelu,
                     layer_norm_eps=config.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                     param_dtype=jnp.dtype(config.param_dtype))
  return CLIP(vision=spec("vision"), text=spec("text"), image_size=config.image_size, patch_size=config.patch_size,
              context_length=config.context_length, vocab_size=config.vocab_size, embed_dim=config.embed_dim)


def init_params(model: CLIP, rng: Array) -> Any:
  """Freshly initialised params (boxed with their logical names)."""
  pixels = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return model.init(rng, pixels, jnp.zeros((1, model.context_length), jnp.int32))["params"]


def abstract_params(model: CLIP) -> Any:
  """Shapes and logical names of the params, nothing allocated (``jax.eval_shape``)."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def frozen_similarity(params: Any, pixels: Array, ids: Array, *, model: CLIP) -> Array:
  """Cosine of aligned pairs: image k (pixels [B, S, S, 3], preprocessed) with text k (ids [B, T]) -> [B]
  float32. The CLIP params are constants (``stop_gradient``): gradients reach the pixels only."""
  params = jax.lax.stop_gradient(params)
  image = model.apply({"params": params}, pixels, normalize=True, method="encode_image")
  text = model.apply({"params": params}, ids, normalize=True, method="encode_text")
  return jnp.sum(image * text, axis=-1)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision's ``Resize(size)``: the short side becomes ``size``, the long one int(size x long / short)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def preprocess(images: Array, *, image_size: int, value_range: tuple[float, float] = (0.0, 1.0)) -> Array:
  """open_clip's eval transform, differentiable: images [B, H, W, 3] (uint8, or floats in ``value_range``;
  (-1, 1) for tanh generator outputs) -> float32 [B, S, S, 3]: bicubic resize of the short side to S
  (``jax.image.resize``, antialiased when shrinking, Keys a = -0.5 like PIL's), centre crop as torchvision's
  ``CenterCrop`` (offsets round((H - S) / 2)), then (x - CLIP_MEAN) / CLIP_STD. Unlike PIL it neither
  rounds to uint8 nor clips the bicubic overshoot: tests/test_clip.py measures the difference."""
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    low, high = value_range
    x = (images.astype(jnp.float32) - low) / (high - low)
  b, h, w, c = x.shape
  new_h, new_w = resized_shape(h, w, image_size)
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (b, new_h, new_w, c), method="bicubic", antialias=True)
  top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
  x = x[:, top:top + image_size, left:left + image_size]
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def tokenize(texts: list[str], *, context_length: int = 77) -> np.ndarray:
  """open_clip's own tokenizer (its BPE, lower-cased, SOT 49406 ... EOT 49407, zero padded to
  ``context_length``, truncated with the EOT kept) -> int32 [N, context_length]. Needs open_clip_torch."""
  return _tokenizer(context_length)(list(texts)).numpy().astype(np.int32)


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Any:
  import open_clip  # pylint: disable=g-import-not-at-top  (torch-side dependency, only when tokenising)
  return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
