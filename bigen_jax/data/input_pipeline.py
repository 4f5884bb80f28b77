"""tf.data input pipeline: TFRecord grid features -> per-process numpy batches, deterministic and resumable.

Training (``train=True``) runs in explicit epochs. Epoch ``e`` permutes the shard files with ``(seed, e)``,
shuffles the *serialized* records with a seed of ``(seed, e)`` and picks one caption per image with a
stateless seed of ``(seed, e, index)``. Processes share the work in one of two ways (``sharding``):
  "global" (default)  every process reads the one global stream and parses only its rows of each global
                      batch: the global batches, hence the losses, do not depend on the number of processes.
  "files"             processes read disjoint shard files (or every P-th record when there are fewer files
                      than processes) and shuffle with ``(seed, e, process)``: no process reads all the
                      data, for large pods; the global batches then depend on the process count.
Every process yields the same number of batches per epoch (computed from the manifest), so multi-host
steps stay in lock-step. The resume position is two integers, ``{"epoch", "batch_in_epoch"}``: restoring rebuilds the
epoch and skips the consumed serialized records before parsing, so resuming is exact and cheap.

Evaluation (``train=False``) reads every record once, in file order, with all captions; the last batches
are padded, with ``valid`` = False on padding rows, so every process yields the same number of batches.

Batch (per process, B = global batch / process count):
  text_ids     int32 [B, L]      one caption (train: sampled; eval: the first)
  text_mask    int32 [B, L]      1 on real tokens
  dense        float16 [B, 64, D] grid features
  boxes        float32 [B, 64, 4]
  cluster_ids  int32 [B, 64]     with ``vocab_dir``
  image_id, index  int64 [B]
  eval only: caption_ids int32 [B, N, L], captions bytes [B, N] (padded with pad ids / b""),
             valid bool [B]
  with_images: image bytes [B] (encoded PNG/JPEG as stored by the extractor)
"""

import json
from typing import Any, Mapping

from clu.data import dataset_iterator
import jax
import numpy as np

from bigen_jax.data import records
from bigen_jax.data import vocab as vocab_lib


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


SHARDING_MODES = ("global", "files")


def process_shares(shard_counts: list[int], process_count: int, sharding: str) -> tuple[str, list[list[int]]]:
  """Which files each process reads, and how it keeps its part: ("global", all files each) — every process
  reads the one global stream and keeps its rows of each global batch; ("files", disjoint file sets) when
  every process can get a file; ("records", all files, every P-th record) otherwise."""
  if sharding not in SHARDING_MODES:
    raise ValueError(f"input sharding {sharding!r}: expected one of {SHARDING_MODES}")
  everything = [list(range(len(shard_counts)))] * process_count
  if sharding == "global":
    return "global", everything
  if len(shard_counts) >= process_count:
    return "files", [list(range(p, len(shard_counts), process_count)) for p in range(process_count)]
  return "records", everything


def examples_per_process(shard_counts: list[int], mode: str, shares: list[list[int]]) -> list[int]:
  """Examples each process sees per epoch (global mode: the whole split, sliced batch by batch)."""
  if mode == "files":
    return [sum(shard_counts[i] for i in share) for share in shares]
  n, count = sum(shard_counts), len(shares)
  if mode == "global":
    return [n] * count
  return [len(range(p, n, count)) for p in range(count)]


