"""Question answering in the input pipeline: one question's batch fields (tf), and the evaluation iterator over
every (image, question) pair of a split.

``QuestionTables.features`` gives the question fields of one parsed record (``input_pipeline`` adds them to each
example when ``questions`` is on; ``pick`` -1 or a record without questions gives the "no question" row):
  question_ids    int32 [L]     the question's WordPiece ids (all pad ids: no question)
  question_mask   int32 [L]     1 on real tokens
  answer_target   float32 [V]   each answer class's soft score (``answers.answer_scores``; all 0: no question,
                                or no answer of the question is a class)
  question_type   int32 []      index into the answer vocabulary's ``types``; -1: no question (a pretraining
                                objective leaves the row out), or a type the vocabulary does not list
  question_index  int32 []      which of the record's questions (-1: none)

``QuestionEvalIterator`` yields every question of the first ``num_examples`` records (0: all) of a split, records
in file order and each record's questions in order, in batches of the global batch size: every process reads
every record and keeps its rows of each global batch (so every process yields ``len()`` batches, the same
number), the last ones padded with ``valid`` False (question_type and question_index -1, question ids pad ids).
Its batches hold the fields above, ``answers`` bytes [B, A] (normalised, padded with b""), ``questions`` bytes
[B] (the text), ``valid`` bool [B], and the image's ``dense``, ``boxes``, ``cluster_ids`` (with ``vocab_dir``),
``image_id``, ``index``, ``text_ids``/``text_mask`` (its first caption).
"""

from typing import Any, Iterator

import jax
import numpy as np

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax.data import answers as answers_lib
from bigen_jax.data import batching
from bigen_jax.data import records
from bigen_jax.data import vocab as vocab_lib

# Row padding of evaluation batches (others: 0, or b"" for strings).
NO_QUESTION = -1
PAD_MINUS_ONE = ("question_type", "question_index")
PAD_WITH_PAD_ID = ("question_ids", "text_ids", "caption_ids")


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def answers_path(records_dir: str, answers_file: str = "") -> str:
  """``answers_file``, or by convention ``RECORDS_DIR/answers.json`` when it is ""."""
  return answers_file or answers_lib.default_path(records_dir)


def require_questions(records_dir: str, manifest: dict[str, Any]) -> int:
  """The manifest's ``max_answers``; DataError naming the manifest when its records hold no questions."""
  max_answers = records.max_answers(manifest)
  if not max_answers:
    raise records.DataError(
        f"{fileio.join(records_dir, records.MANIFEST_NAME)} says its records hold no questions "
        "(--config.data.questions=True needs them): extract them with tools/extract_features.py from a source "
        "with questions (the scenes source, or coco with --vqa_questions/--gqa_questions)")
  return max_answers


def pad_value(key: str, dtype: np.dtype, pad_id: int) -> Any:
  """The value padding rows of an evaluation batch hold in ``key``."""
  if key in PAD_WITH_PAD_ID:
    return pad_id
  if key in PAD_MINUS_ONE:
    return NO_QUESTION
  return b"" if np.dtype(dtype).kind in "OS" else 0


class QuestionTables:
  """The answer and question-type lookups of an answer vocabulary, for tf.data functions."""

  def __init__(self, vocab: answers_lib.AnswerVocab, *, max_answers: int, max_len: int, pad_id: int):
    tf = _tf()

    def table(keys):
      init = tf.lookup.KeyValueTensorInitializer(tf.constant(list(keys), tf.string),
                                                 tf.range(len(keys), dtype=tf.int64))
      return tf.lookup.StaticHashTable(init, default_value=NO_QUESTION)

    self.num_answers, self.max_answers, self.max_len, self.pad_id = vocab.num_answers, max_answers, max_len, pad_id
    self._answers, self._types = table(vocab.answers), table(vocab.types)
    self._scores = tf.constant(answers_lib.score_table(max_answers))

  def answer_target(self, answers):
    """tf string [A] (one question's answers, "" padding) -> float32 [V] soft scores."""
    tf = _tf()
    ids = tf.cast(self._answers.lookup(answers), tf.int32)
    given = tf.reduce_sum(tf.cast(answers != "", tf.int32))
    counts = tf.reduce_sum(tf.one_hot(ids, self.num_answers, dtype=tf.int32), axis=0)  # id -1: a zero row
    return tf.gather(self._scores[given], counts)

  def features(self, ex: dict[str, Any], pick) -> dict[str, Any]:
    """The question fields (module docstring) of question ``pick`` (int32 []) of a parsed record ``ex``."""
    tf = _tf()
    num = tf.shape(ex["question_ids"])[0]
    has = tf.logical_and(pick >= 0, pick < num)
    row = tf.clip_by_value(pick, 0, tf.maximum(num - 1, 0))
    ids = tf.cond(has, lambda: ex["question_ids"][row], lambda: tf.fill([self.max_len], self.pad_id))
    given = tf.cond(has, lambda: ex["answers"][row], lambda: tf.fill([self.max_answers], ""))
    kind = tf.cond(has, lambda: tf.cast(self._types.lookup(ex["question_types"][row]), tf.int32),
                   lambda: tf.constant(NO_QUESTION, tf.int32))
    return {"question_ids": tf.ensure_shape(ids, [self.max_len]),
            "question_mask": tf.cast(ids != self.pad_id, tf.int32),
            "answer_target": tf.ensure_shape(self.answer_target(given), [self.num_answers]),
            "question_type": kind, "question_index": tf.where(has, pick, NO_QUESTION)}


