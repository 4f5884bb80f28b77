"""Prediction heads on the cross-modality outputs: text (tied to the word embeddings), image (visual
cluster ids, X-LXMERT's CCC head), image-text matching and question answering. Logits are returned in float32.

The image head is transform -> dense H->D -> dense D->K, D = visual feature size (2048), K clusters; its
last layer can start from the codebook (``init_image_head_from_codebook``), as X-LXMERT's ``out_cluster``
whose weight is the centroid matrix.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigen_jax.models.layers import LayerSpec, constrain, dense, gelu, layer_norm

Array = jax.Array


def _constrain_3d(x: Array, names: tuple[str, str, str]) -> Array:
  return constrain(x, names) if x.ndim == 3 else x


class PredictionTransform(nn.Module):
  """Dense H->H, GELU, LayerNorm (LXMERT's ``LxmertPredictionHeadTransform``)."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = gelu(dense(self.spec, self.spec.hidden_size, ("embed", "hidden"), name="dense")(x))
    return layer_norm(self.spec, name="norm")(x)


class TextHead(nn.Module):
  """Word logits: transform, then the transposed word-embedding table plus a per-word bias."""
  spec: LayerSpec
  vocab_size: int

  @nn.compact
  def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
    """hidden [..., H], word_embeddings [V, H] -> logits [..., V] float32."""
    h = PredictionTransform(self.spec, name="transform")(hidden)
    logits = jnp.einsum("...h,vh->...v", h.astype(self.spec.dtype), word_embeddings.astype(self.spec.dtype))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (self.vocab_size,), self.spec.param_dtype)
    logits = logits.astype(jnp.float32) + bias.astype(jnp.float32)
    return _constrain_3d(logits, ("act_batch", "act_length", "act_vocab"))


class ImageHead(nn.Module):
  """Cluster-id logits of visual cells: transform, dense H->D, dense D->K."""
  spec: LayerSpec
  visual_feat_dim: int
  num_clusters: int

  @nn.compact
  def __call__(self, hidden: Array, *, with_features: bool = False) -> Array | tuple[Array, Array]:
    """hidden [..., H] -> logits [..., K] float32, and with ``with_features`` the D-wide feature the logits
    are read from [..., D] float32 (what ``tasks.t2i``'s feature regression fits to the target centroid)."""
    h = PredictionTransform(self.spec, name="transform")(hidden)
    feat = dense(self.spec, self.visual_feat_dim, ("embed", "visual_feat"), name="feat_proj")(h)
    logits = dense(self.spec, self.num_clusters, ("visual_feat", "clusters"), name="classifier")(feat)
    logits = _constrain_3d(logits.astype(jnp.float32), ("act_batch", "act_length", "act_clusters"))
    return (logits, feat.astype(jnp.float32)) if with_features else logits


class MatchHead(nn.Module):
  """Image-text matching logits from the pooled output (LXMERT's ``seq_relationship``)."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    """pooled [B, H] -> logits [B, 2] float32."""
    return dense(self.spec, 2, ("embed", "classes"), name="dense")(pooled).astype(jnp.float32)


class AnswerHead(nn.Module):
  """Answer logits from the pooled output (LXMERT's ``answer_head``): dense H->2H, GELU, LayerNorm,
  dense 2H->A."""
  spec: LayerSpec
  num_answers: int

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    """pooled [B, H] -> logits [B, A] float32."""
    x = gelu(dense(self.spec, 2 * self.spec.hidden_size, ("embed", "mlp"), name="dense")(pooled))
    x = layer_norm(self.spec, name="norm")(x)
    return dense(self.spec, self.num_answers, ("mlp", "answers"), name="classifier")(x).astype(jnp.float32)


def standardise_columns(codebook: Any) -> Array:
  """codebook [K, D] with each feature column shifted to mean 0 and scaled to std 1 over the K codes (float32)."""
  codebook = jnp.asarray(codebook, jnp.float32)
  return (codebook - codebook.mean(0)) / jnp.maximum(codebook.std(0), 1e-6)


def init_image_head_from_codebook(params: Any, codebook: Any, std: float = 0.0) -> Any:
  """Returns ``params`` with the image head's D->K layer set to the codebook: kernel = codebook^T, bias 0.

  params: the model's params (``{"image_head": ...}``, or a two-model tree ``{"i2t": ..., "t2i": ...}``);
  codebook [K, D] with D = the model's visual feature size. Logit k is then <feature, centroid_k>: the
  score of cluster k for a predicted feature, as in X-LXMERT where ``out_cluster.weight`` is the centroids.
  ``std`` > 0: each feature column of the codebook standardised (mean 0, std 1 over the K codes), times
  ``std``: the logits start at the scale of a random init, and clusters that share an attribute (a colour) share
  a direction of the feature, so one gradient step moves all of them.
  """
  if "image_head" not in params:
    return {k: init_image_head_from_codebook(v, codebook, std) for k, v in params.items()}
  classifier = params["image_head"]["classifier"]
  codebook = jnp.asarray(codebook, jnp.float32)  # numpy or traced (an argument of the jitted init)
  if std:
    codebook = std * standardise_columns(codebook)
  kernel = classifier["kernel"]
  value = getattr(kernel, "value", kernel)
  if value.shape != codebook.T.shape:
    raise ValueError(f"codebook {codebook.shape} does not fit the image head's classifier kernel "
                     f"{value.shape} (expected [D, K] = codebook transposed)")
  new_kernel = jnp.asarray(codebook.T, value.dtype)
  new_bias = jnp.zeros_like(getattr(classifier["bias"], "value", classifier["bias"]))
  if hasattr(kernel, "replace_boxed"):
    new_kernel = kernel.replace_boxed(new_kernel)
    new_bias = classifier["bias"].replace_boxed(new_bias)
  head = dict(params["image_head"], classifier={"kernel": new_kernel, "bias": new_bias})
  return dict(params, image_head=head)