class BatchIterator(dataset_iterator.DatasetIterator):
  """Iterator of numpy batch dicts with a small exact resume state (see the module docstring)."""

  def __init__(self, *, records_dir: str, split: str, global_batch_size: int, seed: int = 0,
               vocab_dir: str | None = None, train: bool = True, with_images: bool = False,
               process_index: int | None = None, process_count: int | None = None,
               shuffle_buffer: int = 10_000, pad_id: int = 0, verify_checksums: bool = False,
               num_parallel_calls: int = 4, prefetch: int = 2, sharding: str = "global"):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise ValueError(f"--config.batch_size={global_batch_size} is not divisible by the "
                       f"{self.process_count} processes")
    self.batch_size = global_batch_size // self.process_count
    self.manifest = records.read_manifest(records_dir)
    self.shards = records.split_shards(records_dir, split, manifest=self.manifest, checksum=verify_checksums)
    self.split, self.seed, self.train, self.with_images = split, seed, train, with_images
    self.shuffle_buffer, self.pad_id = shuffle_buffer, pad_id
    self.num_parallel_calls, self.prefetch = num_parallel_calls, prefetch
    self.cluster_ids = None
    if vocab_dir is not None:
      self.cluster_ids = vocab_lib.load_vocab(vocab_dir, records_dir=records_dir).cluster_ids(split)
    counts = [s["num_examples"] for s in self.shards]
    self.sharding = sharding
    self.mode, shares = process_shares(counts, self.process_count, sharding)
    per_process = examples_per_process(counts, self.mode, shares)
    per_batch = global_batch_size if self.mode == "global" else self.batch_size
    if train:
      self.batches_per_epoch = min(per_process) // per_batch
      if self.batches_per_epoch == 0:
        raise records.DataError(
            f"split {split!r} of {records_dir} gives process shares of {per_process} examples, fewer than "
            f"one batch of {self.batch_size}: lower the batch size or extract more data")
    else:
      self.batches_per_epoch = -(-max(per_process) // per_batch)
    self._parse = records.make_parse_fn(self.manifest["feature_dim"], self.manifest["max_len"])
    self._epoch, self._batch_in_epoch, self._it = 0, 0, None

  # --- state -----------------------------------------------------------------------------------------
  def get_state(self) -> dict[str, int]:
    """The position of the next batch, normalised: after an epoch's last batch it is the next epoch's start."""
    return self._normalised(self._epoch, self._batch_in_epoch)

  def set_state(self, state: Mapping[str, int]) -> None:
    """Continues at ``state``; the end of a training epoch (written by earlier versions) means the next start."""
    epoch, batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
    limit = self.batches_per_epoch + (1 if self.train else 0)
    if epoch < 0 or not 0 <= batch_in_epoch < max(limit, 1):
      raise ValueError(f"iterator state {dict(state)} is outside an epoch of {self.batches_per_epoch} batches")
    state = self._normalised(epoch, batch_in_epoch)
    self._epoch, self._batch_in_epoch, self._it = state["epoch"], state["batch_in_epoch"], None

  def _normalised(self, epoch: int, batch_in_epoch: int) -> dict[str, int]:
    if self.train and batch_in_epoch >= self.batches_per_epoch:
      return {"epoch": epoch + 1, "batch_in_epoch": 0}
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch}

  def save(self, filename) -> None:
    records.write_json_atomic(str(filename), self.get_state())

  def restore(self, filename) -> None:
    with open(str(filename)) as f:
      self.set_state(json.load(f))

  def reset(self) -> None:
    self.set_state({"epoch": 0, "batch_in_epoch": 0})

  @property
  def element_spec(self):
    spec = self._epoch_dataset(0, 0).element_spec
    return {k: dataset_iterator.ArraySpec(v.dtype.as_numpy_dtype, (self.batch_size, *v.shape[1:]))
            for k, v in spec.items()}

  def _peek(self) -> dict[str, np.ndarray]:
    return next(self._epoch_dataset(0, 0).take(1).as_numpy_iterator())

  # --- iteration -------------------------------------------------------------------------------------
  def __next__(self) -> dict[str, np.ndarray]:
    if self.train and self._batch_in_epoch >= self.batches_per_epoch:
      self._epoch, self._batch_in_epoch, self._it = self._epoch + 1, 0, None
    if not self.train and self._batch_in_epoch >= self.batches_per_epoch:
      raise StopIteration
    if self._it is None:
      self._it = self._epoch_dataset(self._epoch, self._batch_in_epoch).as_numpy_iterator()
    batch = next(self._it, None)
    if batch is None:
      batch = self._padding_batch()
    elif not self.train and len(batch["index"]) < self.batch_size:
      batch = self._pad(batch)
    self._batch_in_epoch += 1
    return batch

  def get_next(self) -> dict[str, np.ndarray]:
    return next(self)

  def _files(self, epoch: int) -> list[str]:
    order = np.arange(len(self.shards))
    if self.train:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
    _, shares = process_shares([self.shards[i]["num_examples"] for i in order], self.process_count,
                               self.sharding)
    return [self.shards[order[i]]["path"] for i in shares[self.process_index]]

  def _epoch_dataset(self, epoch: int, skip_batches: int):
    tf = _tf()
    files = self._files(epoch)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=16,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if self.mode == "records":
      ds = ds.shard(self.process_count, self.process_index)
    global_mode = self.mode == "global"
    per_batch = self.batch_size * (self.process_count if global_mode else 1)
    if self.train:
      process = 0 if global_mode else self.process_index
      shuffle_seed = int(np.random.default_rng([self.seed, epoch, process]).integers(2**31))
      ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
      ds = ds.take(self.batches_per_epoch * per_batch)
    ds = ds.skip(skip_batches * per_batch)
    if global_mode:  # this process's rows of each global batch, still serialized
      start = self.process_index * self.batch_size
      ds = ds.batch(per_batch, drop_remainder=self.train)
      ds = ds.map(lambda rows: rows[start:start + self.batch_size]).unbatch()
    ds = ds.map(lambda s: self._features(s, epoch), num_parallel_calls=self.num_parallel_calls,
                deterministic=True)
    if self.train:
      ds = ds.batch(self.batch_size, drop_remainder=True)
    else:
      ds = ds.padded_batch(self.batch_size, padded_shapes=self._padded_shapes(ds.element_spec),
                           padding_values=self._padding_values(ds.element_spec))
    return ds.prefetch(self.prefetch)

  def _padded_shapes(self, spec):
    """Eval batches have static shapes: captions padded to the manifest's ``max_captions`` when set."""
    n = self.manifest.get("max_captions")
    shapes = {k: v.shape for k, v in spec.items()}
    if n:
      shapes["caption_ids"], shapes["captions"] = [n, self.manifest["max_len"]], [n]
    return shapes

  def _padding_values(self, spec):
    tf = _tf()
    def value(k, v):
      if k in ("caption_ids", "text_ids"):
        return self.pad_id
      return {tf.string: b"", tf.bool: False}.get(v.dtype, 0)
    return {k: tf.constant(value(k, v), v.dtype) for k, v in spec.items()}

  def _features(self, serialized, epoch: int):
    """One parsed record -> the batch fields of one example (tf)."""
    tf = _tf()
    ex = self._parse(serialized)
    ids = ex["caption_ids"]
    num = tf.shape(ids)[0]
    if self.train:
      tf.debugging.assert_positive(num, message=f"a record of split {self.split!r} has no captions")
      pick = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(self.seed, tf.int64) * 1_000_003 + epoch, ex["index"]]),
          maxval=num, dtype=tf.int32)
    else:
      pick = 0
    text = tf.cond(num > 0, lambda: ids[tf.minimum(pick, num - 1)],
                   lambda: tf.fill([self.manifest["max_len"]], self.pad_id))
    out = {"text_ids": text, "text_mask": tf.cast(text != self.pad_id, tf.int32), "dense": ex["dense"],
           "boxes": ex["boxes"], "image_id": ex["image_id"], "index": ex["index"]}
    if self.cluster_ids is not None:
      out["cluster_ids"] = tf.gather(tf.constant(self.cluster_ids), ex["index"])
    if self.with_images:
      out["image"] = ex["image"]
    if not self.train:
      out["caption_ids"], out["captions"] = ids, ex["captions"]
      out["valid"] = tf.constant(True)
    return out

  def _pad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pads a short eval batch to ``batch_size`` rows (valid=False on padding)."""
    short = self.batch_size - len(batch["index"])
    out = {}
    for k, v in batch.items():
      fill = self.pad_id if k in ("caption_ids", "text_ids") else (b"" if v.dtype.kind in "OS" else 0)
      out[k] = np.concatenate([v, np.full((short, *v.shape[1:]), fill, dtype=v.dtype)])
    return out

  def _padding_batch(self) -> dict[str, np.ndarray]:
    """An all-padding eval batch for a process whose share ran out before the others'."""
    template = self._peek()
    return self._pad({k: v[:0] for k, v in template.items()})


def create_iterator(**kwargs: Any) -> BatchIterator:
  """``BatchIterator(**kwargs)``: see ``BatchIterator.__init__`` for the arguments."""
  return BatchIterator(**kwargs)
