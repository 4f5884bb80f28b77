"""Paths that may be local or cloud URLs (``gs://bucket/run``): every file the training and evaluation path
reads or writes goes through ``etils.epath`` (tf.io.gfile on gs:// when TensorFlow is installed, else fsspec).

Local paths are made absolute (orbax needs absolute paths); a URL with a scheme stays as it is. Every file the
project writes goes through one atomic write (``atomic_path``, and ``open_atomic`` / ``write_atomic`` on it).
"""

import contextlib
import io
import json
import os
import shutil
from typing import IO, Any, Iterator

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields the path to write ``path``'s new content to, for writers that take a path (``tf.io.TFRecordWriter``);
  readers of ``path`` see the old file or the whole new one, never a part.

  Local: a temporary file beside ``path`` (``<name>.tmp<pid>``; missing parent folders are made), fsynced and
  renamed over it when the block ends; removed if the block raises. URL: ``path`` itself (object stores publish an object whole when its writer closes;
  a rename there is a copy).
  """
  if is_url(path):
    yield os.fspath(path)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  try:
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
  """A file object whose content replaces ``path`` atomically when the block ends (``atomic_path``), for writers
  that take a file (``np.savez``, ``torch.save``, ``PIL.Image.save``). On a URL the content is written as one
  object at the end, and not at all if the block raises."""
  if not is_url(path):
    with atomic_path(path) as tmp, open(tmp, mode) as f:
      yield f
    return
  buffer = io.BytesIO() if "b" in mode else io.StringIO()
  yield buffer
  with epath.Path(path).open(mode) as f:
    f.write(buffer.getvalue())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes ``data`` so that readers see the old file or the whole new one, never a part (``open_atomic``)."""
  with open_atomic(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str | os.PathLike) -> Any:
  """The JSON in ``path``; ``ValueError`` (json.JSONDecodeError) when it is not JSON."""
  return json.loads(epath.Path(path).read_text())


def fsync_folder(folder: str) -> None:
  """fsyncs a local folder's entry list (a rename inside it survives a crash)."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def replace_directory(tmp: str, out: str) -> None:
  """Publishes the complete local folder ``tmp`` as ``out`` by rename: an existing ``out`` is renamed aside first
  and removed after, so ``out`` is always either the old folder or the whole new one."""
  old = f"{out}.old{os.getpid()}"
  if os.path.exists(out):
    os.replace(out, old)
  os.replace(tmp, out)
  fsync_folder(os.path.dirname(out))
  if os.path.exists(old):
    shutil.rmtree(old)
