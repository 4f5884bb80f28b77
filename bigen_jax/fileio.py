"""Paths that may be local or cloud URLs (``gs://bucket/run``): every file the training and evaluation path
reads or writes goes through ``etils.epath`` (tf.io.gfile on gs:// when TensorFlow is installed, else fsspec).

Local paths are made absolute (orbax needs absolute paths); a URL with a scheme stays as it is.
"""

import json
import os
from typing import Any

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a filesystem by scheme (``gs://``, ``s3://``), not a local file."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """``path`` made absolute if local; a URL unchanged (``os.path.abspath`` would turn ``gs://b`` into
  ``$PWD/gs:/b``)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  """``path/part/...`` as a string, keeping a URL's ``//``."""
  return os.fspath(epath.Path(path).joinpath(*parts))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes ``data`` so that readers see the old file or the whole new one, never a part.

  Local: a temporary file, fsync, rename. URL: one object write (object stores publish an object whole; a
  rename there is a copy).
  """
  target = epath.Path(path)
  mode = "wb" if isinstance(data, bytes) else "w"
  if is_url(path):
    with target.open(mode) as f:
      f.write(data)
    return
  tmp = target.with_name(target.name + ".tmp")
  with open(tmp, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str | os.PathLike) -> Any:
  """The JSON in ``path``; ``ValueError`` (json.JSONDecodeError) when it is not JSON."""
  return json.loads(epath.Path(path).read_text())
