"""VQA accuracy of predicted answers against soft targets, overall and per question type; the majority baseline.

A question's accuracy is the soft score of the predicted answer (``bigen_jax.data.answers``: the VQA evaluation's
score, 0.3 / 0.6 / 0.9 / 1 for an answer 1 / 2 / 3 / >= 4 of 10 annotators gave; 1 or 0 for single-answer
sources, where it is exact-match accuracy). Pure numpy: the evaluator gathers every question's predicted answer
id, soft target row and type id (``qa_pipeline.QuestionEvalIterator`` batches) and calls these on process 0.
"""

from typing import Mapping, Sequence

import numpy as np

UNKNOWN_TYPE = "unknown"  # the name reported for type id -1


def vqa_accuracy(*, predictions: np.ndarray, targets: np.ndarray, types: np.ndarray, type_names: Sequence[str],
                 valid: np.ndarray | None = None) -> dict[str, float]:
  """``predictions`` int [N] answer ids, ``targets`` float [N, V] soft scores, ``types`` int [N] type ids into
  ``type_names`` (-1: reported as "unknown"), ``valid`` bool [N] (None: all; padding rows False).

  Returns ``{"accuracy", "num_questions", "accuracy/<type>", "num_questions/<type>"}`` for every type of
  ``type_names`` that has a question (and "unknown" if any type id is -1); accuracies in [0, 1].
  """
  predictions, targets, types = np.asarray(predictions), np.asarray(targets, np.float64), np.asarray(types)
  if targets.ndim != 2 or predictions.shape != targets.shape[:1] or types.shape != predictions.shape:
    raise ValueError(f"predictions {predictions.shape}, targets {targets.shape} and types {types.shape} must be "
                     "[N], [N, V] and [N]")
  keep = np.ones(len(predictions), bool) if valid is None else np.asarray(valid, bool)
  if ((predictions < 0) | (predictions >= targets.shape[1]))[keep].any():
    raise ValueError(f"predicted answer ids must lie in [0, {targets.shape[1]})")
  if ((types < -1) | (types >= len(type_names)))[keep].any():
    raise ValueError(f"type ids must lie in [-1, {len(type_names)})")
  scores = np.take_along_axis(targets, np.clip(predictions, 0, targets.shape[1] - 1)[:, None], axis=1)[:, 0]
  scores, types = scores[keep], types[keep]
  out = {"accuracy": float(scores.mean()) if len(scores) else 0.0, "num_questions": int(len(scores))}
  for t, name in [(i, n) for i, n in enumerate(type_names)] + [(-1, UNKNOWN_TYPE)]:
    mine = types == t
    if mine.any():
      out[f"accuracy/{name}"] = float(scores[mine].mean())
      out[f"num_questions/{name}"] = int(mine.sum())
  return out


def majority_predictions(types: np.ndarray, majority_ids: np.ndarray) -> np.ndarray:
  """int [N]: each question's type's majority answer id (``AnswerVocab.majority_ids``; 0 where a type has none
  or the type id is -1)."""
  types, majority_ids = np.asarray(types), np.asarray(majority_ids)
  if not len(majority_ids):
    return np.zeros(types.shape, np.int64)
  picked = np.where(types >= 0, majority_ids[np.clip(types, 0, len(majority_ids) - 1)], -1)
  return np.where(picked >= 0, picked, 0)


def majority_baseline(*, targets: np.ndarray, types: np.ndarray, answers: Sequence[str], type_names: Sequence[str],
                      majority: Mapping[str, str], valid: np.ndarray | None = None) -> dict[str, float]:
  """``vqa_accuracy`` of answering every question with its type's majority answer (the answer vocabulary
  file's ``answers``, ``types`` and ``majority``)."""
  ids = {a: i for i, a in enumerate(answers)}
  majority_ids = np.asarray([ids.get(majority.get(t, ""), -1) for t in type_names], np.int64)
  return vqa_accuracy(predictions=majority_predictions(types, majority_ids), targets=targets, types=types,
                      type_names=type_names, valid=valid)
