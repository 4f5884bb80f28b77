"""The one atomic write (``fileio.atomic_path`` / ``open_atomic`` / ``write_atomic``): a reader sees the old file
or the whole new one; a writer that fails leaves the old file and no temporary file."""

import os

import numpy as np
import pytest

from bigen_jax import fileio


def test_writes_replace_the_file_whole(tmp_path):
  path = str(tmp_path / "a.json")
  fileio.write_json_atomic(path, {"x": 1})
  fileio.write_atomic(path, "new")
  assert open(path).read() == "new"
  with fileio.open_atomic(path) as f:
    np.savez(f, x=np.arange(3))  # a writer that takes a file object
  np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))
  with fileio.atomic_path(path) as tmp:  # a writer that takes a path
    assert tmp != path and not os.path.exists(tmp)
    with open(tmp, "w") as f:
      f.write("via path")
    assert open(path, "rb").read()[:2] == b"PK"  # still the old file until the block ends
  assert open(path).read() == "via path"
  assert os.listdir(tmp_path) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / "a.txt")
  fileio.write_atomic(path, "old")
  with pytest.raises(RuntimeError):
    with fileio.open_atomic(path, "w") as f:
      f.write("half")
      raise RuntimeError("writer died")
  assert open(path).read() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_missing_folders_are_made(tmp_path):
  path = tmp_path / "eval" / "deep" / "results.json"
  fileio.write_json_atomic(str(path), {"x": 1})
  assert path.read_text().startswith("{") and os.listdir(path.parent) == ["results.json"]
