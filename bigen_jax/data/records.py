"""The TFRecord schema of extracted grid features: the one place the extractor and the input pipeline agree on.

A dataset directory holds sharded TFRecord files per split plus ``manifest.json``::

    {"version": 1, "backbone": "demo", "backbone_config": {...}, "feature_dim": D, "grid": 8,
     "max_len": 17, "max_captions": 5, "image_size": ..., "store_images": false, "store_image_size": null,
     "tokenizer": {"vocab_file", "vocab_size", "sha256"}, "source": {"name", ..., "paths": {...}},
     "splits": {"train": {"num_examples": n, "requested_examples": n, "shard_size": s, "complete": true,
                          "shards": [{"file": "train-00000-of-00004.tfrecord", "num_examples": k,
                                      "num_bytes": b, "sha256": "..."}, ...],
                          "skipped": [{"shard", "image_id", "key", "path", "reason"}, ...]}}}

``skipped`` (present only when images were skipped, ``--on_bad_image=skip``) lists the source's unreadable
images, which have no record. Records are serialised deterministically: rewriting a shard gives the same bytes.

Each record is one image (a ``tf.train.Example``):
  index        int64        position of the example within its split (0..n-1), keys side tables such as the
                            per-cell cluster ids written by the visual-vocabulary tool
  image_id     int64        dataset image id (COCO id, scene number)
  key          bytes        human-readable id (file name, ``scenes/train/000042``)
  dense        bytes        float16 little-endian grid features, [64, D] row-major
  boxes        float32[256] normalised cell boxes (x1, y1, x2, y2), [64, 4] row-major
  caption_ids  int64[N*L]   WordPiece ids of N captions, each padded to L = max_len
  captions     bytes[N]     the raw caption strings (references for evaluation)
  image        bytes        optional encoded image (PNG/JPEG) for training the image generator
"""

import hashlib
import json
from typing import Any, Iterable, Mapping

from etils import epath
import numpy as np

from bigen_jax import errors
from bigen_jax import fileio

SCHEMA_VERSION = 1
GRID = 8
NUM_CELLS = GRID * GRID
MANIFEST_NAME = "manifest.json"
REQUIRED_MANIFEST_KEYS = ("version", "backbone", "feature_dim", "grid", "max_len", "splits")


class DataError(errors.UserError):
  """Bad or inconsistent data on disk; the message names the file or field."""


