"""Visual vocabulary: FAISS k-means, assignment == brute force, files, resume and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bigen_jax.data import records
from bigen_jax.data import vocab
from conftest import write_records


def test_assign_equals_brute_force_nearest_centroid():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(500, 16)).astype(np.float32)
  codebook = rng.normal(size=(37, 16)).astype(np.float32)
  ids, dist = vocab.assign(feats, codebook)
  d2 = ((feats[:, None, :] - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(ids, d2.argmin(1))
  np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-4)


def test_repeated_vectors_get_a_code_each_and_k_means_fits_the_rest():
  rng = np.random.default_rng(0)
  canonical = np.array([[5.0, -5.0, 0.0], [-5.0, 5.0, 0.0]], np.float32)  # two "empty cell" vectors
  spread = rng.normal(size=(300, 3)).astype(np.float32)  # 300 distinct vectors, none repeated
  samples = np.concatenate([np.repeat(canonical, [700, 400], 0), spread])[rng.permutation(1400)]
  codebook = vocab.train_codebook(samples, k=12, iterations=10, seed=0, exact_min_count=50)
  np.testing.assert_array_equal(codebook[:2], canonical[::-1])  # first, in sorted order
  ids, dist = vocab.assign(canonical, codebook)
  np.testing.assert_array_equal(dist, 0)
  assert len(set(ids)) == 2 and set(vocab.assign(spread, codebook)[0]) <= set(range(2, 12))
  # without it, k-means spends codes by mass: the 1100 copies of two points take several of the 12
  plain = vocab.train_codebook(samples, k=12, iterations=10, seed=0)
  assert (vocab.assign(plain, canonical)[1] < 1e-3).sum() > 2
  with pytest.raises(ValueError, match="exact_min_count=50.*2 repeated feature vectors.*k=2"):
    vocab.train_codebook(samples, k=2, iterations=10, seed=0, exact_min_count=50)


def test_sample_cells_is_seeded_and_reads_the_right_cells(records_dir):
  a = vocab.sample_cells(records_dir, sample_size=100, seed=3)
  b = vocab.sample_cells(records_dir, sample_size=100, seed=3)
  c = vocab.sample_cells(records_dir, sample_size=100, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  every = np.concatenate([x["dense"].reshape(-1, 8) for x in records.read_split(records_dir, "train")])
  assert a.shape == (100, 8)
  assert all((np.abs(every - row).sum(1) == 0).any() for row in a.astype(np.float16))


def test_build_vocab_recovers_clusters_and_writes_files(tmp_path, records_dir):
  out = str(tmp_path / "vocab")
  meta = vocab.build_vocab(records_dir, out, k=10, iterations=20, sample_size=2000, seed=0)
  assert set(meta["splits"]) == {"train", "validation"}
  for split, n in (("train", 37), ("validation", 13)):
    assert meta["splits"][split]["num_examples"] == n
    assert meta["splits"][split]["relative_error"] < 0.01  # five tight blobs, ten centroids: all fit
  v = vocab.load_vocab(out, records_dir=records_dir)
  assert v.codebook.shape == (10, 8)
  ids = v.cluster_ids("validation")
  assert ids.shape == (13, 64) and ids.dtype == np.int32
  for batch in records.read_split(records_dir, "validation"):
    brute = ((batch["dense"].astype(np.float32)[..., None, :] - v.codebook) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(ids[batch["index"]], brute)


def test_rerun_is_a_no_op_and_changed_settings_rebuild(tmp_path, records_dir):
  out = str(tmp_path / "vocab")
  vocab.build_vocab(records_dir, out, k=4, iterations=5, sample_size=500, seed=0)
  stamp = os.path.getmtime(os.path.join(out, "codebook.npy"))
  vocab.build_vocab(records_dir, out, k=4, iterations=5, sample_size=500, seed=0)
  assert os.path.getmtime(os.path.join(out, "codebook.npy")) == stamp
  meta = vocab.build_vocab(records_dir, out, k=3, iterations=5, sample_size=500, seed=0)
  assert meta["k"] == 3 and vocab.load_vocab(out).codebook.shape == (3, 8)


def test_vocab_of_other_records_is_refused(tmp_path, records_dir):
  out = str(tmp_path / "vocab")
  vocab.build_vocab(records_dir, out, k=4, iterations=5, sample_size=500, seed=0)
  other = str(tmp_path / "other")
  write_records(other, seed=1)
  with pytest.raises(records.DataError, match="fingerprint"):
    vocab.load_vocab(out, records_dir=other)


def test_errors_name_the_problem(tmp_path, records_dir):
  with pytest.raises(records.DataError, match="build_vocab"):
    vocab.load_vocab(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="sample_size"):
    vocab.build_vocab(records_dir, str(tmp_path / "v"), k=50, iterations=2, sample_size=10, seed=0)
  with open(os.path.join(records_dir, "train-00001-of-00004.tfrecord"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(records.DataError, match="train-00001-of-00004.tfrecord"):
    vocab.build_vocab(records_dir, str(tmp_path / "v"), k=4, iterations=2, sample_size=500, seed=0)


def test_cli(tmp_path, records_dir):
  out = str(tmp_path / "vocab")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(root, "tools", "build_vocab.py"), "--records",
                         records_dir, "--out", out, "--k", "5", "--sample_size", "1000"],
                        capture_output=True, text=True, check=True)
  assert "relative quantisation error" in proc.stdout
  with open(os.path.join(out, "vocab.json")) as f:
    assert json.load(f)["sample_size_used"] == 1000


def _centroids(records_dir, k=7, seed=5):
  dim = records.read_manifest(records_dir)["feature_dim"]
  return (np.random.default_rng(seed).normal(size=(k, dim)) * 10).astype(np.float32)


def test_import_assigns_every_cell_to_the_given_codebook(tmp_path, records_dir):
  centroids = _centroids(records_dir)
  path = str(tmp_path / "xlxmert_centroids.npy")
  np.save(path, centroids)
  out = str(tmp_path / "vocab")
  meta = vocab.import_vocab(records_dir, out, path)
  source = meta["codebook_source"]
  assert source == {"kind": "imported", "path": path, "sha256": vocab.codebook_sha256(centroids)}
  assert meta["k"] == 7 and meta["dim"] == 8 and "iterations" not in meta
  v = vocab.load_vocab(out, records_dir=records_dir)
  np.testing.assert_array_equal(v.codebook, centroids)
  assert v.codebook_source == source
  for split, n in (("train", 37), ("validation", 13)):
    assert meta["splits"][split]["num_examples"] == n
    ids = v.cluster_ids(split)
    assert meta["splits"][split]["used_clusters"] == np.unique(ids).size
    for batch in records.read_split(records_dir, split):
      d2 = ((batch["dense"].astype(np.float32)[..., None, :] - centroids) ** 2).sum(-1)
      np.testing.assert_array_equal(ids[batch["index"]], d2.argmin(-1))
  stamp = os.path.getmtime(os.path.join(out, "codebook.npy"))
  assert vocab.import_vocab(records_dir, out, path) == meta and os.path.getmtime(
      os.path.join(out, "codebook.npy")) == stamp  # up to date
  kmeans = vocab.build_vocab(records_dir, out, k=4, iterations=2, sample_size=500, seed=0)  # replaces it
  assert kmeans["codebook_source"] == {"kind": "kmeans", "sha256": vocab.codebook_sha256(vocab.load_vocab(
      out).codebook)}


def test_import_refuses_a_codebook_of_another_width_or_not_a_codebook(tmp_path, records_dir):
  path = str(tmp_path / "wide.npy")
  np.save(path, np.zeros((7, 2048), np.float32))
  manifest = os.path.join(records_dir, "manifest.json")
  with pytest.raises(records.DataError, match=rf"{path} has 2048-d centroids.*{manifest} has feature_dim=8"):
    vocab.import_vocab(records_dir, str(tmp_path / "vocab"), path)
  np.save(path, np.zeros(8, np.float32))
  with pytest.raises(records.DataError, match=rf"codebook {path}: holds float32 \[8\], not a float \[K, D\]"):
    vocab.import_vocab(records_dir, str(tmp_path / "vocab"), path)
  with pytest.raises(records.DataError, match="no such file"):
    vocab.import_vocab(records_dir, str(tmp_path / "vocab"), str(tmp_path / "missing.npy"))
  assert not os.path.exists(tmp_path / "vocab" / "vocab.json")


def test_cli_codebook(tmp_path, records_dir):
  path = str(tmp_path / "centroids.npy")
  np.save(path, _centroids(records_dir))
  out = str(tmp_path / "vocab")
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "build_vocab.py")
  proc = subprocess.run([sys.executable, tool, "--records", records_dir, "--out", out, "--codebook", path, "--k", "5"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "--k set k-means, which --codebook" in proc.stderr
  proc = subprocess.run([sys.executable, tool, "--records", records_dir, "--out", out, "--codebook", path],
                        capture_output=True, text=True, check=True)
  assert "/7 clusters used" in proc.stdout
  with open(os.path.join(out, "vocab.json")) as f:
    assert json.load(f)["codebook_source"]["kind"] == "imported"
