"""torchvision ``resnet50`` state dicts -> variables of ``bigen_jax.models.resnet.ResNet50``.

Names map one to one (``layer2.0.downsample.0.weight`` -> params ``layer2/0/downsample/0/kernel``): conv
weights OIHW -> HWIO, ``bnN.weight``/``bnN.bias`` -> params ``scale``/``bias``, ``bnN.running_mean``/
``running_var`` -> batch_stats ``mean``/``var``, ``fc.weight`` [out, in] -> ``fc/kernel`` [in, out]; the
classifier may have any width (read from ``fc.weight``). Ignored: ``*.num_batches_tracked`` and a leading
``module.`` (``DataParallel``). Any other key, a missing tensor or a mis-shaped one raises ``ConversionError``
counting them with examples, so that another ResNet (resnet18/34's basic blocks, resnet101's 23-block layer3)
is refused by name instead of computing wrong features; a state dict with no ResNet key at all is named as
another model's.
"""

import re
from typing import Any

import flax.traverse_util

from bigen_jax.convert import io as convert_io
from bigen_jax.convert.io import ConversionError  # noqa: F401  (callers catch it from this module)
from bigen_jax.models import resnet

_WHAT = "torchvision resnet50"
_IGNORED = re.compile(r".*\.num_batches_tracked$")
# (collection, last Flax name) -> last torch name
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_name(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision state-dict key of the Flax variable ``collection``/``path``."""
  return ".".join(path[:-1] + (_LEAVES[(collection, path[-1])],))


def params_from_torch(state_dict: dict[str, Any]) -> dict[str, Any]:
  """{"params", "batch_stats"} (numpy float32) of ``ResNet50(num_classes=<fc.weight's outputs>)`` from a
  torchvision ``resnet50`` state dict (torch tensors or numpy arrays). See the module docstring for the naming
  and the errors."""
  state = convert_io.strip_module_prefix(state_dict, _IGNORED)
  num_classes = int(state["fc.weight"][1].shape[0]) if "fc.weight" in state else resnet.NUM_CLASSES
  expected = flax.traverse_util.flatten_dict(resnet.abstract_variables(resnet.ResNet50(num_classes=num_classes)))
  flat, used, unknown, missing, wrong = convert_io.match_torchvision(expected, state, torch_name)
  convert_io.raise_if_foreign(_WHAT, [key for key, _ in state.values()], used)
  convert_io.raise_if_mismatched(_WHAT, [
      ("unknown keys (no counterpart in ResNet50)", unknown),
      ("keys missing from the state dict", missing), ("shape mismatches", wrong)])
  return flax.traverse_util.unflatten_dict(flat)
