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
Question answering (only in records of a manifest with ``"questions": true``; absent otherwise, so a source
without questions writes the bytes it wrote before these fields existed):
  question_ids    int64[Q*L]  WordPiece ids of the image's Q questions, each padded to L = max_len (the captions'
                              tokenizer)
  questions       bytes[Q]    the raw question strings
  question_types  bytes[Q]    each question's type (VQA's answer type, GQA's structural type, the world's
                              ``qa.QUESTION_TYPES``)
  answers         bytes[Q*A]  each question's answers, normalised (``qa_sources.normalise_answer``; the world's
                              are its fixed vocabulary), padded with b"" to A = the manifest's ``max_answers``
                              (VQA v2: 10 annotators; GQA and the world: 1)
Such a manifest also holds ``"questions": true`` and ``"max_answers": A``, and each shard entry its
``"num_questions"``.
"""

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

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


def _question_features(key: str, question_ids: np.ndarray, questions: Sequence[str], question_types: Sequence[str],
                       answers: Sequence[Sequence[str]]) -> dict[str, Any]:
  """The question-answering features of one record (schema in the module docstring), checked for consistency."""
  tf = _tf()
  question_ids = np.asarray(question_ids, np.int64)
  if question_ids.ndim != 2:
    raise DataError(f"question_ids for {key!r} have shape {question_ids.shape}, expected [Q, L]")
  num = question_ids.shape[0]
  if not len(questions) == len(question_types) == len(answers) == num:
    raise DataError(f"{key!r}: {num} rows of question_ids but {len(questions)} questions, {len(question_types)} "
                    f"question types and {len(answers)} answer lists")
  if len({len(a) for a in answers}) > 1:
    raise DataError(f"{key!r}: answer lists of different lengths {sorted({len(a) for a in answers})}: pad each "
                    "to the manifest's max_answers with empty strings")
  flat = [a.encode("utf-8") for row in answers for a in row]
  return {
      "question_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=question_ids.reshape(-1))),
      "questions": tf.train.Feature(bytes_list=tf.train.BytesList(value=[q.encode("utf-8") for q in questions])),
      "question_types": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[t.encode("utf-8") for t in question_types])),
      "answers": tf.train.Feature(bytes_list=tf.train.BytesList(value=flat)),
  }


def encode_example(*, index: int, image_id: int, key: str, dense: np.ndarray, boxes: np.ndarray,
                   caption_ids: np.ndarray, captions: Iterable[str], image: bytes = b"",
                   question_ids: np.ndarray | None = None, questions: Sequence[str] = (),
                   question_types: Sequence[str] = (), answers: Sequence[Sequence[str]] = ()) -> bytes:
  """Serialises one image's record, byte-reproducibly. ``dense`` [64, D] (stored as float16), ``caption_ids``
  [N, L]. With ``question_ids`` [Q, L] (None: no question fields at all, the bytes of a record without them),
  ``questions`` and ``question_types`` [Q] and ``answers`` [Q][A] (each row padded to A with "")."""
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
  if question_ids is not None:
    feats.update(_question_features(key, question_ids, questions, question_types, answers))
  # deterministic=True sorts the feature map: protobuf's default map order differs from process to process, and
  # a shard rewritten after corruption must have the bytes (sha256) the visual vocabulary was fingerprinted on.
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def make_parse_fn(feature_dim: int, max_len: int, max_answers: int = 0):
  """Returns ``parse(serialized) -> dict`` of tensors for ``tf.data`` (one record, not batched).

  Output: index/image_id int64 [], key string [], dense float16 [64, D], boxes float32 [64, 4],
  caption_ids int32 [N, L], captions string [N], image string []; with ``max_answers`` = A > 0 (the manifest's,
  records with questions) also question_ids int32 [Q, L], questions and question_types string [Q], answers
  string [Q, A] (Q = 0 for a record without the fields).
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
  if max_answers:
    spec.update({"question_ids": tf.io.VarLenFeature(tf.int64), "questions": tf.io.VarLenFeature(tf.string),
                 "question_types": tf.io.VarLenFeature(tf.string), "answers": tf.io.VarLenFeature(tf.string)})

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
    if max_answers:
      ex["question_ids"] = tf.cast(tf.reshape(tf.sparse.to_dense(ex["question_ids"]), [-1, max_len]), tf.int32)
      for k in ("questions", "question_types"):
        ex[k] = tf.sparse.to_dense(ex[k], default_value="")
      ex["answers"] = tf.reshape(tf.sparse.to_dense(ex["answers"], default_value=""), [-1, max_answers])
    return ex

  return parse


