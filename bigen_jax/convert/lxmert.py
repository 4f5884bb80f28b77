"""PyTorch LXMERT / X-LXMERT state dicts -> params of ``bigen_jax.models.lxmert``.

Accepted namings (one state dict, any mix of prefixes is normalised):
  Hugging Face ``LxmertModel`` (``embeddings.*``, ``encoder.*``, ``pooler.*``) and ``LxmertForPreTraining``
  (``lxmert.*``, ``cls.*``, ``obj_predict_head.*``, ``answer_head.*``); the original LXMERT / X-LXMERT
  checkpoints (``bert.*`` instead of ``lxmert.*``, ``module.`` from DataParallel, LayerNorm ``gamma``/``beta``).
Heads: ``cls.predictions`` -> text head (decoder tied to the word embeddings), ``cls.seq_relationship`` ->
match head, X-LXMERT's CCC head ``obj_predict_head.{transform,linear_feat,out_cluster}`` -> image head,
``mask_feat`` -> visual mask feature. Dropped, having no counterpart here: ``answer_head`` (QA),
``obj_predict_head.{decoder_dict,out_obj,out_attr}`` (LXMERT's detector-label and feature heads), and
``vis_emb.weight`` (X-LXMERT's frozen centroids: returned as ``Conversion.codebook``). LXMERT's object
head shares X-LXMERT's ``obj_predict_head.transform``, which then starts the image head's transform.
Any other key, or any missing or mis-shaped parameter, raises ``ConversionError`` counting them with examples
(or, when no key is an LXMERT one, saying it is another model's state dict); missing *head* parameters may
instead be freshly initialised (``init_missing_heads=True``).
"""

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import flax.traverse_util
import jax
import ml_collections
import numpy as np

from bigen_jax.convert import io as convert_io
from bigen_jax.convert.io import ConversionError
from bigen_jax.models import lxmert

_DROPPED = re.compile(r"^(answer_head\.|obj_predict_head\.(decoder_dict|out_obj|out_attr)\.|vis_emb\.weight$"
                      r"|embeddings\.position_ids$|cls\.predictions\.decoder\.weight$)")
_HEADS = ("text_head", "image_head", "match_head", "visual_mask_feature")


@dataclasses.dataclass(frozen=True)
class Conversion:
  """params: the model params (plain arrays); dropped: source keys without counterpart; initialised:
  param paths freshly initialised; codebook [K, D] or None (X-LXMERT's ``vis_emb.weight``)."""
  params: Any
  dropped: tuple[str, ...] = ()
  initialised: tuple[str, ...] = ()
  codebook: Any = None


