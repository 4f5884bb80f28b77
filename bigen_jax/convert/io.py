"""Reading PyTorch state dicts and writing/reading Flax params (orbax checkpoint directory or .npz).

A file that is not a usable state dict (missing, text, truncated, an unsafe pickle, a bad .safetensors header,
no tensors) raises ``ConversionError`` with one line that names the file and says what it is.
"""

import contextlib
import io
import os
import pickletools
import re
from typing import Any, Callable, Iterator
import warnings
import zipfile

from etils import epath
import flax.traverse_util
import numpy as np

from bigen_jax import errors
from bigen_jax import fileio

_EXAMPLES = 5  # keys quoted per group in a mismatch message; the counts say how many there are
_ZIP_MAGIC = b"PK\x03\x04"


class ConversionError(errors.UserError):
  """A file that is not a state dict, or a state dict that does not fit the model: unknown, missing or
  mis-shaped tensors."""


def summarise(keys: list[str]) -> str:
  """``keys`` quoted in full when few, else the first ``_EXAMPLES`` and how many more: one readable line."""
  shown = ", ".join(keys[:_EXAMPLES])
  return shown if len(keys) <= _EXAMPLES else f"e.g. {shown} and {len(keys) - _EXAMPLES} more"


def raise_if_mismatched(what: str, groups: list[tuple[str, list[str]]]) -> None:
  """Raises one ``ConversionError`` with every non-empty group of (description, keys): counts and examples."""
  parts = [f"{len(keys)} {description} ({summarise(keys)})" for description, keys in groups if keys]
  if parts:
    raise ConversionError(f"cannot convert the {what} state dict: " + "; ".join(parts))


def param_tree_mismatches(want: Any, have: Any) -> tuple[list[tuple], list[tuple], list[tuple]]:
  """(missing, unexpected, misshaped): the flattened names (key tuples, sorted) where params ``have`` differ from
  the model's tree ``want`` (arrays or ``ShapeDtypeStruct``s): absent, extra, or of another shape."""
  want, have = flax.traverse_util.flatten_dict(want), flax.traverse_util.flatten_dict(have)
  missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  misshaped = sorted(k for k in set(want) & set(have) if tuple(np.shape(have[k])) != tuple(want[k].shape))
  return missing, unexpected, misshaped


def raise_if_foreign(what: str, keys: list[str], used: int) -> None:
  """Raises ``ConversionError`` when none of the state dict's ``keys`` is a parameter of the model ``what``:
  the state dict of another model, told apart from a near miss that ``raise_if_mismatched`` details."""
  if keys and not used:
    raise ConversionError(f"not a state dict of {what}: none of its {len(keys)} keys ({summarise(sorted(keys))}) "
                          f"names a parameter of {what}")


@contextlib.contextmanager
def naming_file(path: str) -> Iterator[None]:
  """Prefixes ``path`` to a ``ConversionError`` raised inside, so that its one line names the file."""
  try:
    yield
  except ConversionError as e:
    if str(e).startswith(f"{path}: "):
      raise
    raise ConversionError(f"{path}: {e}") from e


def float32_array(value: Any) -> np.ndarray:
  """A torch tensor or array as numpy float32."""
  return np.asarray(_to_numpy(value), np.float32)


def torchvision_to_flax(name: str, value: np.ndarray, *, linear: str = "fc.weight") -> np.ndarray:
  """A torchvision convnet's tensor ``name`` in Flax layout: conv OIHW -> HWIO, the ``linear`` weight [out, in]
  -> [in, out], anything else as it is."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if name == linear:
    return value.T
  return value


def strip_module_prefix(state_dict: dict[str, Any], ignored: re.Pattern) -> dict[str, tuple[str, Any]]:
  """{name without a leading ``module.`` (DataParallel): (the key as found, tensor)}, names ``ignored`` matches
  dropped."""
  state = {}
  for key, value in state_dict.items():
    name = key[len("module."):] if key.startswith("module.") else key
    if not ignored.match(name):
      state[name] = (key, value)
  return state


def match_torchvision(expected: dict[tuple[str, ...], Any], state: dict[str, tuple[str, Any]],
                      torch_name: Callable[[str, tuple[str, ...]], str]
                      ) -> tuple[dict[tuple[str, ...], np.ndarray], int, list[str], list[str], list[str]]:
  """A torchvision convnet's tensors placed at the Flax variables they fill.

  expected: the flattened abstract variables {(collection, *path): ShapeDtypeStruct}; state: {torch name:
  (key as found in the file, tensor)}; torch_name(collection, path) names a variable's tensor. Returns (flat
  float32 variables in Flax layout, how many tensors were used, unknown keys, missing torch names, shape
  mismatches), each list sorted or in variable order, for ``raise_if_foreign`` / ``raise_if_mismatched``.
  """
  flat, used, missing, wrong = {}, set(), [], []
  for (collection, *path), spec in expected.items():
    name = torch_name(collection, tuple(path))
    if name not in state:
      missing.append(name)
      continue
    used.add(name)
    key, tensor = state[name]
    value = torchvision_to_flax(name, float32_array(tensor))
    if value.shape != spec.shape:
      wrong.append(f"{key} {tuple(tensor.shape)} -> {collection}/{'/'.join(path)} expects {tuple(spec.shape)}")
    flat[(collection, *path)] = value
  unknown = sorted(key for name, (key, _) in state.items() if name not in used)
  return flat, len(used), unknown, sorted(missing), wrong


def _to_numpy(value: Any) -> Any:
  if hasattr(value, "detach"):  # a torch tensor: floats to float32 (bf16/fp16 have no exact numpy twin)
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict from .pth/.bin (``torch.load``, weights only) or .safetensors, as numpy arrays.

  Checkpoints that wrap the state dict (``{"state_dict": ...}`` or ``{"model": ...}``) are unwrapped. A file
  that cannot be read raises ``ConversionError`` naming it and what it is (see ``describe_unreadable``).
  """
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file")
  if os.path.isdir(path):
    raise ConversionError(f"{path}: is a directory, not a state dict file (.pth, .bin or .safetensors)")
  if os.path.getsize(path) == 0:
    raise ConversionError(f"{path}: is empty (0 bytes), not a state dict")
  if path.endswith(".safetensors"):
    state = _load_safetensors(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    try:
      with warnings.catch_warnings():  # torch warns about the protocol of a plain pickle it then refuses
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds; describe_unreadable sorts them)
      if "weights_only" in str(e):  # torch's text advises weights_only=False, which runs the file's code: not shown
        raise ConversionError(describe_unreadable(path, e)) from None
      raise ConversionError(describe_unreadable(path, e)) from e
  for wrapper in ("state_dict", "model", "module"):
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict (a dict of tensors)")
  tensors = {k: _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}
  if not tensors:
    raise ConversionError(f"{path}: holds no tensors, so it is not a state dict (keys: "
                          f"{summarise(sorted(map(str, state)))})")
  return tensors


