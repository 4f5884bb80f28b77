"""Runs on a cloud bucket: train -> checkpoint -> resume -> evaluate with ``--workdir gs://bucket/run`` and the
visual vocabulary and tokenizer in the bucket, on a fake GCS.

What the fake is, and why: nothing here can reach GCS, and TensorFlow's gs:// filesystem has a fixed endpoint.
``gs://bucket/...`` is mapped onto a local directory for the three clients that touch it:
  - etils.epath (our code, orbax's metadata, renames and listings): through fsspec (``EPATH_USE_TF=false``, as
    without TensorFlow), with a ``gs`` filesystem over that directory that answers as gcsfs does;
  - tensorstore (orbax's arrays): orbax's GCS kvstore spec, pointed at the same directory with the file driver
    (tensorstore's own gcs driver needs a server; its ``memory`` driver is private to one context);
  - TensorFlow (clu's summary writer): the log directory mapped the same way.
Orbax takes its GCS code paths (no rename-based commit, ``commit_success.txt``). The records stay local: the
tf.data reader opens gs:// with TensorFlow's own filesystem, which no fake can serve.
"""

import importlib
import json
import os

from etils import epath
from fsspec.implementations import dirfs
from fsspec.implementations import local
import jax
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest
import tensorflow as tf

from bigen_jax import checkpoint
from bigen_jax import errors
from bigen_jax import evaluate
from bigen_jax import fileio
from bigen_jax import metrics as metrics_lib
from bigen_jax import train
from bigen_jax.convert import io as convert_io
from bigen_jax.data import records
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from bigen_jax.worlds.scenes import recognizer as scene_recognizer
from configs import demo
from conftest import write_records

BUCKET = "gs://bucket"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """A local directory standing for ``gs://bucket``'s parent (see the module docstring); returns it."""
  root = tmp_path / "gcs"
  (root / "bucket").mkdir(parents=True)

  def local_path(url):
    return os.path.join(root, os.fspath(url).split("://", 1)[1])

  class FakeGCSFileSystem(dirfs.DirFileSystem):
    """gcsfs' answers (``bucket/path``, no scheme) from a local directory."""
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, **kwargs):
      del kwargs  # gcsfs options (finalize_on_close)
      super().__init__(path=str(root), fs=local.LocalFileSystem(auto_mkdir=True))  # objects need no folders

    def _join(self, path):
      if isinstance(path, str):
        return super()._join(path.split("://", 1)[-1])
      return super()._join([p.split("://", 1)[-1] for p in path])

  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)  # cached: an earlier gs:// use chose tf
  registry = importlib.import_module("fsspec.registry")._registry  # fsspec.register_implementation, undone after
  for name in FakeGCSFileSystem.protocol:
    monkeypatch.setitem(registry, name, FakeGCSFileSystem)
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": local_path(path)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  file_writer = tf.summary.create_file_writer
  monkeypatch.setattr(tf.summary, "create_file_writer",
                      lambda logdir, *a, **k: file_writer(local_path(logdir) if fileio.is_url(logdir) else logdir,
                                                          *a, **k))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a URL taken for a local path would land here (``./gs:/bucket/...``)
  yield root
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.listdir(cwd), os.listdir(cwd)


def _upload(local_dir, url):
  for name in os.listdir(local_dir):
    with open(os.path.join(local_dir, name), "rb") as f:
      (epath.Path(url) / name).write_bytes(f.read())


