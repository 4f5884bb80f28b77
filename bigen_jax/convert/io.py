"""Reading PyTorch state dicts and writing/reading Flax params (orbax checkpoint directory or .npz)."""

import os
from typing import Any

import flax.traverse_util
import numpy as np

from bigen_jax import errors


class ConversionError(errors.UserError):
  """A state dict that does not fit the model: unknown, missing or mis-shaped tensors."""


def raise_if_mismatched(what: str, groups: list[tuple[str, list[str]]]) -> None:
  """Raises ``ConversionError`` listing every non-empty group of (description, keys) at once."""
  lines = [f"{len(keys)} {description}: {keys}" for description, keys in groups if keys]
  if lines:
    raise ConversionError(f"cannot convert the {what} state dict:\n  " + "\n  ".join(lines))


def _to_numpy(value: Any) -> Any:
  if hasattr(value, "detach"):  # a torch tensor: floats to float32 (bf16/fp16 have no exact numpy twin)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict from .pth/.bin (``torch.load``, weights only) or .safetensors, as numpy arrays.

  Checkpoints that wrap the state dict (``{"state_dict": ...}`` or ``{"model": ...}``) are unwrapped.
  """
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(path)
    except (TypeError, ValueError):  # bfloat16 tensors: numpy has no such dtype
      from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model", "module"):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  return {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}


def save_params(params: Any, path: str) -> None:
  """Writes params to ``path``: a ``.npz`` file (keys 'a/b/kernel') or else an orbax checkpoint directory
  (``ocp.StandardCheckpointer``, restorable with ``load_params`` or into a sharded target)."""
  params = flax.traverse_util.unflatten_dict(
      {k: np.asarray(getattr(v, "value", v)) for k, v in flax.traverse_util.flatten_dict(params).items()})
  if path.endswith(".npz"):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # then renamed: a crash never leaves a half-written file under ``path``
      np.savez(f, **flat)
    os.replace(tmp, path)
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str) -> dict[str, Any]:
  """Params written by ``save_params`` as a nested dict of numpy arrays."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return flax.traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  return jax.tree.map(np.asarray, restored)