def grid_boxes(grid: int = GRID) -> np.ndarray:
  """Normalised boxes of the grid cells in row-major order, [grid*grid, 4] float32 (x1, y1, x2, y2).

  Cell (i, j) (row i, column j) is (j/g, i/g, (j+1)/g, (i+1)/g), as in X-LXMERT.
  """
  i, j = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  i, j = i.reshape(-1), j.reshape(-1)
  return (np.stack([j, i, j + 1, i + 1], axis=-1) / grid).astype(np.float32)


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def encode_example(*, index: int, image_id: int, key: str, dense: np.ndarray, boxes: np.ndarray,
                   caption_ids: np.ndarray, captions: Iterable[str], image: bytes = b"") -> bytes:
  """Serialises one image's record, byte-reproducibly. ``dense`` [64, D] (stored as float16), ``caption_ids``
  [N, L]."""
  tf = _tf()
  dense = np.asarray(dense)
  if dense.ndim != 2 or dense.shape[0] != NUM_CELLS:
    raise DataError(f"dense features for {key!r} have shape {dense.shape}, expected [{NUM_CELLS}, D]")
  boxes = np.asarray(boxes, np.float32)
  if boxes.shape != (NUM_CELLS, 4):
    raise DataError(f"boxes for {key!r} have shape {boxes.shape}, expected [{NUM_CELLS}, 4]")
  caption_ids = np.asarray(caption_ids, np.int64)
  if caption_ids.ndim != 2:
    raise DataError(f"caption_ids for {key!r} have shape {caption_ids.shape}, expected [N, L]")
  captions = [c.encode("utf-8") for c in captions]
  if len(captions) != caption_ids.shape[0]:
    raise DataError(f"{key!r}: {len(captions)} captions but {caption_ids.shape[0]} rows of caption_ids")
  feats = {
      "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)])),
      "image_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(image_id)])),
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])),
      "dense": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[dense.astype("<f2").tobytes()])),
      "boxes": tf.train.Feature(float_list=tf.train.FloatList(value=boxes.reshape(-1))),
      "caption_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=caption_ids.reshape(-1))),
      "captions": tf.train.Feature(bytes_list=tf.train.BytesList(value=captions)),
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
  }
  # deterministic=True sorts the feature map: protobuf's default map order differs from process to process, and
  # a shard rewritten after corruption must have the bytes (sha256) the visual vocabulary was fingerprinted on.
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def make_parse_fn(feature_dim: int, max_len: int):
  """Returns ``parse(serialized) -> dict`` of tensors for ``tf.data`` (one record, not batched).

  Output: index/image_id int64 [], key string [], dense float16 [64, D], boxes float32 [64, 4],
  caption_ids int32 [N, L], captions string [N], image string [].
  """
  tf = _tf()
  spec = {
      "index": tf.io.FixedLenFeature([], tf.int64),
      "image_id": tf.io.FixedLenFeature([], tf.int64),
      "key": tf.io.FixedLenFeature([], tf.string),
      "dense": tf.io.FixedLenFeature([], tf.string),
      "boxes": tf.io.FixedLenFeature([NUM_CELLS * 4], tf.float32),
      "caption_ids": tf.io.VarLenFeature(tf.int64),
      "captions": tf.io.VarLenFeature(tf.string),
      "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
  }

  def parse(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    dense = tf.io.decode_raw(ex["dense"], tf.float16, little_endian=True)
    tf.debugging.assert_equal(
        tf.size(dense), NUM_CELLS * feature_dim,
        message=f"record's dense feature size does not match the manifest's feature_dim={feature_dim}")
    ex["dense"] = tf.reshape(dense, [NUM_CELLS, feature_dim])
    ex["boxes"] = tf.reshape(ex["boxes"], [NUM_CELLS, 4])
    ex["caption_ids"] = tf.cast(
        tf.reshape(tf.sparse.to_dense(ex["caption_ids"]), [-1, max_len]), tf.int32)
    ex["captions"] = tf.sparse.to_dense(ex["captions"], default_value="")
    return ex

  return parse


def decode_example(serialized: bytes, feature_dim: int, max_len: int) -> dict[str, Any]:
  """Eager numpy form of ``make_parse_fn`` for tools and tests."""
  ex = make_parse_fn(feature_dim, max_len)(serialized)
  return {k: v.numpy() for k, v in ex.items()}


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_shard(path: str, serialized: Iterable[bytes]) -> dict[str, Any]:
  """Writes records to ``path`` atomically (temporary file, fsync, rename; a URL: one object written on close).
  Returns the shard's manifest entry."""
  tf = _tf()
  count = 0
  with fileio.atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as w:
    for s in serialized:
      w.write(s)
      count += 1
  return {"file": epath.Path(path).name, "num_examples": count,
          "num_bytes": epath.Path(path).stat().length, "sha256": sha256_file(path)}


def verify_shard(directory: str, entry: Mapping[str, Any], *, checksum: bool = True) -> None:
  """Raises ``DataError`` naming the file if a shard is missing, truncated or corrupt."""
  path = fileio.join(directory, entry["file"])
  if not epath.Path(path).exists():
    raise DataError(f"shard {path} listed in {MANIFEST_NAME} is missing")
  size = epath.Path(path).stat().length
  if size != entry["num_bytes"]:
    raise DataError(f"shard {path} has {size} bytes, manifest says {entry['num_bytes']} (truncated?)")
  if checksum and sha256_file(path) != entry["sha256"]:
    raise DataError(f"shard {path} does not match its sha256 in {MANIFEST_NAME} (corrupt?)")


def read_manifest(directory: str) -> dict[str, Any]:
  """Reads and validates ``directory/manifest.json``; errors name the file and the field."""
  path = fileio.join(directory, MANIFEST_NAME)
  if not epath.Path(path).exists():
    raise DataError(f"no {MANIFEST_NAME} in {directory}: run tools/extract_features.py first")
  try:
    manifest = fileio.read_json(path)
  except json.JSONDecodeError as e:
    raise DataError(f"{path} is not valid JSON: {e}") from e
  missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
  if missing:
    raise DataError(f"{path} lacks field(s) {missing}")
  if manifest["version"] != SCHEMA_VERSION:
    raise DataError(f"{path} has schema version {manifest['version']}, this code reads {SCHEMA_VERSION}")
  if manifest["grid"] != GRID:
    raise DataError(f"{path} has grid {manifest['grid']}, this code expects {GRID}")
  return manifest


def split_shards(directory: str, split: str, *, manifest: Mapping[str, Any] | None = None,
                 verify: bool = True, checksum: bool = False) -> list[dict[str, Any]]:
  """The manifest entries of a finished split's shards, each with ``path`` added; errors name the file."""
  manifest = manifest or read_manifest(directory)
  path = fileio.join(directory, MANIFEST_NAME)
  entry = manifest["splits"].get(split)
  if entry is None:
    raise DataError(f"{path} has no split {split!r} (has {sorted(manifest['splits'])})")
  if not entry.get("complete", True):
    raise DataError(f"split {split!r} in {path} is incomplete: re-run tools/extract_features.py to finish it")
  shards = []
  for shard in entry["shards"]:
    if verify:
      verify_shard(directory, shard, checksum=checksum)
    shards.append({**shard, "path": fileio.join(directory, shard["file"])})
  return shards


def read_split(directory: str, split: str, *, batch_size: int = 256,
               fields: Iterable[str] = ("index", "dense")) -> Iterable[dict[str, np.ndarray]]:
  """Numpy batches of one split's records in file order (tools: k-means, statistics), parsed by tf.data."""
  tf = _tf()
  manifest = read_manifest(directory)
  files = [s["path"] for s in split_shards(directory, split, manifest=manifest)]
  parse = make_parse_fn(manifest["feature_dim"], manifest["max_len"])
  fields = tuple(fields)
  ds = tf.data.TFRecordDataset(files).map(lambda s: {k: v for k, v in parse(s).items() if k in fields})
  for batch in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
    yield batch


def read_caption_ids(directory: str, split: str, *, batch_size: int = 1024) -> list[np.ndarray]:
  """Every record's caption ids, int32 [N_i, L] (N_i its number of captions), of one split in file order; parses
  the captions alone (SCST's CIDEr-D document frequencies)."""
  tf = _tf()
  manifest = read_manifest(directory)
  files = [s["path"] for s in split_shards(directory, split, manifest=manifest)]
  spec = {"caption_ids": tf.io.VarLenFeature(tf.int64)}

  def parse(serialized):
    ids = tf.io.parse_example(serialized, spec)["caption_ids"]
    return tf.shape(serialized)[0], ids.indices[:, 0], ids.values

  out = []
  for num, row, values in tf.data.TFRecordDataset(files).batch(batch_size).map(parse).prefetch(2).as_numpy_iterator():
    counts = np.cumsum(np.bincount(row, minlength=num))[:-1]
    out += [ids.reshape(-1, manifest["max_len"]).astype(np.int32) for ids in np.split(values, counts)]
  return out