def test_the_fake_is_the_bucket(fake_gcs):
  """Our paths reach the fake through epath as ``gs://`` URLs (no local path is involved)."""
  path = epath.Path(f"{BUCKET}/dir/file.txt")
  assert str(path) == f"{BUCKET}/dir/file.txt" and fileio.absolute(str(path)) == str(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.write_atomic(str(path), "hello")
  assert (fake_gcs / "bucket" / "dir" / "file.txt").read_text() == "hello"
  assert [p.name for p in epath.Path(BUCKET).iterdir()] == ["dir"]


def test_records_manifest_and_shards_in_the_bucket(fake_gcs, tmp_path):
  local_dir = str(tmp_path / "records")
  manifest = write_records(local_dir, splits={"train": 12}, shard_size=5)
  url = f"{BUCKET}/records"
  _upload(local_dir, url)
  assert records.read_manifest(url) == manifest
  shards = records.split_shards(url, "train", checksum=True)
  assert [s["path"] for s in shards] == [f"{url}/{s['file']}" for s in manifest["splits"]["train"]["shards"]]
  shard = epath.Path(url) / shards[0]["file"]
  data = shard.read_bytes()
  shard.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])  # same size, one byte changed
  with pytest.raises(records.DataError, match=f"shard {url}/train-00000-of-00003.tfrecord does not match"):
    records.split_shards(url, "train", checksum=True)


@pytest.mark.slow  # ~50 s; the other tests here keep records, shards and converted params in the bucket
def test_train_resume_evaluate_with_a_gs_workdir(fake_gcs, tmp_path):
  records_dir, vocab_dir = str(tmp_path / "records"), str(tmp_path / "vocab")
  write_records(records_dir, splits={"train": 16, "validation": 8}, dim=8, max_len=6)
  vocab.build_vocab(records_dir, vocab_dir, k=6, iterations=2, sample_size=500, seed=0)
  _upload(vocab_dir, f"{BUCKET}/vocab")
  (epath.Path(BUCKET) / "vocab.txt").write_text(
      "\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=records_dir, vocab_dir=f"{BUCKET}/vocab", tokenizer=f"{BUCKET}/vocab.txt"))
  config.update(dict(total_steps=4, stop_at_step=2, log_every=1))
  config.checkpoint.update(dict(every=2, keep=1))
  config.eval.update(dict(every=0, evaluators=("validation_loss",)))
  config.mesh.num_devices = 2
  workdir = f"{BUCKET}/run"
  local_run = fake_gcs / "bucket" / "run"

  train.train_and_evaluate(config, workdir)
  assert os.path.exists(local_run / "checkpoints" / "2" / checkpoint.RECORD_NAME)
  assert checkpoint.verify_step(f"{workdir}/checkpoints/2") is None
  config.stop_at_step = 0
  state = train.train_and_evaluate(config, workdir)  # resumes from gs://bucket/run/checkpoints/2
  assert int(state.step) == 4
  assert sorted(os.listdir(local_run / "checkpoints")) == ["4"]  # keep=1: step 2 deleted in the bucket
  history = [json.loads(line) for line in (local_run / metrics_lib.HISTORY_NAME).read_text().splitlines()]
  assert [row["step"] for row in history] == [1, 2, 3, 4]
  assert (local_run / "config.json").exists()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(local_run))

  results, step = evaluate.evaluate(None, workdir)  # the saved config, from the bucket
  assert step == 4 and np.isfinite(results["validation_loss/i2t/loss"])
  assert fileio.read_json(f"{workdir}/eval/results_4.json") == pytest.approx(results)
  assert (local_run / "eval" / "results_4.md").read_text().startswith("| metric (step 4) | value |")


def test_converted_params_and_recogniser_in_the_bucket(fake_gcs):
  """``init_from`` files (npz and orbax) and the scene recogniser are written to and read from the bucket."""
  params = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.float32)}}
  for url in (f"{BUCKET}/init/params.npz", f"{BUCKET}/init/orbax"):
    convert_io.save_params(params, url)
    jax.tree.map(np.testing.assert_array_equal, convert_io.load_params(url), params)
  assert (fake_gcs / "bucket" / "init" / "params.npz").exists()
  directory = f"{BUCKET}/recogniser"
  with pytest.raises(errors.UserError, match=f"no scene recogniser in {directory}"):
    scene_recognizer.load(directory)
  weights = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), jax.eval_shape(scene_recognizer.init_params))
  scene_recognizer.save_recognizer(scene_recognizer.recognizer_path(directory), weights, {"steps": 0})
  loaded, report = scene_recognizer.load(directory)
  jax.tree.map(np.testing.assert_array_equal, loaded, weights)
  assert report == {"steps": 0}
