"""open_clip state dicts (``open_clip.model.CLIP``, ViT image tower) -> params of ``bigen_jax.models.clip``.

Names map one to one (``visual.transformer.resblocks.3.mlp.c_fc.weight`` -> ``visual/transformer/resblocks_3/
mlp/c_fc/kernel``): Linear weights [out, in] -> kernels [in, out], ``attn.in_proj_weight`` [3W, W] /
``in_proj_bias`` [3W] split into ``query``/``key``/``value``, ``conv1.weight`` OIHW -> HWIO, LayerNorm
``weight`` -> ``scale``, ``token_embedding.weight`` -> ``embedding``; embeddings, ``proj``,
``text_projection`` and ``logit_scale`` as they are. Ignored: a leading ``module.`` and the integers
``input_resolution``/``context_length``/``vocab_size`` that OpenAI's checkpoints carry. Any other key (a
``logit_bias``, an attention pooler), a missing tensor or a mis-shaped one raises ``ConversionError``
counting them with examples; a state dict with no CLIP key at all is named as another model's.

``config_from_state_dict`` reads a ``clip_config`` off the shapes; ``open_clip_kwargs`` gives the arguments
of ``open_clip.model.CLIP`` that build the PyTorch twin of a config (tests, the CLI's ``--random_init``).
"""

import re
from typing import Any, Callable

import flax.linen as nn
import flax.traverse_util
import ml_collections
import numpy as np

from bigen_jax.convert import io as convert_io
from bigen_jax.convert.io import ConversionError  # noqa: F401  (callers catch it from this module)
from bigen_jax.models import clip

_WHAT = "open_clip CLIP"
_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")
Row = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray]]


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


def _scalar(w: np.ndarray) -> np.ndarray:
  return w.reshape(()) if w.size == 1 else w  # open_clip's nonscalar_logit_scale stores [1]


def _part(i: int, width: int, kernel: bool) -> Callable[[np.ndarray], np.ndarray]:
  """Rows i W .. (i + 1) W of in_proj_weight (transposed) or in_proj_bias: q (0), k (1) or v (2)."""
  def take(w):
    part = w[i * width:(i + 1) * width]
    return part.T if kernel else part
  return take


def _linear(src: str, dst: tuple[str, ...]) -> list[Row]:
  return [(f"{src}.weight", dst + ("kernel",), _transpose), (f"{src}.bias", dst + ("bias",), _same)]


def _norm(src: str, dst: tuple[str, ...]) -> list[Row]:
  return [(f"{src}.weight", dst + ("scale",), _same), (f"{src}.bias", dst + ("bias",), _same)]


def _tower(src: str, dst: tuple[str, ...], width: int, layers: int) -> list[Row]:
  rows = []
  for i in range(layers):
    p, d = f"{src}transformer.resblocks.{i}", dst + ("transformer", f"resblocks_{i}")
    rows += _norm(f"{p}.ln_1", d + ("ln_1",)) + _norm(f"{p}.ln_2", d + ("ln_2",))
    for j, name in enumerate(("query", "key", "value")):
      rows += [(f"{p}.attn.in_proj_weight", d + ("attn", name, "kernel"), _part(j, width, True)),
               (f"{p}.attn.in_proj_bias", d + ("attn", name, "bias"), _part(j, width, False))]
    rows += _linear(f"{p}.attn.out_proj", d + ("attn", "out"))
    rows += _linear(f"{p}.mlp.c_fc", d + ("mlp", "c_fc")) + _linear(f"{p}.mlp.c_proj", d + ("mlp", "c_proj"))
  return rows


def mapping(config: ml_collections.ConfigDict) -> list[Row]:
  """(open_clip key, param path, transform) for every parameter of ``config``'s model."""
  v = ("visual",)
  rows = [("visual.conv1.weight", v + ("conv1", "kernel"), lambda w: w.transpose(2, 3, 1, 0)),
          ("visual.class_embedding", v + ("class_embedding",), _same),
          ("visual.positional_embedding", v + ("positional_embedding",), _same),
          ("visual.proj", v + ("proj",), _same)]
  rows += _norm("visual.ln_pre", v + ("ln_pre",)) + _norm("visual.ln_post", v + ("ln_post",))
  rows += _tower("visual.", v, config.vision_width, config.vision_layers)
  rows += [("token_embedding.weight", ("token_embedding", "embedding"), _same),
           ("positional_embedding", ("positional_embedding",), _same),
           ("text_projection", ("text_projection",), _same), ("logit_scale", ("logit_scale",), _scalar)]
  rows += _norm("ln_final", ("ln_final",))
  return rows + _tower("", (), config.text_width, config.text_layers)


