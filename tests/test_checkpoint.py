"""Checkpoint integrity: every finished step carries a sha256 record; a corrupt, truncated or unreadable newest
step is reported in one line and the next newest good step is restored (or the run stops)."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from bigen_jax import checkpoint


def _state(step):
  return {"w": np.full((64, 64), float(step), np.float32), "m": np.arange(4096, dtype=np.float32) * step}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _write(directory, steps=(1, 2, 3), async_save=False):
  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=5, async_save=async_save)
  for step in steps:
    ckpt.save(step, _state(step), {"epoch": 0, "batch_in_epoch": step})
  ckpt.close()


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _damage(step_dir, how):
  if how == "flip":
    _flip(_largest_data_file(step_dir))
  elif how == "truncate":
    _truncate(_largest_data_file(step_dir))
  elif how == "empty_metadata":
    os.truncate(os.path.join(step_dir, "state", "_METADATA"), 0)
  elif how == "bad_record":
    with open(os.path.join(step_dir, checkpoint.RECORD_NAME), "w") as f:
      f.write("{")


@pytest.mark.parametrize("async_save", [False, True])
def test_every_finished_step_has_a_matching_record(tmp_path, async_save):
  directory = str(tmp_path / "ckpt")
  _write(directory, async_save=async_save)
  for step in (1, 2, 3):
    step_dir = os.path.join(directory, str(step))
    with open(os.path.join(step_dir, checkpoint.RECORD_NAME)) as f:
      record = json.load(f)
    assert record["step"] == step and any(k.startswith("state/") for k in record["files"])
    assert checkpoint.verify_step(step_dir) is None


@pytest.mark.parametrize("how", ["flip", "truncate", "empty_metadata", "bad_record"])
def test_damaged_newest_step_falls_back(tmp_path, capsys, how):
  directory = str(tmp_path / "ckpt")
  _write(directory)
  _damage(os.path.join(directory, "3"), how)
  ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=5)
  assert ckpt.newest_verified_step() == 2
  state, data, step = ckpt.restore(_abstract())
  ckpt.close()
  assert step == 2 and data == {"epoch": 0, "batch_in_epoch": 2}
  np.testing.assert_array_equal(state["m"], _state(2)["m"])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[checkpoint]")]
  assert len(lines) == 1 and "step 3" in lines[0] and directory in lines[0], lines
  assert os.path.isdir(os.path.join(directory + "_rejected", "3"))  # kept for inspection, out of the way
  assert not os.path.exists(os.path.join(directory, "3"))


def test_no_fallback_and_nothing_good_stop_with_one_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  _write(directory, steps=(1, 2))
  _damage(os.path.join(directory, "2"), "flip")
  strict = checkpoint.Checkpointer(directory, save_every=1, fallback=False)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 in .* fails verification: state/.* sha256.*"
                                                       r"fallback=True"):
    strict.restore(_abstract())
  strict.close()
  _damage(os.path.join(directory, "1"), "truncate")
  with pytest.raises(checkpoint.CheckpointError, match=r"step 1 .*\(truncated\?\)"):  # an explicit step: no fallback
    checkpoint.Checkpointer(directory, save_every=1).restore(_abstract(), step=1)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint can be restored: .*step 2.*step 1"):
    checkpoint.Checkpointer(directory, save_every=1).restore(_abstract())


def test_unrecorded_step_restores_unverified(tmp_path):
  """A process killed between orbax's commit and the record leaves a step without one: it is still used."""
  directory = str(tmp_path / "ckpt")
  _write(directory, steps=(1, 2))
  os.remove(os.path.join(directory, "2", checkpoint.RECORD_NAME))
  ckpt = checkpoint.Checkpointer(directory, save_every=1)
  assert ckpt.restore(_abstract())[2] == 2
  assert ckpt.newest_verified_step() == 1
  ckpt.close()


def test_unreadable_unrecorded_step_falls_back(tmp_path, capsys):
  directory = str(tmp_path / "ckpt")
  _write(directory, steps=(1, 2))
  os.remove(os.path.join(directory, "2", checkpoint.RECORD_NAME))
  os.truncate(os.path.join(directory, "2", "state", "_METADATA"), 0)
  ckpt = checkpoint.Checkpointer(directory, save_every=1)
  assert ckpt.restore(_abstract())[2] == 1
  ckpt.close()
  line, = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[checkpoint]")]
  assert "step 2" in line and "cannot be read" in line


def test_a_reader_falls_back_without_moving_anything(tmp_path):
  directory = str(tmp_path / "ckpt")
  _write(directory, steps=(1, 2))
  _damage(os.path.join(directory, "2"), "flip")
  reader = checkpoint.Checkpointer(directory, save_every=1, create=False)
  assert reader.restore(_abstract())[2] == 1
  reader.close()
  assert os.path.isdir(os.path.join(directory, "2")) and not os.path.exists(directory + "_rejected")
