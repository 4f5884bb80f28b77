"""Feature extraction with questions: the world's questions in records, unchanged bytes without them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bigen_jax.data import records  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.features import backbones  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.features import extract  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.worlds.scenes import qa  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.worlds.scenes import world  # pylint: disable=g-import-not-at-top,wrong-import-position


def _source(n=5):
  """World examples in the source-dict form of ``tfds_builder.source`` (questions with their types)."""
  out = []
  for i in range(n):
    ex = world.make_example(i, world.SceneConfig(image_size=64))
    ex["questions"] = [{"question": p["question"], "answers": [p["answer"]], "type": qa.question_type(p["question"])}
                       for p in ex["qa"]]
    out.append(ex)
  return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  from bigen_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  texts = [t for ex in _source(20) for t in ex["captions"] + [p["question"] for p in ex["qa"]]]
  path = tokenizer.train_wordpiece(texts, vocab_size=120, out_dir=str(tmp_path_factory.mktemp("vocab")))
  return tokenizer.load_tokenizer(path)


def _extract(out_dir, tok, source, **kw):
  return extract.extract_split(source, split="train", out_dir=str(out_dir), tokenizer=tok, shard_size=3,
                               batch_size=2, backbone=backbones.build_backbone("demo"), progress=False, **kw)


def test_extract_writes_the_worlds_questions(tmp_path, tok):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  src = _source()
  entry = _extract(tmp_path / "qa", tok, src, max_answers=1)
  manifest = records.read_manifest(str(tmp_path / "qa"))
  assert manifest["questions"] is True and manifest["max_answers"] == 1
  assert [s["num_questions"] for s in entry["shards"]] == [sum(len(ex["qa"]) for ex in src[:3]),
                                                           sum(len(ex["qa"]) for ex in src[3:])]
  got = [records.decode_example(r.numpy(), 64, 17, max_answers=1)
         for s in entry["shards"] for r in tf.data.TFRecordDataset(str(tmp_path / "qa" / s["file"]))]
  for g, ex in zip(got, src):
    questions = [p["question"] for p in ex["qa"]]
    np.testing.assert_array_equal(g["question_ids"], tok.encode(questions, max_len=17))
    assert [q.decode() for q in g["questions"]] == questions
    assert [[a.decode() for a in row] for row in g["answers"]] == [[p["answer"]] for p in ex["qa"]]
    assert [t.decode() for t in g["question_types"]] == [qa.question_type(q) for q in questions]
  with pytest.raises(records.DataError, match=r"questions \(manifest: True, this run: None\)"):
    _extract(tmp_path / "qa", tok, src)  # a run without questions into a directory with them


def test_extract_without_questions_writes_the_same_bytes(tmp_path, tok):
  src = _source()
  with_field = _extract(tmp_path / "a", tok, src)  # max_answers 0: the source's questions are not written
  without = _extract(tmp_path / "b", tok, [{k: v for k, v in ex.items() if k != "questions"} for ex in src])
  assert [s["sha256"] for s in with_field["shards"]] == [s["sha256"] for s in without["shards"]]
  assert "num_questions" not in with_field["shards"][0]
  assert "questions" not in records.read_manifest(str(tmp_path / "a"))


def test_extract_rejects_more_answers_than_max(tmp_path, tok):
  src = _source(2)
  src[1]["questions"][0]["answers"] = ["yes", "no"]
  with pytest.raises(records.DataError, match=r"scenes/train/000001.*has 2 answers, more than max_answers=1"):
    _extract(tmp_path, tok, src, max_answers=1)