def params_from_torch(state_dict: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Params (numpy float32, no logical-name boxes) of ``clip.build_model(config)`` from an open_clip state
  dict (torch tensors or numpy arrays). See the module docstring for the naming and the errors."""
  state = convert_io.strip_module_prefix(state_dict, _IGNORED)
  expected = flax.traverse_util.flatten_dict(nn.unbox(clip.abstract_params(clip.build_model(config))))
  rows = mapping(config)
  assert {dst for _, dst, _ in rows} == set(expected), "mapping() and the model disagree"  # a bug, not the input
  flat, used, missing, wrong = {}, set(), [], []
  for src, dst, fn in rows:
    if src not in state:
      missing.append(src)
      continue
    used.add(src)
    key, tensor = state[src]
    value = np.asarray(fn(convert_io.float32_array(tensor)), np.float32)
    if value.shape != expected[dst].shape and not any(w.startswith(f"{key} ") for w in wrong):  # once per key
      wrong.append(f"{key} {tuple(tensor.shape)} -> {'/'.join(dst)} expects {tuple(expected[dst].shape)}")
    flat[dst] = value
  unknown = sorted(key for name, (key, _) in state.items() if name not in used)
  convert_io.raise_if_foreign(_WHAT, [key for key, _ in state.values()], len(used))
  convert_io.raise_if_mismatched(_WHAT, [
      ("unknown keys (no counterpart in the model)", unknown),
      ("keys missing from the state dict", sorted(set(missing))),
      ("shape mismatches (does the config match the checkpoint?)", wrong)])
  return flax.traverse_util.unflatten_dict(flat)


def _layers(state: dict[str, Any], visual: bool) -> int:
  found = {int(m.group(2)) for k in state for m in [_BLOCK.match(k)] if m and bool(m.group(1)) == visual}
  return max(found) + 1 if found else 0


def config_from_state_dict(state_dict: dict[str, Any], *, quick_gelu: bool = False, head_width: int = 64,
                           **overrides: Any) -> ml_collections.ConfigDict:
  """A ``clip_config`` read off the shapes of an open_clip ViT state dict. Heads are not in the shapes:
  width // ``head_width`` (64, open_clip's and OpenAI's rule for both towers of every ViT-B/L model); nor is
  the activation (``quick_gelu``: True for OpenAI's weights)."""
  state = {name: tensor for name, (_, tensor) in convert_io.strip_module_prefix(state_dict, _IGNORED).items()}
  needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "ln_final.weight")
  absent = [k for k in needed if k not in state]
  if absent:
    raise ConversionError(f"cannot read a CLIP config off the state dict: no {convert_io.summarise(absent)}")
  vision_width, _, patch, _ = state["visual.conv1.weight"].shape
  grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  vocab_size, text_width = state["token_embedding.weight"].shape
  if "visual.transformer.resblocks.0.mlp.c_fc.weight" in state:
    overrides.setdefault("mlp_ratio", state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width)
  return clip.clip_config(
      "vit_b32", embed_dim=int(state["visual.proj"].shape[1]), image_size=int(grid * patch),
      patch_size=int(patch), vision_width=int(vision_width), vision_layers=_layers(state, True),
      vision_heads=int(vision_width) // head_width, context_length=int(state["positional_embedding"].shape[0]),
      vocab_size=int(vocab_size), text_width=int(text_width), text_layers=_layers(state, False),
      text_heads=int(text_width) // head_width, quick_gelu=quick_gelu, **overrides)


def open_clip_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Arguments of ``open_clip.model.CLIP(**kwargs)`` for the PyTorch model of ``config``."""
  return dict(
      embed_dim=config.embed_dim, quick_gelu=config.quick_gelu,
      vision_cfg=dict(image_size=config.image_size, patch_size=config.patch_size, width=config.vision_width,
                      layers=config.vision_layers, head_width=config.vision_width // config.vision_heads,
                      mlp_ratio=config.mlp_ratio),
      text_cfg=dict(context_length=config.context_length, vocab_size=config.vocab_size, width=config.text_width,
                    heads=config.text_heads, layers=config.text_layers, mlp_ratio=config.mlp_ratio))