def canonical_keys(state_dict: dict[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
  """Canonical name -> (original key, numpy value): strips ``module.``, maps ``lxmert.``/``bert.`` to the
  backbone (no prefix) and LayerNorm gamma/beta to weight/bias."""
  out = {}
  for key, value in state_dict.items():
    name = key
    while name.startswith("module."):
      name = name[len("module."):]
    for prefix in ("lxmert.", "bert."):
      if name.startswith(prefix):
        name = name[len(prefix):]
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    if name in out:
      raise ConversionError(f"source keys {out[name][0]!r} and {key!r} both map to {name!r}")
    value = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value)
    out[name] = (key, value)
  return out


def _linear(w):
  return w.T


def _same(w):
  return w


def _dense(src: str, dst: tuple) -> list:
  return [(f"{src}.weight", dst + ("kernel",), _linear), (f"{src}.bias", dst + ("bias",), _same)]


def _norm(src: str, dst: tuple) -> list:
  return [(f"{src}.weight", dst + ("scale",), _same), (f"{src}.bias", dst + ("bias",), _same)]


def _attention(src_att: str, src_out: str, dst: tuple) -> list:
  rows = []
  for name in ("query", "key", "value"):
    rows += _dense(f"{src_att}.{name}", dst + (name,))
  return rows + _dense(f"{src_out}.dense", dst + ("output",)) + _norm(
      f"{src_out}.LayerNorm", dst + ("norm",))


def _ffn(src_inter: str, src_out: str, dst: tuple) -> list:
  return (_dense(f"{src_inter}.dense", dst + ("intermediate",)) + _dense(f"{src_out}.dense", dst + ("output",))
          + _norm(f"{src_out}.LayerNorm", dst + ("norm",)))


def mapping(config: ml_collections.ConfigDict) -> list[tuple[str, tuple, Callable]]:
  """(canonical source key, unscanned param path, transform) for every parameter of ``config``'s model."""
  rows = [("embeddings.word_embeddings.weight", ("text_embed", "word", "embedding"), _same),
          ("embeddings.position_embeddings.weight", ("text_embed", "position", "embedding"), _same),
          ("embeddings.token_type_embeddings.weight", ("text_embed", "token_type", "embedding"), _same),
          ("mask_feat", ("visual_mask_feature",), _same)]
  rows += _norm("embeddings.LayerNorm", ("text_embed", "norm"))
  rows += _dense("encoder.visn_fc.visn_fc", ("visual_embed", "feat_proj"))
  rows += _norm("encoder.visn_fc.visn_layer_norm", ("visual_embed", "feat_norm"))
  rows += _dense("encoder.visn_fc.box_fc", ("visual_embed", "box_proj"))
  rows += _norm("encoder.visn_fc.box_layer_norm", ("visual_embed", "box_norm"))
  for src, dst, num in (("encoder.layer", "language", config.num_language_layers),
                        ("encoder.r_layers", "vision", config.num_vision_layers)):
    for i in range(num):
      p, d = f"{src}.{i}", (dst, f"layers_{i}")
      rows += _attention(f"{p}.attention.self", f"{p}.attention.output", d + ("attention",))
      rows += _ffn(f"{p}.intermediate", f"{p}.output", d + ("ffn",))
  for i in range(config.num_cross_layers):
    p, d = f"encoder.x_layers.{i}", ("cross", f"layers_{i}")
    rows += _attention(f"{p}.visual_attention.att", f"{p}.visual_attention.output", d + ("cross_attention",))
    rows += _attention(f"{p}.lang_self_att.self", f"{p}.lang_self_att.output", d + ("lang_self_attention",))
    rows += _attention(f"{p}.visn_self_att.self", f"{p}.visn_self_att.output", d + ("vision_self_attention",))
    rows += _ffn(f"{p}.lang_inter", f"{p}.lang_output", d + ("lang_ffn",))
    rows += _ffn(f"{p}.visn_inter", f"{p}.visn_output", d + ("vision_ffn",))
  rows += _dense("pooler.dense", ("pooler",))
  rows += _dense("cls.predictions.transform.dense", ("text_head", "transform", "dense"))
  rows += _norm("cls.predictions.transform.LayerNorm", ("text_head", "transform", "norm"))
  rows += [("cls.predictions.bias", ("text_head", "bias"), _same)]
  rows += _dense("cls.seq_relationship", ("match_head", "dense"))
  rows += _dense("obj_predict_head.transform.dense", ("image_head", "transform", "dense"))
  rows += _norm("obj_predict_head.transform.LayerNorm", ("image_head", "transform", "norm"))
  rows += _dense("obj_predict_head.linear_feat", ("image_head", "feat_proj"))
  rows += _dense("obj_predict_head.out_cluster", ("image_head", "classifier"))
  return rows


def _check_tied_decoder(state: dict[str, np.ndarray]) -> None:
  decoder, words = state.get("cls.predictions.decoder.weight"), state.get("embeddings.word_embeddings.weight")
  if decoder is not None and words is not None and not np.array_equal(decoder, words):
    raise ConversionError("cls.predictions.decoder.weight differs from the word embeddings: this model ties "
                          "its text-head decoder to them")


def convert(state_dict: dict[str, Any], config: ml_collections.ConfigDict, *, init_missing_heads: bool = False,
            seed: int = 0) -> Conversion:
  """Converts ``state_dict`` (any naming above) for the model of ``config``; see the module docstring."""
  named = canonical_keys(state_dict)
  state = {k: v for k, (_, v) in named.items()}
  _check_tied_decoder(state)
  flat_config = ml_collections.ConfigDict(config.to_dict())
  flat_config.scan_layers, flat_config.two_model = False, False
  model = lxmert.build_model(flat_config)
  expected = flax.traverse_util.flatten_dict(nn.unbox(lxmert.abstract_params(model, flat_config)))
  params, used, wrong = {}, set(), []
  for src, dst, fn in mapping(flat_config):
    if src in state:
      used.add(src)
      value = np.asarray(fn(state[src]), np.float32)
      if dst in expected and value.shape != expected[dst].shape:
        wrong.append(f"{named[src][0]} {state[src].shape} -> {'/'.join(dst)} expects {expected[dst].shape}")
      params[dst] = value
  dropped = tuple(sorted(named[k][0] for k in state if k not in used and _DROPPED.match(k)))
  unknown = sorted(named[k][0] for k in state if k not in used and not _DROPPED.match(k))
  missing = sorted("/".join(k) for k in expected if k not in params)
  missing_backbone = [m for m in missing if not m.startswith(_HEADS)]
  missing_heads = [m for m in missing if m.startswith(_HEADS)]
  convert_io.raise_if_foreign("LXMERT", [named[k][0] for k in state], len(used))
  convert_io.raise_if_mismatched("LXMERT", [
      ("unknown source keys (no counterpart in the model)", unknown),
      ("shape mismatches (does the config match the checkpoint?)", wrong),
      ("backbone params missing from the checkpoint", missing_backbone),
      ("head params missing from the checkpoint (pass init_missing_heads=True / --init_missing_heads to "
       "initialise them freshly)", [] if init_missing_heads else missing_heads)])
  if missing_heads:
    fresh = flax.traverse_util.flatten_dict(lxmert.init_heads(flat_config, jax.random.key(seed)))
    params.update({k: np.asarray(fresh[k]) for k in expected if k not in params})
  tree = flax.traverse_util.unflatten_dict(params)
  if config.scan_layers:
    tree = jax.tree.map(np.asarray, lxmert.stack_layers(tree))
  if config.get("two_model"):
    tree = {"i2t": tree, "t2i": jax.tree.map(np.copy, tree)}
  codebook = state.get("vis_emb.weight")
  return Conversion(params=tree, dropped=dropped, initialised=tuple(missing_heads), codebook=codebook)


def params_from_torch(state_dict: dict[str, Any], config: ml_collections.ConfigDict, **kwargs) -> Any:
  """Params of ``bigen_jax.models.lxmert.build_model(config)`` from a PyTorch LXMERT state dict
  (keyword arguments as ``convert``)."""
  return convert(state_dict, config, **kwargs).params


def hf_config(config: ml_collections.ConfigDict, **overrides: Any) -> Any:
  """The Hugging Face ``LxmertConfig`` of a model config (``configs/model.py``): the same vocabulary, widths,
  heads and layer counts, so that its PyTorch model is ours layer for layer (``overrides``: more LxmertConfig
  fields, e.g. ``task_qa=False``)."""
  from transformers import LxmertConfig  # pylint: disable=g-import-not-at-top
  return LxmertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                      num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
                      l_layers=config.num_language_layers, r_layers=config.num_vision_layers,
                      x_layers=config.num_cross_layers, visual_feat_dim=config.visual_feat_dim,
                      max_position_embeddings=config.max_position_embeddings, **overrides)