def load_tables(records_dir: str, manifest: dict[str, Any], *, answers_file: str = "", pad_id: int = 0
                ) -> tuple[answers_lib.AnswerVocab, QuestionTables]:
  """The answer vocabulary of ``records_dir`` (checked against its records) and its lookups."""
  max_answers = require_questions(records_dir, manifest)
  vocab = answers_lib.load_answer_vocab(answers_path(records_dir, answers_file), records_dir=records_dir)
  return vocab, QuestionTables(vocab, max_answers=max_answers, max_len=manifest["max_len"], pad_id=pad_id)


class QuestionEvalIterator:
  """Batches of every (image, question) pair of a split (module docstring); ``len()`` batches per process."""

  def __init__(self, *, records_dir: str, split: str, global_batch_size: int, answers_file: str = "",
               vocab_dir: str | None = None, process_index: int | None = None, process_count: int | None = None,
               pad_id: int = 0, num_examples: int = 0, verify_checksums: bool = False, num_parallel_calls: int = 4,
               prefetch: int = 2):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise errors.ConfigError(f"the evaluation batch size {global_batch_size} is not divisible by the "
                               f"{self.process_count} processes")
    self.records_dir, self.split, self.pad_id = records_dir, split, pad_id
    self.global_batch_size, self.batch_size = global_batch_size, global_batch_size // self.process_count
    self.num_parallel_calls, self.prefetch = num_parallel_calls, prefetch
    self.manifest = records.read_manifest(records_dir)
    self.vocab, self.tables = load_tables(records_dir, self.manifest, answers_file=answers_file, pad_id=pad_id)
    self.shards = records.split_shards(records_dir, split, manifest=self.manifest, checksum=verify_checksums)
    total = sum(s["num_examples"] for s in self.shards)
    self.num_records = min(num_examples, total) if num_examples else total
    self.num_questions = records.num_questions(records_dir, split, num_examples=self.num_records,
                                               manifest=self.manifest)
    self.cluster_ids = None
    if vocab_dir:
      self.cluster_ids = vocab_lib.load_vocab(vocab_dir, records_dir=records_dir).cluster_ids(split)
    self._parse = records.make_parse_fn(self.manifest["feature_dim"], self.manifest["max_len"],
                                        self.tables.max_answers)

  def __len__(self) -> int:
    return -(-self.num_questions // self.global_batch_size)

  def own_rows(self) -> int:
    """The real (valid) rows this process yields in all."""
    lo = self.process_index * self.batch_size
    return sum(len(range(start + lo, min(start + lo + self.batch_size, self.num_questions)))
               for start in range(0, self.num_questions, self.global_batch_size))

  def _record(self, serialized):
    """One record -> its image fields and parsed questions (tf)."""
    tf = _tf()
    ex = self._parse(serialized)
    caps = ex["caption_ids"]
    text = tf.cond(tf.shape(caps)[0] > 0, lambda: caps[0], lambda: tf.fill([self.manifest["max_len"]], self.pad_id))
    image = {"dense": ex["dense"], "boxes": ex["boxes"], "image_id": ex["image_id"], "index": ex["index"],
             "text_ids": text, "text_mask": tf.cast(text != self.pad_id, tf.int32)}
    if self.cluster_ids is not None:
      image["cluster_ids"] = tf.gather(tf.constant(self.cluster_ids), ex["index"])
    return image, ex

  def _questions(self, image, ex):
    """One record's rows: one per question (tf dataset)."""
    tf = _tf()

    def row(q):
      q = tf.cast(q, tf.int32)
      out = {**image, **self.tables.features(ex, q)}
      out.update(answers=ex["answers"][q], questions=ex["questions"][q], valid=tf.constant(True))
      return out

    return tf.data.Dataset.range(tf.cast(tf.shape(ex["question_ids"])[0], tf.int64)).map(row)

  def dataset(self):
    """The tf.data batches of this process's rows (the last ones short or empty)."""
    tf = _tf()
    ds = tf.data.TFRecordDataset([s["path"] for s in self.shards]).take(self.num_records)
    ds = ds.map(self._record, num_parallel_calls=self.num_parallel_calls, deterministic=True)
    ds = ds.flat_map(self._questions).batch(self.global_batch_size)
    start = self.process_index * self.batch_size
    return ds.map(lambda rows: {k: v[start:start + self.batch_size] for k, v in rows.items()}).prefetch(self.prefetch)

  def _pad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: batching.pad_rows(v, self.batch_size, fill=pad_value(k, v.dtype, self.pad_id))
            for k, v in batch.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    count, template = 0, None
    it = self.dataset().as_numpy_iterator()
    for _ in range(len(self)):
      batch = next(it, None)
      if batch is None and template is None:
        break
      batch = {k: v[:0] for k, v in template.items()} if batch is None else batch
      template = batch
      unknown = batch["valid"] & (batch["question_type"] < 0)
      if unknown.any():
        raise records.DataError(
            f"split {self.split!r} of {self.records_dir}: record {int(batch['index'][unknown][0])} has a question "
            f"type that the answer vocabulary (types {list(self.vocab.types)}) does not list: rebuild it with "
            "tools/build_answers.py")
      count += int(batch["valid"].sum())
      yield self._pad(batch)
    if count != self.own_rows():
      raise records.DataError(
          f"split {self.split!r} of {self.records_dir} gave process {self.process_index} {count} questions, "
          f"{self.own_rows()} expected: a shard holds fewer records or questions than {records.MANIFEST_NAME} says")
