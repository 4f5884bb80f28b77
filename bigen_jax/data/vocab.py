"""The visual vocabulary: FAISS k-means over grid-cell features, and every cell's cluster id (METHOD.md §1).

``build_vocab`` reads a records directory (``tools/extract_features.py``), samples training cells, trains
k-means with FAISS, assigns every cell of every split to its nearest centroid and writes into ``vocab_dir``:

  codebook.npy            float32 [K, D]   the centroids (the discrete features)
  cluster_ids_{split}.npy int32 [n, 64]    cluster id of each cell; row = the record's ``index``
  vocab.json              k, dim, iterations, sample size, seed, quantisation error per split, the
                          fingerprint of the records it was built from and ``codebook_source`` (``kind``
                          "kmeans" or "imported", ``sha256``: ``codebook_sha256``); written last, so its
                          presence means the vocabulary is complete.

``import_vocab`` writes the same files for an imported codebook (X-LXMERT's centroids, written by
``tools/convert_lxmert.py --codebook_out``): no k-means, every cell assigned to the given centroids.

Re-running skips what is already written for the same settings; every file is written atomically.
"""

import hashlib
import io
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np

from bigen_jax import fileio
from bigen_jax.data import records

CODEBOOK_NAME = "codebook.npy"
META_NAME = "vocab.json"


def cluster_ids_name(split: str) -> str:
  return f"cluster_ids_{split}.npy"


def records_fingerprint(manifest: Mapping[str, Any]) -> str:
  """Hash of the shards' checksums: a vocabulary is only valid for the records it was built from."""
  h = hashlib.sha256()
  for split in sorted(manifest["splits"]):
    for shard in manifest["splits"][split]["shards"]:
      h.update(f"{split}:{shard['file']}:{shard['sha256']};".encode())
  return h.hexdigest()[:16]


def save_npy(path: str, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array)
  fileio.write_atomic(path, buffer.getvalue())


def load_npy(path: str) -> np.ndarray:
  with epath.Path(path).open("rb") as f:
    return np.load(io.BytesIO(f.read()))


def sample_cells(records_dir: str, *, sample_size: int, seed: int, split: str = "train") -> np.ndarray:
  """A seeded uniform sample of ``sample_size`` grid cells of ``split``: float32 [S, D].

  Cells are drawn without replacement from all n*64 cells; the draw depends only on the seed and the split
  size, not on how the records are sharded.
  """
  manifest = records.read_manifest(records_dir)
  n = manifest["splits"][split]["num_examples"]
  total = n * records.NUM_CELLS
  if sample_size <= 0:
    raise ValueError(f"--sample_size must be positive, got {sample_size}")
  chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(sample_size, total), replace=False))
  rows, cells = np.divmod(chosen, records.NUM_CELLS)
  out = np.empty((len(chosen), manifest["feature_dim"]), np.float32)
  for batch in records.read_split(records_dir, split):
    lo, hi = np.searchsorted(rows, [batch["index"].min(), batch["index"].max() + 1])
    position = {int(i): j for j, i in enumerate(batch["index"])}
    take = [position[int(r)] for r in rows[lo:hi]]
    out[lo:hi] = batch["dense"][take, cells[lo:hi]]
  return out


def exact_codes(samples: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray]:
  """The feature vectors that occur at least ``min_count`` times in ``samples`` [S, D], in sorted order
  [E, D], and a mask [S] of the samples that are none of them."""
  if min_count <= 0:
    return np.zeros((0, samples.shape[1]), np.float32), np.ones(len(samples), bool)
  rows, inverse, counts = np.unique(samples, axis=0, return_inverse=True, return_counts=True)
  frequent = counts >= min_count
  return rows[frequent].astype(np.float32), ~frequent[inverse.reshape(-1)]