def _load_safetensors(path: str) -> dict[str, Any]:
  import safetensors  # pylint: disable=g-import-not-at-top
  try:
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
    except (TypeError, ValueError):  # bfloat16 tensors: numpy has no such dtype
      from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
  except safetensors.SafetensorError as e:
    raise ConversionError(f"{path}: not a valid .safetensors file ({_first_line(e)})") from e


def describe_unreadable(path: str, error: Exception) -> str:
  """One line naming ``path`` and what it is, for a file ``torch.load(weights_only=True)`` failed on.

  Never advises ``weights_only=False``: that runs arbitrary code from the file.
  """
  with open(path, "rb") as f:
    head = f.read(4096)
  if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
    return (f"{path}: truncated or corrupt torch checkpoint: a zip archive without its central directory (an "
            f"interrupted download or copy?)")
  unsafe = _unsafe_globals(path, head, error)
  if unsafe:
    return (f"{path}: refused as unsafe: loading it would import and run {summarise(unsafe)}; only tensors and "
            f"plain containers are read (save model.state_dict() or .safetensors instead)")
  kind = _text_kind(head)
  if kind:
    return f"{path}: not a PyTorch checkpoint: it is {kind} (starts with {head[:40].decode('utf-8', 'replace')!r})"
  reason = _first_line(error.__context__ or error)
  reason = f" ({type(error).__name__}: {reason})" if reason and "weights_only" not in reason else ""
  if head.startswith(_ZIP_MAGIC):
    return f"{path}: a zip archive but not a readable PyTorch checkpoint{reason}"
  if head.startswith(b"\x80"):
    return f"{path}: a pickle, but not a PyTorch checkpoint written by torch.save{reason}"
  return f"{path}: not a PyTorch checkpoint (.pth/.bin) nor .safetensors: unknown format{reason}"


def _unsafe_globals(path: str, head: bytes, error: Exception) -> list[str]:
  """Classes/functions the pickle in ``path`` would import that weights-only loading refuses."""
  named = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(error))
  if head.startswith(_ZIP_MAGIC):
    import torch  # pylint: disable=g-import-not-at-top
    try:
      named += torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # pylint: disable=broad-except  (best effort: the message above may have the name)
      pass
  elif head.startswith(b"\x80"):  # a plain pickle; pickletools only parses it, nothing is imported or run
    named += _pickle_globals(path)
  return sorted(set(named))


def _pickle_globals(path: str) -> list[str]:
  """``module.name`` of every GLOBAL / STACK_GLOBAL in the first pickle of ``path``."""
  names, strings = [], []
  with open(path, "rb") as f:
    try:
      for opcode, arg, _ in pickletools.genops(f):
        if opcode.name == "GLOBAL":
          names.append(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
          names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
          strings.append(arg)
    except ValueError:  # a damaged pickle: the names read so far
      pass
  return names


def _text_kind(head: bytes) -> str | None:
  """What ``head`` is when it reads as UTF-8 text ("a JSON file" or "a text file"), else None."""
  if b"\x00" in head:
    return None
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as e:
    if e.start < len(head) - 3:  # not just a character cut at the end of the head
      return None
  return "a JSON file" if head.lstrip()[:1] in (b"{", b"[") else "a text file"


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0].strip() if text else ""


def save_params(params: Any, path: str) -> None:
  """Writes params to ``path``: a ``.npz`` file (keys 'a/b/kernel') or else an orbax checkpoint directory
  (``ocp.StandardCheckpointer``, restorable with ``load_params`` or into a sharded target)."""
  params = flax.traverse_util.unflatten_dict(
      {k: np.asarray(getattr(v, "value", v)) for k, v in flax.traverse_util.flatten_dict(params).items()})
  if path.endswith(".npz"):
    with fileio.open_atomic(path) as f:  # a crash never leaves a half-written file under ``path``
      np.savez(f, **flax.traverse_util.flatten_dict(params, sep="/"))
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(fileio.absolute(path), params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str) -> dict[str, Any]:
  """Params written by ``save_params`` as a nested dict of numpy arrays (``path`` local or a URL)."""
  if path.endswith(".npz"):
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
      return flax.traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(fileio.absolute(path))
  return jax.tree.map(np.asarray, restored)
