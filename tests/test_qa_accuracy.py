"""VQA accuracy and the majority baseline against hand-computed values."""

import numpy as np
import pytest

from bigen_jax.eval import qa_accuracy

ANSWERS = ("yes", "no", "2", "red")
TYPES = ("yes/no", "number", "other")
# Four questions' soft targets over ANSWERS (VQA's scores: 1.0, 0.9, 0.6, 0.3) and their types.
TARGETS = np.array([[1.0, 0.3, 0.0, 0.0],   # yes/no: yes (10 or >= 4 annotators), no (1)
                    [0.0, 1.0, 0.0, 0.0],   # yes/no: no
                    [0.0, 0.0, 0.9, 0.6],   # number: 2 (3 annotators), red (2)
                    [0.0, 0.0, 0.0, 1.0]])  # other: red
QUESTION_TYPES = np.array([0, 0, 1, 2])


def test_accuracy_overall_and_per_type():
  got = qa_accuracy.vqa_accuracy(predictions=np.array([0, 0, 2, 3]), targets=TARGETS, types=QUESTION_TYPES,
                                 type_names=TYPES)
  # scores of the predictions: 1.0, 0.0, 0.9, 1.0
  assert got == pytest.approx({"accuracy": 2.9 / 4, "num_questions": 4, "accuracy/yes/no": 0.5,
                               "num_questions/yes/no": 2, "accuracy/number": 0.9, "num_questions/number": 1,
                               "accuracy/other": 1.0, "num_questions/other": 1})
  partial = qa_accuracy.vqa_accuracy(predictions=np.array([1, 0, 3, 0]), targets=TARGETS, types=QUESTION_TYPES,
                                     type_names=TYPES)
  assert partial["accuracy"] == pytest.approx((0.3 + 0 + 0.6 + 0) / 4)
  assert partial["accuracy/yes/no"] == pytest.approx(0.15) and partial["accuracy/number"] == pytest.approx(0.6)


def test_padding_rows_and_unknown_types():
  predictions = np.array([0, 1, 2, 3, 0])
  targets = np.concatenate([TARGETS, np.zeros((1, 4))])
  types = np.array([0, -1, 1, 2, 0])
  valid = np.array([True, True, True, True, False])  # the last row pads the batch
  got = qa_accuracy.vqa_accuracy(predictions=predictions, targets=targets, types=types, type_names=TYPES,
                                 valid=valid)
  assert got["num_questions"] == 4 and got["accuracy"] == pytest.approx((1.0 + 1.0 + 0.9 + 1.0) / 4)
  assert got["accuracy/unknown"] == 1.0 and got["num_questions/unknown"] == 1 and got["num_questions/yes/no"] == 1


def test_majority_baseline():
  majority = {"yes/no": "yes", "number": "2", "other": "2"}
  got = qa_accuracy.majority_baseline(targets=TARGETS, types=QUESTION_TYPES, answers=ANSWERS, type_names=TYPES,
                                      majority=majority)
  # predictions yes, yes, 2, 2: scores 1.0, 0.0, 0.9, 0.0
  assert got["accuracy"] == pytest.approx(1.9 / 4)
  assert got["accuracy/yes/no"] == pytest.approx(0.5) and got["accuracy/number"] == pytest.approx(0.9)
  assert got["accuracy/other"] == 0.0
  np.testing.assert_array_equal(qa_accuracy.majority_predictions(np.array([2, -1, 0]), np.array([0, -1, 3])),
                                [3, 0, 0])


def test_shape_errors():
  with pytest.raises(ValueError, match="must be"):
    qa_accuracy.vqa_accuracy(predictions=np.zeros(3, int), targets=TARGETS, types=QUESTION_TYPES, type_names=TYPES)
  with pytest.raises(ValueError, match="predicted answer ids"):
    qa_accuracy.vqa_accuracy(predictions=np.array([0, 0, 4, 0]), targets=TARGETS, types=QUESTION_TYPES,
                             type_names=TYPES)
