"""The answer vocabulary of question answering (the QA head's classes) and VQA's soft answer scores.

Built from one split of a records directory (``build_answer_vocab``, ``tools/build_answers.py``) and saved as
JSON, by convention ``RECORDS_DIR/answers.json`` (``default_path``; ``config.data.answers_file`` "" means it)::

    {"version": 1, "vocabulary": "counted" | "fixed", "split": "train", "min_count": 9, "top_k": 0,
     "answers": ["yes", "no", "2", ...],     answer id -> answer (the classes)
     "answer_counts": [n, ...],               the split's questions whose majority answer it is
     "types": ["number", "other", "yes/no"],  question_type id -> question type
     "type_counts": {"number": n, ...},       the split's questions per type
     "majority": {"number": "2", ...},        each type's most common majority answer (the majority baseline)
     "overall_majority": "yes", "num_questions": n,
     "coverage": c,                           fraction of the split's questions whose majority answer is a class
     "records_fingerprint": "..."}            of the split's shards: the file is valid for those records only

"counted" (VQA, GQA): the majority answers seen at least ``min_count`` times, the ``top_k`` most frequent if
``top_k`` > 0 (VQA's usual vocabulary: ``min_count=9`` over VQA v2 train gives about 3,000 answers), ordered by
count; types: those of the split, sorted. "fixed" (the captioned-scenes world): its ``ANSWERS`` and
``QUESTION_TYPES`` as they are. A question's majority answer is its most frequent answer (ties: the first given).

Soft scores (``answer_scores``): with n answers per question (empty ones not counted) and c of them equal to a,
a scores as in the VQA evaluation: for n >= 4 (VQA's 10 annotators) the mean over the n leave-one-out subsets of
min(#matching / 3, 1), ``((n - c) min(c / 3, 1) + c min((c - 1) / 3, 1)) / n`` (0.3, 0.6, 0.9, 1 for c = 1, 2, 3,
>= 4 of 10; the often quoted min(c / 3, 1) is this without the averaging); for n <= 3 (GQA, the world: one answer)
c / n, one-hot for one answer. ``score_table`` tabulates it for the input pipeline.
"""

import collections
import dataclasses
import hashlib
from typing import Any, Mapping, Sequence

from etils import epath
import numpy as np

from bigen_jax import fileio
from bigen_jax.data import records

ANSWERS_NAME = "answers.json"
VERSION = 1
VOCABULARIES = ("auto", "counted", "fixed")


def default_path(records_dir: str) -> str:
  return fileio.join(records_dir, ANSWERS_NAME)


def answer_score(count: int, num_answers: int) -> float:
  """The soft score of an answer given by ``count`` of a question's ``num_answers`` answers (module docstring)."""
  c, n = int(count), int(num_answers)
  if c <= 0 or n <= 0:
    return 0.0
  if n <= 3:
    return c / n
  return ((n - c) * min(c / 3, 1.0) + c * min((c - 1) / 3, 1.0)) / n


def score_table(max_answers: int) -> np.ndarray:
  """float32 [A + 1, A + 1]: entry [n, c] is ``answer_score(c, n)`` (c > n: unused)."""
  return np.asarray([[answer_score(c, n) for c in range(max_answers + 1)] for n in range(max_answers + 1)],
                    np.float32)


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
  """Each distinct non-empty answer of one question -> its soft score."""
  given = [a for a in answers if a]
  return {a: answer_score(c, len(given)) for a, c in collections.Counter(given).items()}


def majority_answer(answers: Sequence[str]) -> str:
  """The most frequent non-empty answer (ties: the first given); "" when there is none."""
  given = [a for a in answers if a]
  if not given:
    return ""
  counts = collections.Counter(given)
  return max(given, key=lambda a: (counts[a], -given.index(a)))


@dataclasses.dataclass(frozen=True)
class AnswerVocab:
  """An answer vocabulary file's content (module docstring)."""
  answers: tuple[str, ...]
  types: tuple[str, ...]
  majority: Mapping[str, str]
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_answers(self) -> int:
    return len(self.answers)

  def answer_ids(self) -> dict[str, int]:
    return {a: i for i, a in enumerate(self.answers)}

  def soft_target(self, answers: Sequence[str]) -> np.ndarray:
    """float32 [num_answers]: each class's soft score for a question with ``answers`` (out-of-vocabulary
    answers score nothing but count among the answers)."""
    ids, out = self.answer_ids(), np.zeros(self.num_answers, np.float32)
    for a, s in answer_scores(answers).items():
      if a in ids:
        out[ids[a]] = s
    return out

  def majority_ids(self) -> np.ndarray:
    """int32 [num_types]: the answer id of each type's majority answer (-1: none, or not a class)."""
    ids = self.answer_ids()
    return np.asarray([ids.get(self.majority.get(t, ""), -1) for t in self.types], np.int32)

  def to_json(self) -> dict[str, Any]:
    return {**self.meta, "version": VERSION, "answers": list(self.answers), "types": list(self.types),
            "majority": dict(self.majority)}

  def save(self, path: str) -> None:
    fileio.write_json_atomic(path, self.to_json())


