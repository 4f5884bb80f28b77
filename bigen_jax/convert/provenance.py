"""What converted params were trained on: ``<output>.provenance.json``, written beside a converted checkpoint.

``tools/convert_lxmert.py`` writes it next to its ``--output`` (a .npz file or an orbax directory)::

  {"converter": "tools/convert_lxmert.py", "input": the PyTorch file, "feature_extractor": "frcnn_vg",
   "visual_feat_dim": D, "num_clusters": K, "codebook_sha256": the centroids' identity or null,
   "codebook_file": --codebook_out or null}

``codebook_sha256`` is ``bigen_jax.data.vocab.codebook_sha256`` of X-LXMERT's ``vis_emb.weight`` [K, D]. The
trainer (``bigen_jax.state``) compares it with the data before training from ``--config.init_from``: the records'
``backbone`` must be ``feature_extractor`` and, when the model reads cluster ids, the visual vocabulary's codebook
must be the one of ``codebook_sha256``. Reading it never touches the params file.
"""

from typing import Any

from etils import epath
import numpy as np

from bigen_jax import fileio
from bigen_jax.convert.io import ConversionError
from bigen_jax.data import vocab

SUFFIX = ".provenance.json"
REQUIRED_KEYS = ("feature_extractor", "visual_feat_dim", "num_clusters", "codebook_sha256")


def provenance_path(params_path: str) -> str:
  """The provenance file of converted params at ``params_path``: ``<params_path>.provenance.json``."""
  return str(params_path).rstrip("/") + SUFFIX


def write_provenance(params_path: str, *, converter: str, source: str, feature_extractor: str,
                     visual_feat_dim: int, num_clusters: int, codebook: np.ndarray | None = None,
                     codebook_file: str | None = None) -> dict[str, Any]:
  """Writes the provenance of the params at ``params_path``; codebook [K, D] or None. Returns what it wrote."""
  record = {"converter": converter, "input": fileio.absolute(source), "feature_extractor": feature_extractor,
            "visual_feat_dim": int(visual_feat_dim), "num_clusters": int(num_clusters),
            "codebook_sha256": None if codebook is None else vocab.codebook_sha256(codebook),
            "codebook_file": fileio.absolute(codebook_file) if codebook_file else None}
  fileio.write_json_atomic(provenance_path(params_path), record)
  return record


def remove_provenance(params_path: str) -> None:
  """Removes the provenance of the params at ``params_path`` if any: called before they are rewritten."""
  path = epath.Path(provenance_path(params_path))
  if path.exists():
    path.unlink()


def read_provenance(params_path: str) -> dict[str, Any] | None:
  """The provenance of the params at ``params_path``, or None when there is none (an older conversion)."""
  path = provenance_path(params_path)
  if not epath.Path(path).exists():
    return None
  try:
    record = fileio.read_json(path)
  except ValueError as e:
    raise ConversionError(f"{path}: not a JSON provenance file ({e})") from None
  missing = [key for key in REQUIRED_KEYS if key not in record] if isinstance(record, dict) else list(REQUIRED_KEYS)
  if missing:
    raise ConversionError(f"{path}: provenance without {', '.join(missing)}: convert again with "
                          "tools/convert_lxmert.py")
  return record
