r"""Builds the answer vocabulary of question answering from a records directory's training questions.

  python tools/build_answers.py --records data/coco_vqa --min_count 9
  python tools/build_answers.py --records demo_out/records        # the world: its fixed answers

Writes ``RECORDS/answers.json`` (or ``--out``; format in bigen_jax/data/answers.py): the answer classes, the
question types, each type's majority answer, and prints the vocabulary's size and coverage. The records must
hold questions (tools/extract_features.py: the scenes source, or coco with --vqa_questions/--gqa_questions).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_RECORDS = flags.DEFINE_string("records", None, "Records directory (tools/extract_features.py --out).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output file (default RECORDS/answers.json).")
_SPLIT = flags.DEFINE_string("split", "train", "Split whose questions are counted.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 9, "counted: keep answers that are the majority answer of at least "
                                  "this many questions (9: VQA v2's usual ~3,000 answers).", lower_bound=1)
_TOP_K = flags.DEFINE_integer("top_k", 0, "counted: keep at most this many answers, the most frequent (0: all).",
                              lower_bound=0)
_VOCABULARY = flags.DEFINE_enum("vocabulary", "auto", ["auto", "counted", "fixed"],
                                "fixed: the captioned-scenes world's ANSWERS and QUESTION_TYPES; counted: from the "
                                "split's answers; auto: fixed for the world's records, else counted.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax.data import answers  # pylint: disable=g-import-not-at-top
  vocab = answers.build_answer_vocab(_RECORDS.value, split=_SPLIT.value, min_count=_MIN_COUNT.value,
                                     top_k=_TOP_K.value, vocabulary=_VOCABULARY.value)
  out = _OUT.value or answers.default_path(_RECORDS.value)
  vocab.save(out)
  print(f"{out}: {vocab.num_answers} answers ({vocab.meta['vocabulary']}), {len(vocab.types)} question types; "
        f"{vocab.meta['coverage']:.1%} of the {vocab.meta['num_questions']} {_SPLIT.value} questions have their "
        "majority answer among them")


if __name__ == "__main__":
  cli.run(main)
