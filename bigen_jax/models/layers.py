"""Transformer blocks of LXMERT (Tan & Bansal, 2019) in Flax linen: post-LayerNorm, GELU, shared cross-attention.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) and the main activations a
logical constraint; ``bigen_jax.parallel`` maps the names to mesh axes. Shapes: B batch, T queries, S keys,
N heads, K head size, H hidden (= N K), F FFN width. Masks are boolean, True = may attend, broadcastable to
[B, 1, T, S]; ``None`` means no masking.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
constrain = nn.with_logical_constraint


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """The hyper-parameters every block needs (a typed subset of the model config)."""
  hidden_size: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dropout_rng: str = "threefry"
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  shared_cross_attention: bool = True
  remat_policy: str = "nothing"  # what a rematerialised layer keeps for the backward pass (REMAT_POLICIES)
  attention: str = "xla"  # jax.nn.dot_product_attention's implementation where no dropout applies ("cudnn")
  fused_projections: bool = False  # q, k, v of a self-attention (k, v of a cross-attention) as one matmul
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


# ``remat_policy`` -> what ``jax.checkpoint`` saves of a layer's forward pass: "nothing" (recompute the whole
# layer in the backward pass: least memory), "dots" (the outputs of matmuls without batch dimensions, i.e. the
# dense projections; attention, softmax, GELU, LayerNorm and dropout are recomputed), "dots_all" (every matmul,
# the attention's too).
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}

# ``attention`` -> ``jax.nn.dot_product_attention``'s implementation: "xla" (any backend) or "cudnn" (NVIDIA GPUs:
# cuDNN's fused flash attention, bf16/fp16 only). Training with attention dropout keeps the explicit softmax
# (``attention_with_dropout``) whatever this says: jax's fused kernels take no dropout.
ATTENTION_IMPLEMENTATIONS = {"xla": None, "cudnn": "cudnn"}


def _dense_inits(spec: LayerSpec, names: tuple[str, str]) -> tuple[Any, Any]:
  """The kernel init N(0, init_std) with logical axes ``names`` and the zero bias init with ``names[-1:]``."""
  return (nn.with_logical_partitioning(nn.initializers.normal(spec.init_std), names),
          nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


def dense(spec: LayerSpec, features: int, names: tuple[str, str], *, name: str) -> nn.Dense:
  """Dense layer with N(0, init_std) kernel [in, out] and zero bias, both with logical axis ``names``."""
  kernel_init, bias_init = _dense_inits(spec, names)
  return nn.Dense(features, dtype=spec.dtype, param_dtype=spec.param_dtype, kernel_init=kernel_init,
                  bias_init=bias_init, name=name)


class DenseParams(nn.Module):
  """The kernel [in_features, features] and bias [features] of ``dense``, returned instead of applied: the same
  parameter names, initialisers and axis names (the parameter tree and its initial values are ``dense``'s), so
  that attention can apply several projections of one input as one matmul."""
  spec: LayerSpec
  in_features: int
  features: int
  names: tuple[str, str]

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    kernel_init, bias_init = _dense_inits(self.spec, self.names)
    kernel = self.param("kernel", kernel_init, (self.in_features, self.features), self.spec.param_dtype)
    bias = self.param("bias", bias_init, (self.features,), self.spec.param_dtype)
    return kernel, bias


def fused_dense(spec: LayerSpec, x: Array, params: list[tuple[Array, Array]]) -> list[Array]:
  """Several dense layers of one input as one matmul: x [B, T, I], params [(kernel [I, O], bias [O])] -> one
  [B, T, O] per layer, as ``nn.Dense`` computes each (inputs and parameters in ``spec.dtype``). The kernels are
  stacked on a new axis between in and out, so a kernel sharded on its out axis stays sharded the same way."""
  kernel = jnp.stack([k for k, _ in params], axis=1).astype(spec.dtype)
  bias = jnp.stack([b for _, b in params], axis=0).astype(spec.dtype)
  y = jnp.einsum("bti,ico->btco", x.astype(spec.dtype), kernel) + bias
  return [y[:, :, i] for i in range(len(params))]


def layer_norm(spec: LayerSpec, *, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=spec.layer_norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


def gelu(x: Array) -> Array:
  return nn.gelu(x, approximate=False)


def attention_with_dropout(q: Array, k: Array, v: Array, mask: Array | None, *, rate: float,
                           rng: Array) -> Array:
  """The math of ``jax.nn.dot_product_attention`` plus dropout on the probabilities (LXMERT trains with it).

  q [B, T, N, K], k/v [B, S, N, K], mask broadcastable to [B, N, T, S] -> [B, T, N, K].
  """
  logits = jnp.einsum("btnk,bsnk->bnts", q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
  return jnp.einsum("bnts,bsnk->btnk", probs, v)


def _output(spec: LayerSpec, y: Array, x: Array, in_name: str, deterministic: bool) -> Array:
  """How every LXMERT sub-layer ends (call inside a compact method): dense to H (params ``output``),
  dropout, LayerNorm(y + x) (params ``norm``). y [B, T, *], x [B, T, H] -> [B, T, H]."""
  y = dense(spec, spec.hidden_size, (in_name, "embed"), name="output")(y)
  y = nn.Dropout(spec.dropout_rate)(y, deterministic=deterministic)
  y = layer_norm(spec, name="norm")(y + x)
  return constrain(y, ("act_batch", "act_length", "act_embed"))


class AttentionBlock(nn.Module):
  """LXMERT attention sub-layer: multi-head attention of x over context, output dense, dropout, LN(out + x)."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array | None, deterministic: bool) -> Array:
    """x [B, T, H], context [B, S, H] -> [B, T, H]."""
    s = self.spec
    b, t, _ = x.shape
    heads = (s.num_heads, s.hidden_size // s.num_heads)
    names = ("act_batch", "act_length", "act_heads", "act_kv")

    def split_heads(y):
      return constrain(y.reshape(y.shape[:2] + heads), names)

    if s.fused_projections:
      proj = {n: DenseParams(s, inputs.shape[-1], s.hidden_size, ("embed", "heads"), name=n)()
              for n, inputs in (("query", x), ("key", context), ("value", context))}
      if context is x:
        q, k, v = fused_dense(s, x, [proj["query"], proj["key"], proj["value"]])
      else:
        q, = fused_dense(s, x, [proj["query"]])
        k, v = fused_dense(s, context, [proj["key"], proj["value"]])
    else:
      q, k, v = (dense(s, s.hidden_size, ("embed", "heads"), name=n)(inputs)
                 for n, inputs in (("query", x), ("key", context), ("value", context)))
    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    if deterministic or s.attention_dropout_rate == 0.0:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=ATTENTION_IMPLEMENTATIONS[s.attention])
    else:
      y = attention_with_dropout(q, k, v, mask, rate=s.attention_dropout_rate, rng=self.make_rng("dropout"))
    y = constrain(y, names).reshape(b, t, s.hidden_size)
    return _output(s, y, x, "heads", deterministic)


class FeedForward(nn.Module):
  """LXMERT FFN sub-layer: dense H->F, GELU, dense F->H, dropout, LN(out + x)."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """x [B, T, H] -> [B, T, H]."""
    s = self.spec
    h = gelu(dense(s, s.mlp_dim, ("embed", "mlp"), name="intermediate")(x))
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return _output(s, h, x, "mlp", deterministic)


class SelfLayer(nn.Module):
  """A single-modality layer (language or vision encoder): self-attention then FFN."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> tuple[Array, None]:
    """x [B, T, H], mask [B, 1, T|1, T] -> (x [B, T, H], None); the scan-carry signature."""
    x = AttentionBlock(self.spec, name="attention")(x, x, mask, deterministic)
    return FeedForward(self.spec, name="ffn")(x, deterministic), None


class CrossLayer(nn.Module):
  """A cross-modality layer: one cross-attention module used in both directions (``shared_cross_attention``;
  False gives vision -> language its own), then per-modality self-attention and FFN (LXMERT's
  ``LxmertXLayer``)."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, carry: tuple[Array, Array], lang_self_mask: Array | None, lang_key_mask: Array | None,
               vision_mask: Array | None, deterministic: bool) -> tuple[tuple[Array, Array], None]:
    """carry (lang [B, L, H], vision [B, M, H]); lang_self_mask [B, 1, L|1, L] (language self-attention),
    lang_key_mask [B, 1, 1, L] (vision -> language), vision_mask [B, 1, 1, M]."""
    lang, vision = carry
    cross = AttentionBlock(self.spec, name="cross_attention")
    lang_x = cross(lang, vision, vision_mask, deterministic)
    if not self.spec.shared_cross_attention:  # an ablation: each direction its own module
      cross = AttentionBlock(self.spec, name="vision_cross_attention")
    vision_x = cross(vision, lang, lang_key_mask, deterministic)
    lang = AttentionBlock(self.spec, name="lang_self_attention")(lang_x, lang_x, lang_self_mask, deterministic)
    vision = AttentionBlock(self.spec, name="vision_self_attention")(vision_x, vision_x, vision_mask,
                                                                     deterministic)
    lang = FeedForward(self.spec, name="lang_ffn")(lang, deterministic)
    vision = FeedForward(self.spec, name="vision_ffn")(vision, deterministic)
    return (lang, vision), None


class LayerStack(nn.Module):
  """``num_layers`` copies of ``layer``: a Python loop (params ``layers_0``, ``layers_1``, ...) or ``nn.scan``
  (params stacked under ``layers`` with a leading 'layers' axis), each optionally rematerialised."""
  layer: Any
  spec: LayerSpec
  num_layers: int
  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, carry: Any, *args: Any, deterministic: bool = True) -> Any:
    """carry: the layer's carry; args: broadcast to every layer (masks)."""
    if self.num_layers == 0:
      return carry
    layer = self.layer
    if self.remat:
      layer = nn.remat(layer, prevent_cse=not self.scan, static_argnums=(len(args) + 2,),
                       policy=REMAT_POLICIES[self.spec.remat_policy])
    if self.scan:
      layer = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * (len(args) + 1), length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      carry, _ = layer(self.spec, name="layers")(carry, *args, deterministic)
      return carry
    for i in range(self.num_layers):
      carry, _ = layer(self.spec, name=f"layers_{i}")(carry, *args, deterministic)
    return carry