def decode_example(serialized: bytes, feature_dim: int, max_len: int, max_answers: int = 0) -> dict[str, Any]:
  """Eager numpy form of ``make_parse_fn`` for tools and tests."""
  ex = make_parse_fn(feature_dim, max_len, max_answers)(serialized)
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


def max_answers(manifest: Mapping[str, Any]) -> int:
  """A, the answers per question of records with questions; 0 when the manifest says its records have none."""
  return int(manifest.get("max_answers") or 0) if manifest.get("questions") else 0


def read_split(directory: str, split: str, *, batch_size: int = 256,
               fields: Iterable[str] = ("index", "dense")) -> Iterable[dict[str, np.ndarray]]:
  """Numpy batches of one split's records in file order (tools: k-means, statistics), parsed by tf.data. Fields
  of varying length (captions, questions) cannot be batched: ``read_caption_ids``, ``read_questions``."""
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


def read_questions(directory: str, split: str, *, batch_size: int = 1024) -> list[dict[str, list]]:
  """Every record's question types and answers, ``{"types": [Q_i], "answers": [Q_i][A]}`` (str; answers padded
  with ""), of one split in file order; parses those fields alone (the answer vocabulary). DataError naming the
  manifest when its records hold no questions."""
  tf = _tf()
  manifest = read_manifest(directory)
  num_answers = max_answers(manifest)
  if not num_answers:
    raise DataError(f"{fileio.join(directory, MANIFEST_NAME)} says its records hold no questions: extract them "
                    "from a source with questions (tools/extract_features.py: the scenes source, or coco with "
                    "--vqa_questions/--gqa_questions)")
  files = [s["path"] for s in split_shards(directory, split, manifest=manifest)]
  spec = {k: tf.io.VarLenFeature(tf.string) for k in ("question_types", "answers")}

  def parse(serialized):
    ex = tf.io.parse_example(serialized, spec)
    return (tf.shape(serialized)[0], ex["question_types"].indices[:, 0], ex["question_types"].values,
            ex["answers"].values)

  out = []
  ds = tf.data.TFRecordDataset(files).batch(batch_size).map(parse).prefetch(2)
  for num, row, types, answers in ds.as_numpy_iterator():
    counts = np.bincount(row, minlength=num)
    answers = answers.reshape(-1, num_answers)
    start = 0
    for n in counts:
      out.append({"types": [t.decode("utf-8") for t in types[start:start + n]],
                  "answers": [[a.decode("utf-8") for a in r] for r in answers[start:start + n]]})
      start += n
  return out


def num_questions(directory: str, split: str, *, num_examples: int = 0,
                  manifest: Mapping[str, Any] | None = None) -> int:
  """The questions of the first ``num_examples`` (0: all) records of a split: from the shard entries' counts
  when they cover those records, else counted by reading the records' question types."""
  manifest = manifest or read_manifest(directory)
  shards = split_shards(directory, split, manifest=manifest, verify=False)
  total = sum(s["num_examples"] for s in shards)
  if (not num_examples or num_examples >= total) and all("num_questions" in s for s in shards):
    return sum(s["num_questions"] for s in shards)
  rows = read_questions(directory, split)
  return sum(len(r["types"]) for r in rows[:num_examples or None])