def train_codebook(samples: np.ndarray, *, k: int, iterations: int, seed: int, exact_min_count: int = 0
                   ) -> np.ndarray:
  """The codebook float32 [k, D]: FAISS k-means (L2) on ``samples`` [S, D].

  ``exact_min_count`` > 0: every feature vector repeated at least that often in the sample is a code of its
  own (first rows), and k-means fits the other k - E codes to the rest. A backbone that writes one canonical
  vector for a whole class of cells (``gated_logits`` of the scenes detector: empty cells) thereby gets one
  code for it, instead of k-means spending codes by mass on copies of one point.
  """
  import faiss  # pylint: disable=g-import-not-at-top
  exact, rest = exact_codes(samples, exact_min_count)
  if len(exact) >= k:
    raise ValueError(f"--exact_min_count={exact_min_count}: {len(exact)} repeated feature vectors leave no "
                     f"codes of k={k} for k-means: raise --exact_min_count or --k")
  samples, k = samples[rest], k - len(exact)
  if samples.shape[0] < k:
    raise ValueError(f"k-means needs at least k={k} samples, got {samples.shape[0]}: raise --sample_size")
  km = faiss.Kmeans(samples.shape[1], k, niter=iterations, seed=seed, verbose=False,
                    max_points_per_centroid=max(256, -(-samples.shape[0] // k)))
  km.train(np.ascontiguousarray(samples, np.float32))
  return np.concatenate([exact, np.asarray(km.centroids, np.float32)])


def assign(features: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Nearest centroid of each row of ``features`` [N, D]: (ids int32 [N], squared distances float32 [N])."""
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatL2(codebook.shape[1])
  index.add(np.ascontiguousarray(codebook, np.float32))
  dist, ids = index.search(np.ascontiguousarray(features, np.float32), 1)
  return ids[:, 0].astype(np.int32), dist[:, 0]


def assign_split(records_dir: str, split: str, codebook: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
  """Cluster ids of every cell of ``split``, int32 [n, 64], and its quantisation statistics."""
  n = records.read_manifest(records_dir)["splits"][split]["num_examples"]
  ids = np.full((n, records.NUM_CELLS), -1, np.int32)
  sq_err = sq_norm = 0.0
  for batch in records.read_split(records_dir, split):
    feats = batch["dense"].astype(np.float32).reshape(-1, codebook.shape[1])
    cell_ids, dist = assign(feats, codebook)
    ids[batch["index"]] = cell_ids.reshape(-1, records.NUM_CELLS)
    sq_err += float(dist.sum())
    sq_norm += float(np.square(feats).sum())
  if (ids < 0).any():
    raise records.DataError(f"split {split!r} of {records_dir}: some record indices are missing")
  cells = max(ids.size, 1)
  stats = {"num_examples": n, "mse": sq_err / cells, "relative_error": sq_err / max(sq_norm, 1e-12),
           "used_clusters": int(np.unique(ids).size)}
  return ids, stats


def codebook_sha256(codebook: np.ndarray) -> str:
  """The identity of a codebook [K, D]: sha256 of its float32 little-endian values, row-major (not of a file)."""
  return hashlib.sha256(np.ascontiguousarray(codebook, "<f4").tobytes()).hexdigest()


def read_codebook(path: str) -> np.ndarray:
  """A codebook float32 [K, D] from a .npy file; a file that is not one is a ``DataError`` naming it."""
  if not epath.Path(path).is_file():
    raise records.DataError(f"codebook {path}: no such file")
  try:
    codebook = load_npy(path)
  except (ValueError, OSError, EOFError) as e:
    raise records.DataError(f"codebook {path}: not a .npy array file ({str(e).splitlines()[0][:200]})") from None
  if codebook.ndim != 2 or not codebook.size or not np.issubdtype(codebook.dtype, np.floating):
    raise records.DataError(f"codebook {path}: holds {codebook.dtype} {list(codebook.shape)}, not a float [K, D] "
                            "array of centroids")
  return codebook.astype(np.float32)


def _records_settings(records_dir: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
  return {"dim": manifest["feature_dim"], "records": fileio.absolute(records_dir),
          "records_fingerprint": records_fingerprint(manifest), "backbone": manifest["backbone"]}


def _existing(vocab_dir: str, settings: Mapping[str, Any], splits: Sequence[str]) -> dict[str, Any] | None:
  """vocab.json of ``vocab_dir`` when it was built with ``settings`` for ``splits`` and more; else None, a stale
  vocab.json removed (the directory is created)."""
  epath.Path(vocab_dir).mkdir(parents=True, exist_ok=True)
  meta_path = fileio.join(vocab_dir, META_NAME)
  if epath.Path(meta_path).exists():
    old = fileio.read_json(meta_path)
    if all(old.get(key) == value for key, value in settings.items()) and set(splits) <= set(old["splits"]):
      logging.info("vocabulary in %s is up to date", vocab_dir)
      return old
    epath.Path(meta_path).unlink()
  return None


def _write_vocab(records_dir: str, vocab_dir: str, codebook: np.ndarray, meta: dict[str, Any],
                 splits: Sequence[str]) -> dict[str, Any]:
  """Writes ``codebook`` [K, D], every split's cluster ids and, last, vocab.json (``meta`` + split statistics)."""
  save_npy(fileio.join(vocab_dir, CODEBOOK_NAME), codebook)
  meta = {**meta, "splits": {}}
  for split in splits:
    ids, stats = assign_split(records_dir, split, codebook)
    save_npy(fileio.join(vocab_dir, cluster_ids_name(split)), ids)
    meta["splits"][split] = stats
    print(f"[vocab] {split}: {stats['num_examples']} images, mse {stats['mse']:.4f}, relative quantisation "
          f"error {stats['relative_error']:.4f}, {stats['used_clusters']}/{len(codebook)} clusters used", flush=True)
  fileio.write_json_atomic(fileio.join(vocab_dir, META_NAME), meta)
  return meta


def build_vocab(records_dir: str, vocab_dir: str, *, k: int, iterations: int = 20, sample_size: int,
                seed: int = 0, splits: Sequence[str] | None = None, exact_min_count: int = 0
                ) -> dict[str, Any]:
  """Trains the codebook on train cells and assigns all splits; returns the contents of ``vocab.json``."""
  manifest = records.read_manifest(records_dir)
  splits = list(splits or manifest["splits"])
  settings = {"k": k, "iterations": iterations, "sample_size": sample_size, "seed": seed,
              "exact_min_count": exact_min_count, **_records_settings(records_dir, manifest)}
  old = _existing(vocab_dir, settings, splits)
  if old is not None:
    return old
  t = time.time()
  samples = sample_cells(records_dir, sample_size=sample_size, seed=seed)
  codebook = train_codebook(samples, k=k, iterations=iterations, seed=seed, exact_min_count=exact_min_count)
  logging.info("k-means: %d clusters on %d cells of dim %d in %.1fs", k, len(samples), samples.shape[1],
               time.time() - t)
  meta = {**settings, "sample_size_used": int(len(samples)),
          "exact_codes": int(len(exact_codes(samples, exact_min_count)[0])),
          "codebook_source": {"kind": "kmeans", "sha256": codebook_sha256(codebook)}}
  return _write_vocab(records_dir, vocab_dir, codebook, meta, splits)


def import_vocab(records_dir: str, vocab_dir: str, codebook_path: str, *, splits: Sequence[str] | None = None
                 ) -> dict[str, Any]:
  """Assigns every cell of ``splits`` (default: all) to the imported codebook [K, D] in ``codebook_path`` (.npy)
  instead of training k-means; writes what ``build_vocab`` writes and returns the contents of ``vocab.json``."""
  manifest = records.read_manifest(records_dir)
  splits = list(splits or manifest["splits"])
  codebook = read_codebook(codebook_path)
  if codebook.shape[1] != manifest["feature_dim"]:
    raise records.DataError(
        f"codebook {codebook_path} has {codebook.shape[1]}-d centroids but the records' "
        f"{fileio.join(records_dir, records.MANIFEST_NAME)} has feature_dim={manifest['feature_dim']} (backbone "
        f"{manifest['backbone']!r}): extract features with the backbone the codebook was made for")
  source = {"kind": "imported", "path": fileio.absolute(codebook_path), "sha256": codebook_sha256(codebook)}
  settings = {"k": int(codebook.shape[0]), **_records_settings(records_dir, manifest), "codebook_source": source}
  old = _existing(vocab_dir, settings, splits)
  if old is not None:
    return old
  logging.info("imported codebook %s: %d clusters of dim %d", codebook_path, *codebook.shape)
  return _write_vocab(records_dir, vocab_dir, codebook, settings, splits)


class Vocab:
  """A built visual vocabulary: ``codebook`` [K, D], ``meta`` (vocab.json) and per-split cluster ids."""

  def __init__(self, vocab_dir: str, *, records_dir: str | None = None):
    self.dir = vocab_dir
    meta_path = fileio.join(vocab_dir, META_NAME)
    if not epath.Path(meta_path).exists():
      raise records.DataError(f"no {META_NAME} in {vocab_dir}: run tools/build_vocab.py first")
    self.meta = fileio.read_json(meta_path)
    self.codebook = load_npy(fileio.join(vocab_dir, CODEBOOK_NAME))
    if self.codebook.shape != (self.meta["k"], self.meta["dim"]):
      raise records.DataError(f"{vocab_dir}/{CODEBOOK_NAME} has shape {self.codebook.shape}, {meta_path} "
                              f"says k={self.meta['k']}, dim={self.meta['dim']}")
    if records_dir is not None:
      have = records_fingerprint(records.read_manifest(records_dir))
      if have != self.meta["records_fingerprint"]:
        raise records.DataError(f"vocabulary {meta_path} was built from other records than {records_dir} "
                                "(fingerprint differs): rebuild it with tools/build_vocab.py")

  @property
  def k(self) -> int:
    return self.meta["k"]

  @property
  def codebook_source(self) -> dict[str, Any]:
    """Where the codebook came from: {"kind": "kmeans"} or {"kind": "imported", "path", "sha256"}."""
    return self.meta.get("codebook_source", {"kind": "kmeans"})

  def cluster_ids(self, split: str) -> np.ndarray:
    """int32 [n, 64] cluster ids of ``split`` (row = record index)."""
    if split not in self.meta["splits"]:
      raise records.DataError(f"{self.dir}/{META_NAME} has no cluster ids for split {split!r}")
    ids = load_npy(fileio.join(self.dir, cluster_ids_name(split)))
    if ids.shape != (self.meta["splits"][split]["num_examples"], records.NUM_CELLS):
      raise records.DataError(f"{self.dir}/{cluster_ids_name(split)} has shape {ids.shape}, "
                              f"expected [{self.meta['splits'][split]['num_examples']}, 64]")
    return ids


def load_vocab(vocab_dir: str, *, records_dir: str | None = None) -> Vocab:
  return Vocab(vocab_dir, records_dir=records_dir)
