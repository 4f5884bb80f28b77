"""Inception-v3 state dicts -> variables of ``bigen_jax.models.inception.InceptionV3``: pytorch-fid's FID
Inception (``pt_inception-2015-12-05-6726825d.pth``, variant "fid") or torchvision's ``inception_v3``
(variant "torchvision").

The two hold the same tensors except the classifier: 1008 outputs for the FID Inception, 1000 for
torchvision's. ``detect_variant`` reads it from ``fc.weight``; asking for the other variant raises
``ConversionError`` (the blocks differ in their pools, so the weights would run in the wrong network and give
wrong features without any other error).

Names map one to one (``Mixed_5b.branch1x1.conv.weight`` -> params ``Mixed_5b/branch1x1/conv/kernel``):
conv weights OIHW -> HWIO, ``bn.weight``/``bn.bias`` -> params ``scale``/``bias``, ``bn.running_mean``/
``bn.running_var`` -> batch_stats ``mean``/``var``, ``fc.weight`` -> transposed ``fc/kernel``. Ignored:
``AuxLogits.*`` (the training-only auxiliary head), ``*.num_batches_tracked``, a leading ``module.``. Any
other key, or a missing or mis-shaped tensor, raises ``ConversionError`` counting them with examples (or, when
no key is an Inception one, saying it is another model's state dict).
"""

import re
from typing import Any

import flax.traverse_util

from bigen_jax.convert import io as convert_io
from bigen_jax.convert.io import ConversionError  # noqa: F401  (callers catch it from this module)
from bigen_jax.models import inception

_IGNORED = re.compile(r"^(AuxLogits\.|.*\.num_batches_tracked$)")
# (collection, last Flax name) -> last torch name
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_name(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision state-dict key of the Flax variable ``collection``/``path``."""
  return ".".join(path[:-1] + (_LEAVES[(collection, path[-1])],))


def _describe(variant: str) -> str:
  return {"fid": "pytorch-fid's FID Inception (pt_inception-2015-12-05, 1008 classes)",
          "torchvision": "torchvision's inception_v3"}[variant]


def detect_variant(state_dict: dict[str, Any]) -> str | None:
  """"fid" when ``fc.weight`` has 1008 outputs, "torchvision" for any other width; None without ``fc.weight``
  (the conversion then reports it missing)."""
  state = convert_io.strip_module_prefix(state_dict, _IGNORED)
  if "fc.weight" not in state:
    return None
  return inception.variant_for(int(state["fc.weight"][1].shape[0]))


def params_from_torch(state_dict: dict[str, Any], *, variant: str | None = None) -> dict[str, Any]:
  """{"params", "batch_stats"} (numpy float32) from an FID Inception or torchvision ``inception_v3`` state
  dict (any ``num_classes``, read from ``fc.weight``). ``variant``: the network the caller means to run them
  in ("fid" or "torchvision"), checked against ``detect_variant``; None accepts either. See the module
  docstring for the naming and the errors."""
  if variant is not None and variant not in inception.VARIANTS:
    raise ValueError(f"unknown Inception variant {variant!r}: expected one of {inception.VARIANTS}")
  state = convert_io.strip_module_prefix(state_dict, _IGNORED)
  detected = detect_variant(state_dict)
  num_classes = int(state["fc.weight"][1].shape[0]) if "fc.weight" in state else 0
  model = inception.InceptionV3(variant=detected or variant or "torchvision", num_classes=num_classes)
  expected = flax.traverse_util.flatten_dict(inception.abstract_variables(model))
  flat, used, unknown, missing, wrong = convert_io.match_torchvision(expected, state, torch_name)
  convert_io.raise_if_foreign("inception_v3", [key for key, _ in state.values()], used)
  if variant is not None and detected is not None and detected != variant:
    raise ConversionError(f"a state dict of {_describe(detected)} (fc.weight has {num_classes} outputs), not of "
                          f"{_describe(variant)}: the two pool differently, so it would compute wrong features; "
                          f"convert it as variant {detected!r} (tools/convert_inception.py --variant={detected})")
  convert_io.raise_if_mismatched("inception_v3", [
      ("unknown keys (no counterpart in InceptionV3)", unknown),
      ("keys missing from the state dict", missing), ("shape mismatches", wrong)])
  return flax.traverse_util.unflatten_dict(flat)