def split_fingerprint(manifest: Mapping[str, Any], split: str) -> str:
  """Hash of one split's shard checksums (an answer vocabulary is valid for the records it was counted on)."""
  h = hashlib.sha256()
  for shard in manifest["splits"][split]["shards"]:
    h.update(f"{split}:{shard['file']}:{shard['sha256']};".encode())
  return h.hexdigest()[:16]


def fixed_table(manifest: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
  """(answers, question types) of the records' source when its world has a fixed answer table (the
  captioned-scenes world's, through its source plug-in: ``bigen_jax.eval.sources``), else None."""
  from bigen_jax.eval import sources  # pylint: disable=g-import-not-at-top
  plugin = sources.plugin(manifest.get("source") or {})
  table = plugin.answer_table() if plugin is not None else None
  return None if table is None else (tuple(table[0]), tuple(table[1]))


def build_answer_vocab(records_dir: str, *, split: str = "train", min_count: int = 9, top_k: int = 0,
                       vocabulary: str = "auto") -> AnswerVocab:
  """Counts ``split``'s questions (module docstring). ``vocabulary``: "counted", "fixed" (the world's lists; only
  for its records) or "auto" (fixed for the captioned-scenes source, else counted)."""
  if vocabulary not in VOCABULARIES:
    raise ValueError(f"vocabulary={vocabulary!r}, expected one of {VOCABULARIES}")
  manifest = records.read_manifest(records_dir)
  source = (manifest.get("source") or {}).get("name")
  fixed = fixed_table(manifest)
  if vocabulary == "auto":
    vocabulary = "fixed" if fixed else "counted"
  if vocabulary == "fixed" and not fixed:
    raise records.DataError(f"{fileio.join(records_dir, records.MANIFEST_NAME)}: source {source!r} has no fixed "
                            "answer vocabulary (only the captioned-scenes world has): count one (--vocabulary=counted)")
  rows = records.read_questions(records_dir, split)
  majority_of = collections.Counter()
  per_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for row in rows:
    for kind, answers in zip(row["types"], row["answers"]):
      best = majority_answer(answers)
      per_type[kind][best] += 1
      if best:
        majority_of[best] += 1
  num = sum(sum(c.values()) for c in per_type.values())
  if not num:
    raise records.DataError(f"split {split!r} of {records_dir} has no questions to build an answer vocabulary from")
  by_count = sorted(majority_of, key=lambda a: (-majority_of[a], a))
  if vocabulary == "fixed":
    answers, types = fixed
    min_count, top_k = None, None
  else:
    answers = tuple(a for a in by_count if majority_of[a] >= min_count)[:top_k or None]
    types = tuple(sorted(per_type))
  if not answers:
    raise records.DataError(f"no answer of split {split!r} of {records_dir} is the majority answer of "
                            f"{min_count} questions: lower --min_count")

  def most_common(counts: collections.Counter) -> str:
    return min((a for a in counts if a), key=lambda a: (-counts[a], a), default="")

  majority = {t: most_common(per_type[t]) for t in types if t in per_type}
  kept = set(answers)
  meta = {"vocabulary": vocabulary, "split": split, "min_count": min_count, "top_k": top_k,
          "answer_counts": [majority_of[a] for a in answers],
          "type_counts": {t: sum(per_type[t].values()) for t in sorted(per_type)},
          "overall_majority": most_common(majority_of), "num_questions": num,
          "coverage": sum(majority_of[a] for a in kept) / num,
          "records_fingerprint": split_fingerprint(manifest, split)}
  return AnswerVocab(answers=answers, types=types, majority=majority, meta=meta)


def load_answer_vocab(path: str, *, records_dir: str | None = None) -> AnswerVocab:
  """Reads an answer vocabulary file; with ``records_dir``, DataError unless it was built from those records."""
  if not epath.Path(path).exists():
    raise records.DataError(f"no answer vocabulary {path}: build it with tools/build_answers.py")
  try:
    data = fileio.read_json(path)
  except ValueError as e:
    raise records.DataError(f"{path} is not valid JSON: {e}") from e
  missing = [k for k in ("version", "answers", "types", "majority") if k not in data]
  if missing:
    raise records.DataError(f"{path} lacks field(s) {missing}")
  if data["version"] != VERSION:
    raise records.DataError(f"{path} has version {data['version']}, this code reads {VERSION}")
  if records_dir is not None and "records_fingerprint" in data:
    manifest = records.read_manifest(records_dir)
    split = data.get("split", "train")
    if split not in manifest["splits"] or split_fingerprint(manifest, split) != data["records_fingerprint"]:
      raise records.DataError(f"{path} was built from other records than {records_dir} (split {split!r}'s "
                              "fingerprint differs): rebuild it with tools/build_answers.py")
  meta = {k: v for k, v in data.items() if k not in ("version", "answers", "types", "majority")}
  return AnswerVocab(answers=tuple(data["answers"]), types=tuple(data["types"]), majority=dict(data["majority"]),
                     meta=meta)
