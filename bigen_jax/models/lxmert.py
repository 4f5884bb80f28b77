"""The unified image<->text transformer: LXMERT language/vision/cross-modality encoders plus the text, image,
matching and (optional) answer heads, in Flax linen.

Parameter tree (``scan_layers=False``; with ``scan_layers=True`` each stack holds one ``layers`` entry whose
arrays have a leading layer axis)::

  text_embed/{word,position,token_type}/embedding, text_embed/norm
  visual_embed/{feat_proj,feat_norm,box_proj,box_norm}, visual_mask_feature [D]
  language/layers_i, vision/layers_i (SelfLayer), cross/layers_i (CrossLayer), pooler
  text_head (bias; decoder tied to text_embed/word), image_head, match_head, answer_head (``num_answers`` > 0)

The visual codebook [K, D] (float32, from ``tools/build_vocab.py``) is a frozen *input* of ``__call__``, not
a parameter: the trainer keeps it outside ``params`` and it never receives gradients.
"""

import re
from typing import Any

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from bigen_jax import errors
from bigen_jax.models import layers
from bigen_jax.models.heads import AnswerHead, ImageHead, MatchHead, TextHead
from bigen_jax.models.layers import CrossLayer, LayerSpec, LayerStack, SelfLayer, constrain, dense, layer_norm

Array = jax.Array


@flax.struct.dataclass
class ModelOutput:
  """Encoder outputs. language_encoder [B, L, H] / vision_encoder [B, M, H]: the single-modality encoders;
  language [B, L, H] / vision [B, M, H]: the cross-modality encoder (the model's final outputs);
  pooled [B, H]: tanh(dense(language[:, 0])); logits [B, L, V] / [B, M, K] when asked for."""
  language_encoder: Array
  vision_encoder: Array
  language: Array
  vision: Array
  pooled: Array
  text_logits: Array | None = None
  image_logits: Array | None = None


def _embed(spec: LayerSpec, num: int, names: tuple[str, str], *, name: str) -> nn.Embed:
  return nn.Embed(num, spec.hidden_size, dtype=spec.dtype, param_dtype=spec.param_dtype,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(spec.init_std), names),
                  name=name)


