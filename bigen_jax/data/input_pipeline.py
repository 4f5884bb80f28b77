"""tf.data input pipeline: TFRecord grid features -> per-process numpy batches, deterministic and resumable.

Training (``train=True``) runs in explicit epochs. Epoch ``e`` permutes the shard files with ``(seed, e)``,
shuffles the *serialized* records of its stream with a seed of ``(seed, e)`` and picks one caption per image
with a stateless seed of ``(seed, e, index)``. Processes share the work in one of two ways (``sharding``):
  "global" (default)  every process reads the epoch's whole stream and parses only its rows of each global
                      batch: the global batches, hence the losses, do not depend on the number of processes;
                      every process reads every record.
  "files"             the epoch's stream (its files, in the epoch's order, one after the other) is cut into
                      ``P`` contiguous ranges of ``N // P`` or ``N // P + 1`` records; process ``p`` reads only
                      the files overlapping range ``p`` (skipping the head of its first file, stopping inside
                      its last) and shuffles them with ``(seed, e, p)``. A process reads about ``N / P`` records
                      plus at most two part-files per epoch: for large pods. Fewer files than processes work too
                      (several processes then read parts of one file).
What the two modes share, for any number of processes ``P`` and global batch ``G`` (tested in
``tests/test_input_pipeline.py::test_global_and_files_sharding_agree``):
  - every process yields ``N // G`` batches per epoch, the same number in both modes (floor(floor(N/P) / (G/P))
    = floor(N/G)), so multi-host steps stay in lock-step;
  - within an epoch no example is yielded twice across all processes, and ``(N // G) * G`` examples are
    (fewer than one global batch left out, a different part each epoch);
  - with one process the two modes yield the same batches, in the same order, with the same captions.
They differ in the global batch: in "files" mode its rows come from ``P`` separately shuffled ranges, so it
depends on ``P`` (a resume must keep the process count; "global" resumes on any).

Shuffling: the order of epoch ``e`` is a buffer shuffle (``shuffle_buffer`` records) of that epoch's own
stream with that epoch's seed. This is what makes every position resumable from two integers,
``{"epoch", "batch_in_epoch"}``: restoring rebuilds the epoch and skips the consumed serialized records before
parsing. (``shuffle().repeat()`` would carry one random stream through all epochs, so an epoch's order would
depend on every earlier one.) The buffer of epoch ``e + 1`` fills in the background while the last batches of
epoch ``e`` are consumed, so only the first epoch after a start or a resume waits for a fill; the finished
epoch's iterator is read to its end in a daemon thread (ending a tf.data iterator waits for its threads: 20-60 s
on 2 cores busy with XLA when the training thread did it). Memory: the
buffer holds serialized records, ``shuffle_buffer`` x the mean record size of the split (the manifest's bytes
/ examples; e.g. about 0.3 MB for COCO: 64 x 1024 float16 cells, 128 KB, and a stored 256-px PNG; 3 GB for
10,000 records), twice that at epoch ends while the next epoch's buffer fills (``shuffle_buffer_bytes``,
logged once). A stream that ends before its epoch's batches (a shard shorter than the manifest says) raises
``records.DataError``.

Evaluation (``train=False``) reads the first ``num_examples`` (0: all) records in file order with all
captions ("files": process ``p`` its contiguous range of them; "global": each process its rows of each global
batch); the last batches are padded, with ``valid`` = False on padding rows, so every process yields the
same number of batches.

Batch (per process, B = global batch / process count):
  text_ids     int32 [B, L]      one caption (train: sampled; eval: the first)
  text_mask    int32 [B, L]      1 on real tokens
  dense        float16 [B, 64, D] grid features
  boxes        float32 [B, 64, 4]
  cluster_ids  int32 [B, 64]     with ``vocab_dir``
  image_id, index  int64 [B]
  caption_index  int32 [B]       which caption of the record text_ids is (0 in evaluation and without captions)
  eval only: caption_ids int32 [B, N, L], captions bytes [B, N] (padded with pad ids / b""),
             valid bool [B]
  train with_all_captions: caption_ids int32 [B, N, L], every caption of the image (SCST's references), N the
             manifest's ``max_captions``, missing rows all pad ids
  with_images: image bytes [B] (encoded PNG/JPEG as stored by the extractor)
  questions (records with questions, an answer vocabulary of V classes: ``bigen_jax.data.answers``):
    question_ids   int32 [B, L]   one question of the image (train: drawn with a stateless seed of
                                  ``(seed, e, index)``, independent of the caption's; eval: the first)
    question_mask  int32 [B, L]   1 on real tokens
    answer_target  float32 [B, V] soft scores of the answer classes (VQA's; one-hot for one answer)
    question_type  int32 [B]      index into the answer vocabulary's types; -1: the record has no question
                                  (question ids all pad ids, target 0: leave the row out of QA losses)
    question_index int32 [B]      which question of the record (-1: none)
  (``qa_pipeline.QuestionEvalIterator``: every (image, question) pair of a split, for QA accuracy.)
"""

from concurrent import futures
import itertools
import json
import math
import threading
from typing import Any, Mapping

from absl import logging
from clu.data import dataset_iterator
import jax
import numpy as np

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax.data import batching
from bigen_jax.data import qa_pipeline
from bigen_jax.data import records
from bigen_jax.data import vocab as vocab_lib


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


SHARDING_MODES = ("global", "files")


def process_range(num: int, process_count: int, process_index: int) -> tuple[int, int]:
  """``[lo, hi)``: process ``process_index``'s contiguous part of ``num`` records (sizes differ by at most 1)."""
  return process_index * num // process_count, (process_index + 1) * num // process_count


def file_slices(counts: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
  """``(file, skip, take)`` for each file of the concatenation of files of ``counts`` records that overlaps
  records ``[lo, hi)``: skip the first ``skip`` records of the file, then read ``take``."""
  out, start = [], 0
  for i, count in enumerate(counts):
    skip, stop = max(lo - start, 0), min(hi - start, count)
    if stop > skip:
      out.append((i, skip, stop - skip))
    start += count
  return out


class BatchIterator(dataset_iterator.DatasetIterator):
  """Iterator of numpy batch dicts with a small exact resume state (see the module docstring)."""

  def __init__(self, *, records_dir: str, split: str, global_batch_size: int, seed: int = 0,
               vocab_dir: str | None = None, train: bool = True, with_images: bool = False,
               process_index: int | None = None, process_count: int | None = None,
               shuffle_buffer: int = 10_000, pad_id: int = 0, verify_checksums: bool = False,
               num_parallel_calls: int = 4, prefetch: int = 2, sharding: str = "global", num_examples: int = 0,
               with_all_captions: bool = False, questions: bool = False, answers_file: str = ""):
    """``num_examples`` (evaluation only): read the first ``num_examples`` records of the split (0: all).
    ``with_all_captions`` (training; evaluation batches always have them): batches also carry every caption's
    ids, padded to the manifest's ``max_captions``. ``questions``: batches also carry one question and its
    answer target (module docstring), classes from ``answers_file`` ("": ``RECORDS_DIR/answers.json``)."""
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise errors.ConfigError(f"--config.batch_size={global_batch_size} is not divisible by the "
                               f"{self.process_count} processes")
    if sharding not in SHARDING_MODES:
      raise errors.ConfigError(f"--config.data.sharding={sharding!r}: expected one of {SHARDING_MODES}")
    if train and num_examples:
      raise ValueError("num_examples is for evaluation (train=False); training reads whole epochs")
    self.batch_size = global_batch_size // self.process_count
    self.manifest = records.read_manifest(records_dir)
    self.with_all_captions = with_all_captions and train
    if self.with_all_captions and not self.manifest.get("max_captions"):
      raise records.DataError(
          f"{fileio.join(records_dir, records.MANIFEST_NAME)} sets no max_captions: training batches with every "
          "caption need a fixed number of captions per image; re-run tools/extract_features.py with --max_captions")
    self.shards = records.split_shards(records_dir, split, manifest=self.manifest, checksum=verify_checksums)
    self.records_dir, self.split, self.seed, self.train = records_dir, split, seed, train
    self.with_images, self.shuffle_buffer, self.pad_id = with_images, shuffle_buffer, pad_id
    self.num_parallel_calls, self.prefetch = num_parallel_calls, prefetch
    self.cluster_ids = None
    if vocab_dir is not None:
      self.cluster_ids = vocab_lib.load_vocab(vocab_dir, records_dir=records_dir).cluster_ids(split)
    total = sum(s["num_examples"] for s in self.shards)
    self.num_records = min(num_examples, total) if num_examples else total
    self.mode = sharding
    if sharding == "global":
      self.share, per_batch = (0, self.num_records), global_batch_size
    else:
      self.share, per_batch = process_range(self.num_records, self.process_count, self.process_index), self.batch_size
    if train:
      self.batches_per_epoch = self.num_records // global_batch_size
      if self.batches_per_epoch == 0:
        raise records.DataError(
            f"split {split!r} of {records_dir} has {self.num_records} examples, fewer than one batch of "
            f"{global_batch_size} ({self.process_count} processes x {self.batch_size}): lower the batch size or "
            "extract more data")
    else:
      largest = -(-self.num_records // self.process_count) if sharding == "files" else self.num_records
      self.batches_per_epoch = -(-largest // per_batch)
    self.records_per_batch = per_batch  # serialized records this process reads per batch
    num_bytes = sum(s.get("num_bytes", 0) for s in self.shards)
    self.shuffle_buffer_bytes = (shuffle_buffer * num_bytes // max(total, 1)) if train else 0
    if train:
      logging.info("input %s/%s: shuffle buffer of %d records x %.1f KB (serialized; the manifest's mean) = "
                   "%.1f MB per process, up to twice that at epoch ends while the next epoch's buffer fills",
                   records_dir, split, shuffle_buffer, num_bytes / max(total, 1) / 1e3,
                   self.shuffle_buffer_bytes / 1e6)
    self.questions, self.tables, self.answer_vocab = questions, None, None
    if questions:
      self.answer_vocab, self.tables = qa_pipeline.load_tables(records_dir, self.manifest, answers_file=answers_file,
                                                               pad_id=pad_id)
    self._parse = records.make_parse_fn(self.manifest["feature_dim"], self.manifest["max_len"],
                                        self.tables.max_answers if questions else 0)
    self._epoch, self._batch_in_epoch, self._it = 0, 0, None
    self._valid_rows = 0  # evaluation: real rows yielded so far, checked against the share when it ends
    self._next_epoch, self._executor = None, None  # (epoch, future of (iterator, first batch)) filling ahead

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
    self._valid_rows, self._next_epoch = 0, None

  def _normalised(self, epoch: int, batch_in_epoch: int) -> dict[str, int]:
    if self.train and batch_in_epoch >= self.batches_per_epoch:
      return {"epoch": epoch + 1, "batch_in_epoch": 0}
    return {"epoch": epoch, "batch_in_epoch": batch_in_epoch}

  def save(self, filename) -> None:
    fileio.write_json_atomic(str(filename), self.get_state())

  def restore(self, filename) -> None:
    with open(str(filename)) as f:
      self.set_state(json.load(f))

  def reset(self) -> None:
    self.set_state({"epoch": 0, "batch_in_epoch": 0})

  def close(self) -> None:
    """Releases the tf.data iterators and the next-epoch thread now rather than in whichever later garbage
    collection finds them (idempotent; the position is kept, so iterating again reopens)."""
    ahead, self._next_epoch, self._it = self._next_epoch, None, None
    if ahead is not None:
      ahead[1].result()
    del ahead
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None

  @property
  def element_spec(self):
    spec = self._dataset(0, 0, share=(0, 1)).element_spec
    return {k: dataset_iterator.ArraySpec(v.dtype.as_numpy_dtype, (self.batch_size, *v.shape[1:]))
            for k, v in spec.items()}

  # --- iteration -------------------------------------------------------------------------------------
  def __next__(self) -> dict[str, np.ndarray]:
    if self.train and self._batch_in_epoch >= self.batches_per_epoch:
      self._end_epoch()
    if not self.train and self._batch_in_epoch >= self.batches_per_epoch:
      raise StopIteration
    if self._it is None:
      self._it = self._open_current()
    batch = next(self._it, None)
    if batch is None and self.train:
      raise records.DataError(
          f"split {self.split!r} of {self.records_dir} ran dry at batch {self._batch_in_epoch} of epoch "
          f"{self._epoch} (process {self.process_index} of {self.process_count}, expected "
          f"{self.batches_per_epoch} batches of {self.batch_size}): a shard holds fewer records than "
          f"{records.MANIFEST_NAME} says; re-run tools/extract_features.py on the split")
    if batch is None:
      batch = self._padding_batch()
    elif not self.train and len(batch["index"]) < self.batch_size:
      batch = self._pad(batch)
    self._batch_in_epoch += 1
    if not self.train:
      self._check_eval_share(batch)
    elif self._next_epoch is None and self.batches_per_epoch - self._batch_in_epoch <= self._lookahead():
      self._fill_next_epoch()
    return batch

  def _end_epoch(self) -> None:
    """Moves to the next epoch. The finished epoch's iterator is read to its end and released in a daemon
    thread: ending or dropping a tf.data iterator waits for its threads, which blocked training for 10-60 s at
    epoch ends on 2 cores busy with XLA's threads."""
    if self._it is not None:
      threading.Thread(target=next, args=(self._it, None), name="input_end_epoch", daemon=True).start()
    self._epoch, self._batch_in_epoch, self._it = self._epoch + 1, 0, None

  def get_next(self) -> dict[str, np.ndarray]:
    return next(self)

  def _lookahead(self) -> int:
    """Batches before an epoch's end at which the next epoch's buffer starts filling: the drain phase of this
    epoch's buffer (its stream is read to the end)."""
    return math.ceil(self.shuffle_buffer / self.records_per_batch)

  def _fill_next_epoch(self) -> None:
    """Opens the next epoch in a background thread and reads its first batch (filling its shuffle buffer)."""
    if self._executor is None:
      self._executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="input_next_epoch")
    epoch = self._epoch + 1

    def first_batch():
      it = self._dataset(epoch, 0).as_numpy_iterator()
      return it, next(it, None)

    self._next_epoch = epoch, self._executor.submit(first_batch)

  def _open_current(self):
    """The numpy iterator of the current position: the one filled ahead when it is this epoch's start."""
    ahead, self._next_epoch = self._next_epoch, None
    if ahead is not None and ahead[0] == self._epoch and self._batch_in_epoch == 0:
      it, first = ahead[1].result()
      return it if first is None else itertools.chain([first], it)
    return self._dataset(self._epoch, self._batch_in_epoch).as_numpy_iterator()

  def _check_eval_share(self, batch: dict[str, np.ndarray]) -> None:
    """Evaluation: at the end, the real rows yielded must be this process's whole share."""
    self._valid_rows += int(batch["valid"].sum())
    if self._batch_in_epoch < self.batches_per_epoch:
      return
    lo, hi = self.share
    want = hi - lo
    if self.mode == "global":  # this process's rows of each global batch of the first num_records
      want = sum(len(range(max(start + self.process_index * self.batch_size, 0),
                           min(start + (self.process_index + 1) * self.batch_size, hi)))
                 for start in range(0, hi, self.records_per_batch))
    if self._valid_rows != want:
      raise records.DataError(
          f"split {self.split!r} of {self.records_dir} gave process {self.process_index} {self._valid_rows} "
          f"examples, {want} expected: a shard holds fewer records than {records.MANIFEST_NAME} says")

  def _files(self, epoch: int) -> list[dict[str, Any]]:
    """The split's shard entries in epoch ``epoch``'s order (evaluation: file order)."""
    order = np.arange(len(self.shards))
    if self.train:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
    return [self.shards[i] for i in order]

  def _dataset(self, epoch: int, skip_batches: int, share: tuple[int, int] | None = None):
    """The tf.data batches of ``epoch`` from batch ``skip_batches`` on; ``share``: other records than this
    process's (``element_spec``, padding)."""
    tf = _tf()
    files = self._files(epoch)
    lo, hi = share or self.share
    parts = file_slices([f["num_examples"] for f in files], lo, hi)
    paths = tf.constant([files[i]["path"] for i, _, _ in parts], tf.string, shape=[len(parts)])
    skips, takes = [tf.constant([p[k] for p in parts], tf.int64, shape=[len(parts)]) for k in (1, 2)]
    ds = tf.data.Dataset.from_tensor_slices((paths, skips, takes)).interleave(
        lambda path, skip, take: tf.data.TFRecordDataset(path).skip(skip).take(take),
        cycle_length=max(1, min(4, len(parts))), block_length=16, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    global_mode = self.mode == "global" and share is None
    per_batch = self.records_per_batch if share is None else self.batch_size
    if self.train:
      process = 0 if self.mode == "global" else self.process_index
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
    # No autotuning (the parallelism above is fixed; AUTOTUNE in interleave starts at cycle_length): releasing an
    # iterator waited for its autotuning thread, 20-50 s for one that ran a few minutes (make demo: 30 s at the end
    # of stage 1, wherever the garbage collector released it: the GAN's training, stage 2's set-up).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(self.prefetch).with_options(options)

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
      if k in qa_pipeline.PAD_WITH_PAD_ID:
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
    pick = tf.maximum(tf.minimum(pick, num - 1), 0)
    text = tf.cond(num > 0, lambda: ids[pick], lambda: tf.fill([self.manifest["max_len"]], self.pad_id))
    out = {"text_ids": text, "text_mask": tf.cast(text != self.pad_id, tf.int32), "dense": ex["dense"],
           "boxes": ex["boxes"], "image_id": ex["image_id"], "index": ex["index"], "caption_index": pick}
    if self.cluster_ids is not None:
      out["cluster_ids"] = tf.gather(tf.constant(self.cluster_ids), ex["index"])
    if self.with_images:
      out["image"] = ex["image"]
    if not self.train:
      out["caption_ids"], out["captions"] = ids, ex["captions"]
      out["valid"] = tf.constant(True)
    elif self.with_all_captions:
      n = self.manifest["max_captions"]
      padded = tf.pad(ids[:n], [[0, n - tf.minimum(num, n)], [0, 0]], constant_values=self.pad_id)
      out["caption_ids"] = tf.ensure_shape(padded, [n, self.manifest["max_len"]])
    if self.questions:
      out.update(self.tables.features(ex, self._question_pick(ex, epoch)))
    return out

  def _question_pick(self, ex, epoch: int):
    """Which question of a parsed record (tf int32 []): train: drawn (seeded by the seed, the epoch and the
    record's index, another stream than the caption's); eval: the first; -1 when it has none."""
    tf = _tf()
    num = tf.shape(ex["question_ids"])[0]
    if not self.train:
      return tf.where(num > 0, 0, qa_pipeline.NO_QUESTION)
    pick = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(self.seed, tf.int64) * 1_000_003 + epoch, -1 - ex["index"]]),
        maxval=tf.maximum(num, 1), dtype=tf.int32)
    return tf.where(num > 0, pick, qa_pipeline.NO_QUESTION)

  def _pad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pads a short eval batch to ``batch_size`` rows (valid=False on padding)."""
    return {k: batching.pad_rows(v, self.batch_size, fill=qa_pipeline.pad_value(k, v.dtype, self.pad_id))
            for k, v in batch.items()}

  def _padding_batch(self) -> dict[str, np.ndarray]:
    """An all-padding eval batch for a process whose share ran out before the others' (shaped like a batch
    of the split's first record, so that a process with an empty share pads too)."""
    template = next(self._dataset(0, 0, share=(0, 1)).as_numpy_iterator())
    return self._pad({k: v[:0] for k, v in template.items()})


def create_iterator(**kwargs: Any) -> BatchIterator:
  """``BatchIterator(**kwargs)``: see ``BatchIterator.__init__`` for the arguments."""
  return BatchIterator(**kwargs)