class TextEmbedding(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  spec: LayerSpec
  vocab_size: int
  max_position_embeddings: int
  type_vocab_size: int

  def setup(self):
    self.word = _embed(self.spec, self.vocab_size, ("vocab", "embed"), name="word")
    self.position = _embed(self.spec, self.max_position_embeddings, ("position", "embed"), name="position")
    self.token_type = _embed(self.spec, self.type_vocab_size, ("token_type", "embed"), name="token_type")
    self.norm = layer_norm(self.spec, name="norm")
    self.dropout = nn.Dropout(self.spec.dropout_rate)

  def __call__(self, ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    """ids, token_type_ids [B, L] int -> [B, L, H]."""
    x = self.word(ids) + self.position(jnp.arange(ids.shape[1]))[None] + self.token_type(token_type_ids)
    return self.dropout(self.norm(x), deterministic=deterministic)

  def table(self) -> Array:
    """The word-embedding table [V, H] (the text head's decoder)."""
    return self.word.embedding


class VisualEmbedding(nn.Module):
  """(LN(dense(feature)) + LN(dense(box))) / 2, dropout: LXMERT's visual feature encoder."""
  spec: LayerSpec

  @nn.compact
  def __call__(self, feats: Array, boxes: Array, deterministic: bool) -> Array:
    """feats [B, M, D], boxes [B, M, 4] (x1, y1, x2, y2 in [0, 1]) -> [B, M, H]."""
    s = self.spec
    x = layer_norm(s, name="feat_norm")(dense(s, s.hidden_size, ("visual_feat", "embed"), name="feat_proj")(feats))
    y = layer_norm(s, name="box_norm")(dense(s, s.hidden_size, ("box", "embed"), name="box_proj")(boxes))
    return nn.Dropout(s.dropout_rate)((x + y) / 2, deterministic=deterministic)


def _key_mask(mask: Array | None) -> Array | None:
  """[B, S] (1/True = real) -> bool [B, 1, 1, S]."""
  return None if mask is None else jnp.asarray(mask).astype(bool)[:, None, None, :]


def _mean_over(x: Array, keys: Array | None) -> Array:
  """Mean of x [B, L, H] over the positions ``keys`` ([B, 1, 1, L] bool, None = all) allows: [B, H]."""
  if keys is None:
    return x.mean(1)
  weights = keys[:, 0, 0, :].astype(x.dtype)[..., None]
  return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class UnifiedTransformer(nn.Module):
  """One LXMERT model for both directions (I2T and T2I), with its heads."""
  spec: LayerSpec
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  visual_feat_dim: int = 2048
  image_head_dim: int = 0
  num_clusters: int = 10000
  num_language_layers: int = 9
  num_vision_layers: int = 5
  num_cross_layers: int = 5
  scan_layers: bool = False
  remat: bool = False
  # Adds a projection of the caption's mean (over the words the cells may see) to every cell's input before the
  # vision encoder: a path from caption to cells that needs no learned attention (off in LXMERT).
  caption_to_cells: bool = False
  # A dense head on the cells (``predict_code_bag``) for T2I's code-bag auxiliary (``tasks.t2i.code_bag``):
  # "codes" (H->K logits), "features" (H->D, the bag's mean feature), "" none.
  code_bag_head: str = ""
  # > 0: LXMERT's question-answering head on the pooled output, over this many answers (``tasks.qa``).
  num_answers: int = 0

  def setup(self):
    s = self.spec
    self.text_embed = TextEmbedding(s, self.vocab_size, self.max_position_embeddings, self.type_vocab_size)
    self.visual_embed = VisualEmbedding(s)
    self.visual_mask_feature = self.param(
        # N(0, 1), not zeros: LayerNorm(Linear(0)) has zero variance, and with eps 1e-12 its gradient is
        # ~1e3x the rest of the model's, which global-norm clipping then turns into no learning at all.
        "visual_mask_feature", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("visual_feat",)),
        (self.visual_feat_dim,), s.param_dtype)
    stack = dict(spec=s, scan=self.scan_layers, remat=self.remat)
    self.language = LayerStack(SelfLayer, num_layers=self.num_language_layers, **stack)
    self.vision = LayerStack(SelfLayer, num_layers=self.num_vision_layers, **stack)
    self.cross = LayerStack(CrossLayer, num_layers=self.num_cross_layers, **stack)
    self.pooler = dense(s, s.hidden_size, ("embed", "hidden"), name="pooler")
    if self.caption_to_cells:
      self.caption_proj = dense(s, s.hidden_size, ("embed", "hidden"), name="caption_proj")
    self.text_head = TextHead(s, self.vocab_size)
    self.image_head = ImageHead(s, self.image_head_dim or self.visual_feat_dim, self.num_clusters)
    self.match_head = MatchHead(s)
    if self.num_answers:
      self.answer_head = AnswerHead(s, self.num_answers)
    if self.code_bag_head:
      width, names = ((self.num_clusters, ("embed", "clusters")) if self.code_bag_head == "codes" else
                      (self.visual_feat_dim, ("embed", "visual_feat")))
      self.code_bag = dense(s, width, names, name="code_bag_head")

  def __call__(self, text_ids: Array, text_mask: Array | None = None, *, boxes: Array | None = None,
               visual_feats: Array | None = None, cluster_ids: Array | None = None,
               codebook: Array | None = None, visual_mask: Array | None = None,
               visual_attention_mask: Array | None = None, text_attention: Array | None = None,
               vision_text_mask: Array | None = None, token_type_ids: Array | None = None,
               vision_encoder: Array | None = None, deterministic: bool = True,
               text_logits: bool = False, image_logits: bool = False) -> ModelOutput:
    """Runs the encoders (and the heads asked for).

    text_ids [B, L] int; text_mask [B, L] (1 = a token every query may see: padding and I2T's hidden later
    words are 0); text_attention optional bool [B, L, L] (query i may see word j) restricting language
    self-attention further; a word no language query may see is also hidden from the visual queries;
    vision_text_mask optional [B, L] (1 = visible) restricts the words the visual queries see further (I2T's
    causal layout: [CLS] only, so that no cell sees a word that a later prediction reads);
    boxes [B, M, 4]. The visual input is either ``visual_feats`` [B, M, D] (dense) or ``cluster_ids`` [B, M]
    looked up in the frozen ``codebook`` [K, D] (discrete), both through the same projection. visual_mask
    bool [B, M]: cells replaced by the learned mask feature (T2I); visual_attention_mask [B, M]: key mask of
    cells (default all visible). Dropout needs ``rngs={"dropout": key}`` when ``deterministic=False``.
    vision_encoder [B, M, H]: the vision stream ``encode_vision`` computed from the same visual input and
    visual_attention_mask (e.g. once for every step of caption decoding); the visual embedding and vision layers
    are then skipped and boxes and the visual input must be left out.
    """
    if vision_encoder is not None:
      if self.caption_to_cells:
        raise ValueError("caption_to_cells feeds the caption into the cells' input: no vision_encoder to reuse")
      if any(x is not None for x in (boxes, visual_feats, cluster_ids, visual_mask)):
        raise ValueError("give either vision_encoder or the visual input (boxes, visual_feats/cluster_ids)")
    elif boxes is None:
      raise ValueError("boxes [B, M, 4] are needed (or a precomputed vision_encoder)")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(text_ids)
    lang_keys, vision_keys = _key_mask(text_mask), _key_mask(visual_attention_mask)
    lang_self = lang_keys
    if text_attention is not None:
      attention = jnp.asarray(text_attention).astype(bool)
      lang_self = attention[:, None] if lang_keys is None else attention[:, None] & lang_keys
      seen = _key_mask(attention.any(axis=1))  # words no language query may see are hidden from vision too
      lang_keys = seen if lang_keys is None else lang_keys & seen
    if vision_text_mask is not None:
      lang_keys = _key_mask(vision_text_mask) if lang_keys is None else lang_keys & _key_mask(vision_text_mask)

    lang = self.text_embed(text_ids, token_type_ids, deterministic)
    lang = constrain(lang, ("act_batch", "act_length", "act_embed"))
    lang = self.language(lang, lang_self, deterministic=deterministic)
    if vision_encoder is None:
      caption = _mean_over(lang, lang_keys) if self.caption_to_cells else None
      vision = self._vision_stream(boxes, visual_feats=visual_feats, cluster_ids=cluster_ids, codebook=codebook,
                                   visual_mask=visual_mask, vision_keys=vision_keys, caption=caption,
                                   deterministic=deterministic)
    else:
      vision = constrain(vision_encoder, ("act_batch", "act_length", "act_embed"))
    lang_x, vision_x = self.cross((lang, vision), lang_self, lang_keys, vision_keys, deterministic=deterministic)
    out = ModelOutput(language_encoder=lang, vision_encoder=vision, language=lang_x, vision=vision_x,
                      pooled=jnp.tanh(self.pooler(lang_x[:, 0])))
    init = self.is_initializing()
    if init:
      self.predict_match(out.pooled)
      if self.num_answers:
        self.predict_answer(out.pooled)
      if self.code_bag_head:
        self.predict_code_bag(vision_x)
    return out.replace(text_logits=self.predict_text(lang_x) if text_logits or init else None,
                       image_logits=self.predict_image(vision_x) if image_logits or init else None)

  def encode_vision(self, boxes: Array, *, visual_feats: Array | None = None, cluster_ids: Array | None = None,
                    codebook: Array | None = None, visual_mask: Array | None = None,
                    visual_attention_mask: Array | None = None, deterministic: bool = True) -> Array:
    """The vision stream [B, M, H] before the cross-modality layers (visual embedding + vision layers; the
    ``vision_encoder`` output), from the visual input as ``__call__`` takes it. It depends on the image alone, so
    caption decoding computes it once and passes it to every step's ``__call__(vision_encoder=...)``. Not for
    ``caption_to_cells`` models, whose cells read the caption."""
    if self.caption_to_cells:
      raise ValueError("caption_to_cells feeds the caption into the cells' input: the vision stream needs the text")
    return self._vision_stream(boxes, visual_feats=visual_feats, cluster_ids=cluster_ids, codebook=codebook,
                               visual_mask=visual_mask, vision_keys=_key_mask(visual_attention_mask), caption=None,
                               deterministic=deterministic)

  def _vision_stream(self, boxes: Array, *, visual_feats: Array | None, cluster_ids: Array | None,
                     codebook: Array | None, visual_mask: Array | None, vision_keys: Array | None,
                     caption: Array | None, deterministic: bool) -> Array:
    """Visual embedding (+ the caption projection of ``caption`` [B, H] when given) and vision layers:
    [B, M, H]."""
    feats = self.visual_features(visual_feats=visual_feats, cluster_ids=cluster_ids, codebook=codebook,
                                 visual_mask=visual_mask)
    vision = self.visual_embed(feats, boxes, deterministic)
    vision = constrain(vision, ("act_batch", "act_length", "act_embed"))
    if caption is not None:
      vision = vision + self.caption_proj(caption)[:, None, :].astype(vision.dtype)
    return self.vision(vision, vision_keys, deterministic=deterministic)

  def visual_features(self, *, visual_feats: Array | None, cluster_ids: Array | None, codebook: Array | None,
                      visual_mask: Array | None) -> Array:
    """Dense features, or codebook[cluster_ids] (no gradient to the codebook); masked cells -> mask feature.

    Returns [B, M, D] float32.
    """
    if (visual_feats is None) == (cluster_ids is None):
      raise ValueError("give exactly one of visual_feats (dense) and cluster_ids (discrete)")
    if cluster_ids is not None:
      if codebook is None:
        raise ValueError("cluster_ids need the codebook [K, D]")
      visual_feats = jnp.take(jax.lax.stop_gradient(jnp.asarray(codebook, jnp.float32)), cluster_ids, axis=0)
    feats = jnp.asarray(visual_feats).astype(jnp.float32)
    if visual_mask is not None:
      mask_feature = self.visual_mask_feature.astype(jnp.float32)
      feats = jnp.where(jnp.asarray(visual_mask).astype(bool)[..., None], mask_feature, feats)
    return feats

  def predict_text(self, hidden: Array) -> Array:
    """hidden [..., H] -> word logits [..., V] float32 (decoder tied to the word embeddings)."""
    return self.text_head(hidden, self.text_embed.table())

  def predict_image(self, hidden: Array) -> Array:
    """hidden [..., H] -> cluster logits [..., K] float32."""
    return self.image_head(hidden)

  def predict_match(self, pooled: Array) -> Array:
    """pooled [B, H] -> image-text matching logits [B, 2] float32."""
    return self.match_head(pooled)

  def predict_answer(self, pooled: Array) -> Array:
    """pooled [B, H] -> answer logits [B, A] float32 (needs ``num_answers`` > 0)."""
    if not self.num_answers:
      raise ValueError("the model has no answer head: set --config.model.num_answers to the answers of tasks.qa")
    return self.answer_head(pooled)

  def predict_code_bag(self, hidden: Array) -> Array:
    """Cells' hidden [B, M, H] -> what the whole image contains, float32: logits [B, M, K] of its codes
    ("codes"), or the mean feature [B, M, D] of its codes ("features")."""
    return self.code_bag(hidden).astype(jnp.float32)


class TwoModel(nn.Module):
  """The "w/o unified" ablation: an I2T model and a T2I model with separate parameters."""
  i2t: UnifiedTransformer
  t2i: UnifiedTransformer

  def __call__(self, *args, task: str, **kwargs) -> ModelOutput:
    """``task`` ("i2t" or "t2i") picks the model; other arguments as ``UnifiedTransformer.__call__``."""
    if self.is_initializing():
      self.t2i(*args, **kwargs) if task == "i2t" else self.i2t(*args, **kwargs)
    return getattr(self, task)(*args, **kwargs)

  def encode_vision(self, *args, task: str, **kwargs) -> Array:
    """``task``'s model's ``UnifiedTransformer.encode_vision``."""
    return getattr(self, task).encode_vision(*args, **kwargs)

  def predict_text(self, hidden: Array, *, task: str = "i2t") -> Array:
    return getattr(self, task).predict_text(hidden)

  def predict_image(self, hidden: Array, *, task: str = "t2i") -> Array:
    return getattr(self, task).predict_image(hidden)

  def predict_match(self, pooled: Array, *, task: str = "i2t") -> Array:
    return getattr(self, task).predict_match(pooled)

  def predict_answer(self, pooled: Array, *, task: str = "i2t") -> Array:
    return getattr(self, task).predict_answer(pooled)


def stack_layers(params: Any) -> Any:
  """Unscanned params (``stack/layers_i/...``) -> the ``scan_layers=True`` layout (``stack/layers/...`` with a
  leading layer axis). Plain arrays (unbox first)."""
  flat, groups = {}, {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    i = next((j for j, p in enumerate(path) if re.fullmatch(r"layers_\d+", p)), None)
    if i is None:
      flat[path] = value
    else:
      groups.setdefault(path[:i] + ("layers",) + path[i + 1:], {})[int(path[i][len("layers_"):])] = value
  for path, layers in groups.items():
    flat[path] = jnp.stack([jnp.asarray(layers[k]) for k in range(len(layers))])
  return flax.traverse_util.unflatten_dict(flat)


def unstack_layers(params: Any) -> Any:
  """The inverse of ``stack_layers``."""
  flat = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    if "layers" in path:
      i = path.index("layers")
      for k in range(value.shape[0]):
        flat[path[:i] + (f"layers_{k}",) + path[i + 1:]] = value[k]
    else:
      flat[path] = value
  return flax.traverse_util.unflatten_dict(flat)


def layer_spec(config: ml_collections.ConfigDict) -> LayerSpec:
  """The block hyper-parameters of a model config (``configs/model.py``)."""
  for field, choices in (("remat_policy", layers.REMAT_POLICIES), ("attention", layers.ATTENTION_IMPLEMENTATIONS)):
    if config.get(field, next(iter(choices))) not in choices:
      raise errors.ConfigError(f"--config.model.{field}={config.get(field)!r}: expected one of {sorted(choices)}")
  return LayerSpec(hidden_size=config.hidden_size, num_heads=config.num_heads, mlp_dim=config.mlp_dim,
                   dropout_rate=config.dropout_rate, attention_dropout_rate=config.attention_dropout_rate,
                   dropout_rng=config.get("dropout_rng", "threefry"),
                   layer_norm_eps=config.layer_norm_eps, init_std=config.init_std,
                   shared_cross_attention=config.get("shared_cross_attention", True),
                   remat_policy=config.get("remat_policy", "nothing"), attention=config.get("attention", "xla"),
                   fused_projections=config.get("fused_projections", False),
                   dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """``UnifiedTransformer`` (or ``TwoModel`` when ``config.two_model``) from a model config."""
  def one():
    return UnifiedTransformer(
        layer_spec(config), vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, visual_feat_dim=config.visual_feat_dim,
        image_head_dim=config.get("image_head_dim", 0), num_clusters=config.num_clusters,
        num_language_layers=config.num_language_layers, num_vision_layers=config.num_vision_layers,
        num_cross_layers=config.num_cross_layers, caption_to_cells=config.get("caption_to_cells", False),
        code_bag_head=config.get("code_bag_head", ""), num_answers=config.get("num_answers", 0),
        scan_layers=config.scan_layers, remat=config.remat)
  return TwoModel(i2t=one(), t2i=one()) if config.get("two_model") else one()


def dummy_inputs(config: ml_collections.ConfigDict, *, batch_size: int = 1) -> dict[str, Array]:
  """Zero inputs of the right shapes for ``init`` (dense visual input)."""
  b, length, m = batch_size, config.max_len, config.num_cells
  inputs = dict(text_ids=jnp.zeros((b, length), jnp.int32), text_mask=jnp.ones((b, length), jnp.int32),
                visual_feats=jnp.zeros((b, m, config.visual_feat_dim), jnp.float32),
                boxes=jnp.zeros((b, m, config.visual_pos_dim), jnp.float32))
  if config.get("two_model"):
    inputs["task"] = "i2t"
  return inputs


def init_params(model: nn.Module, config: ml_collections.ConfigDict, rng: Array) -> Any:
  """Initial params (boxed with their logical axis names; ``nn.unbox`` them for plain arrays)."""
  return model.init({"params": rng}, **dummy_inputs(config))["params"]


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict) -> Any:
  """Shapes and logical names of the params, no allocation (``jax.eval_shape``)."""
  return jax.eval_shape(lambda: init_params(model, config, jax.random.key(0)))


def init_heads(config: ml_collections.ConfigDict, rng: Array) -> dict[str, Any]:
  """Fresh params of the heads and the visual mask feature alone (plain arrays), e.g. for a checkpoint that
  has only the backbone; much cheaper than initialising the whole model."""
  spec = layer_spec(config)

  def init(key):
    k_text, k_image, k_match, k_mask = jax.random.split(key, 4)
    hidden = jnp.zeros((1, config.hidden_size), spec.dtype)
    table = jnp.zeros((config.vocab_size, config.hidden_size), spec.param_dtype)
    out = dict(
        text_head=TextHead(spec, config.vocab_size).init(k_text, hidden, table)["params"],
        image_head=ImageHead(spec, config.get("image_head_dim", 0) or config.visual_feat_dim,
                             config.num_clusters).init(k_image, hidden)["params"],
        match_head=MatchHead(spec).init(k_match, hidden)["params"],
        visual_mask_feature=jax.random.normal(k_mask, (config.visual_feat_dim,), spec.param_dtype))
    if config.get("num_answers", 0):
      out["answer_head"] = AnswerHead(spec, config.num_answers).init(jax.random.fold_in(key, 4), hidden)["params"]
    return out
  return nn.unbox(jax.jit(init)(rng))


def count_params(config: ml_collections.ConfigDict) -> int:
  """Number of trainable parameters of a model config (``jax.eval_shape``, nothing allocated)."""
  shapes = abstract_params(build_model(config), config)
  return sum(int(x.size) for x in jax.tree.leaves(shapes))
