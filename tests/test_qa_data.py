"""Question-answering data: records with questions, VQA/GQA readers, the answer vocabulary and soft scores, the
input pipeline's QA batches and the evaluation iterator over every question."""

import collections
import hashlib
import json
import os

from conftest import QA_MAX_ANSWERS, QA_TYPES, qa_fixture, write_records
import numpy as np
import pytest

from bigen_jax import fileio
from bigen_jax.data import answers as answers_lib
from bigen_jax.data import input_pipeline
from bigen_jax.data import qa_pipeline
from bigen_jax.data import qa_sources
from bigen_jax.data import records

# sha256 of ``_encode(records)`` below as the schema serialised it before records had question fields: a source
# without questions must keep writing these bytes (the visual vocabulary fingerprints shard checksums).
RECORD_SHA256 = "855f3d5f45e474024f8789a08ecb77d4960c4e8b336974f683e72e176cb64479"


def _encode(**questions):
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(64, 8)).astype(np.float32)
  return records.encode_example(index=3, image_id=1003, key="train/3", dense=dense, boxes=records.grid_boxes(),
                                caption_ids=np.arange(12).reshape(2, 6), captions=["a b", "c d"], image=b"png",
                                **questions)


QUESTIONS = {"question_ids": np.array([[2, 7, 8, 3, 0, 0], [2, 9, 3, 0, 0, 0]]),
             "questions": ["what is it?", "is it red?"], "question_types": ["other", "yes/no"],
             "answers": [["cat", "cat", "dog"], ["yes", "", ""]]}


# ------------------------------------------------------------------------------------------------- records


def test_records_without_questions_keep_their_bytes():
  serialized = _encode()
  assert hashlib.sha256(serialized).hexdigest() == RECORD_SHA256
  ex = records.decode_example(serialized, 8, 6, max_answers=3)  # a QA reader sees no questions
  assert ex["question_ids"].shape == (0, 6) and ex["answers"].shape == (0, 3) and ex["questions"].shape == (0,)


def test_records_round_trip_questions():
  serialized = _encode(**QUESTIONS)
  assert serialized == _encode(**QUESTIONS)  # deterministic
  ex = records.decode_example(serialized, 8, 6, max_answers=3)
  np.testing.assert_array_equal(ex["question_ids"], QUESTIONS["question_ids"])
  assert ex["question_ids"].dtype == np.int32
  assert [q.decode() for q in ex["questions"]] == QUESTIONS["questions"]
  assert [t.decode() for t in ex["question_types"]] == QUESTIONS["question_types"]
  assert [[a.decode() for a in row] for row in ex["answers"]] == QUESTIONS["answers"]
  plain = records.decode_example(serialized, 8, 6)  # readers that ask for no questions get the old fields
  assert "question_ids" not in plain
  np.testing.assert_array_equal(plain["caption_ids"], np.arange(12).reshape(2, 6))
  empty = records.decode_example(_encode(question_ids=np.zeros((0, 6)), questions=[], question_types=[], answers=[]),
                                 8, 6, max_answers=3)
  assert empty["question_ids"].shape == (0, 6) and empty["answers"].shape == (0, 3)


def test_records_reject_inconsistent_questions():
  with pytest.raises(records.DataError, match="2 rows of question_ids but 1 questions"):
    _encode(**{**QUESTIONS, "questions": ["one?"]})
  with pytest.raises(records.DataError, match="answer lists of different lengths"):
    _encode(**{**QUESTIONS, "answers": [["cat"], ["yes", ""]]})


def test_read_questions_and_counts(tmp_path):
  d = str(tmp_path / "r")
  write_records(d, splits={"train": 23}, questions=True)
  rows = records.read_questions(d, "train")
  assert len(rows) == 23
  for i, row in enumerate(rows):
    want = qa_fixture(i)
    assert row["types"] == [q[2] for q in want] and row["answers"] == [q[3] for q in want]
  total = sum(i % 4 for i in range(23))
  assert records.num_questions(d, "train") == total
  assert records.num_questions(d, "train", num_examples=7) == sum(i % 4 for i in range(7))  # counted by reading
  plain = str(tmp_path / "plain")
  write_records(plain, splits={"train": 3})
  with pytest.raises(records.DataError, match="hold no questions"):
    records.read_questions(plain, "train")


# ------------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("raw,want", [
    ("Two", "2"), ("the dog.", "dog"), ("  A  Cat!\n", "cat"), ("dont know", "don't know"), ("1,000", "1000"),
    ("yes, sir", "yes sir"), ("red/white", "red white"), ("3.5", "3.5"), ("an apple", "apple"),
    ("Ten", "10"), ("isnt", "isn't")])
def test_normalise_answer_follows_the_vqa_evaluation(raw, want):
  assert qa_sources.normalise_answer(raw) == want


def _write(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


def _vqa_fixture(tmp_path):
  questions = {"questions": [{"image_id": 9, "question": "How many dogs? ", "question_id": 92},
                             {"image_id": 9, "question": "Is it red?", "question_id": 91},
                             {"image_id": 25, "question": "What is this?", "question_id": 250}]}

  def ann(qid, image, answers, kind):
    return {"question_id": qid, "image_id": image, "answer_type": kind, "question_type": "what is",
            "multiple_choice_answer": answers[0], "answers": [{"answer": a, "answer_id": k + 1}
                                                              for k, a in enumerate(answers)]}

  annotations = {"annotations": [
      ann(91, 9, ["Yes", "yes", "no"] + ["yes"] * 7, "yes/no"),
      ann(92, 9, ["two", "2", "Three"] + ["2"] * 7, "number"),
      ann(250, 25, ["A dog."] * 10, "other")]}
  return _write(tmp_path / "q.json", questions), _write(tmp_path / "a.json", annotations)


def test_read_vqa(tmp_path):
  q, a = _vqa_fixture(tmp_path)
  got = qa_sources.read_vqa(q, a)
  assert sorted(got) == [9, 25]
  assert [x["question_id"] for x in got[9]] == [91, 92]  # question-id order
  assert got[9][0] == {"question": "Is it red?", "answers": ["yes", "yes", "no"] + ["yes"] * 7, "type": "yes/no",
                       "question_id": 91}
  assert got[9][1]["answers"] == ["2", "2", "3"] + ["2"] * 7 and got[9][1]["question"] == "How many dogs?"
  assert got[25][0]["answers"] == ["dog"] * 10 and got[25][0]["type"] == "other"
  assert qa_sources.read_vqa(q, a, type_field="question_type")[25][0]["type"] == "what is"
  test = qa_sources.read_vqa(q)  # test-dev: questions only
  assert test[9][1] == {"question": "How many dogs?", "answers": [], "type": "", "question_id": 92}


def test_read_vqa_errors_name_file_and_field(tmp_path):
  q, a = _vqa_fixture(tmp_path)
  data = json.load(open(a))
  del data["annotations"][0]["answers"]
  broken = _write(tmp_path / "broken.json", data)
  with pytest.raises(records.DataError, match=r"broken.json: annotations\[0\] lacks the field 'answers'"):
    qa_sources.read_vqa(q, broken)
  data = json.load(open(a))
  data["annotations"] = data["annotations"][1:]
  with pytest.raises(records.DataError, match=r"1 questions of .*q.json have no annotation .*question ids \[91\]"):
    qa_sources.read_vqa(q, _write(tmp_path / "short.json", data))
  with pytest.raises(records.DataError, match="VQA questions file .*nope.json.* does not exist"):
    qa_sources.read_vqa(str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="type_field"):
    qa_sources.read_vqa(q, a, type_field="structural")


def _gqa_fixture(tmp_path):
  def q(image, text, answer, structural):
    return {"imageId": image, "question": text, "answer": answer,
            "types": {"structural": structural, "semantic": "attr", "detailed": "colorSimple"}}

  first = _write(tmp_path / "gqa0.json", {"201": q("2354786", "What color is the cup?", "White", "query"),
                                          "31": q("2354786", "Is the cup red?", "no", "verify")})
  second = _write(tmp_path / "gqa1.json", {"7": q("n161313", "Is it on the table?", "yes", "verify")})
  return first, second


def test_read_gqa_and_coco_ids(tmp_path):
  first, second = _gqa_fixture(tmp_path)
  got = qa_sources.read_gqa([first, second])
  assert sorted(got) == ["2354786", "n161313"]
  assert [x["question_id"] for x in got["2354786"]] == ["31", "201"]  # numeric order of the ids
  assert got["2354786"][1] == {"question": "What color is the cup?", "answers": ["white"], "type": "query",
                               "question_id": "201"}
  assert qa_sources.read_gqa(first, type_field="semantic")["2354786"][0]["type"] == "attr"
  image_data = _write(tmp_path / "image_data.json", [{"image_id": 2354786, "coco_id": 9},
                                                     {"image_id": "n161313", "coco_id": None}])
  mapping = qa_sources.coco_ids(image_data)
  assert mapping == {"2354786": 9}
  by_coco = qa_sources.by_coco_id(got, mapping)
  assert list(by_coco) == [9] and len(by_coco[9]) == 2
  merged = qa_sources.merge(qa_sources.read_vqa(*_vqa_fixture(tmp_path)), by_coco)
  assert [x["question_id"] for x in merged[9]] == [91, 92, "31", "201"]
  with pytest.raises(records.DataError, match=r"gqa_bad.json: question '1' lacks the field 'imageId'"):
    qa_sources.read_gqa(_write(tmp_path / "gqa_bad.json", {"1": {"question": "x?"}}))


# ------------------------------------------------------------------------------------------- answer scores


def _official_vqa_accuracy(prediction, gt):
  """The VQA evaluation's loop: the mean over the annotators of min(#other annotators matching / 3, 1)."""
  accs = []
  for k in range(len(gt)):
    others = gt[:k] + gt[k + 1:]
    accs.append(min(1.0, sum(a == prediction for a in others) / 3))
  return sum(accs) / len(accs)


def test_answer_scores_hand_computed():
  assert [round(answers_lib.answer_score(c, 10), 6) for c in range(6)] == [0, 0.3, 0.6, 0.9, 1, 1]
  assert answers_lib.answer_score(1, 1) == 1.0 and answers_lib.answer_score(1, 2) == 0.5
  assert answers_lib.answer_scores(["a2"] * 8 + ["yes"] * 2) == pytest.approx({"a2": 1.0, "yes": 0.6})
  assert answers_lib.answer_scores(["a1"] + [""] * 9) == {"a1": 1.0}  # one answer: one-hot
  gt = ["2"] * 3 + ["3"] * 2 + ["4"] + ["5"] * 4
  for prediction in ("2", "3", "4", "5", "6"):
    want = _official_vqa_accuracy(prediction, gt)
    assert answers_lib.answer_scores(gt).get(prediction, 0.0) == pytest.approx(want)
  table = answers_lib.score_table(10)
  assert table.shape == (11, 11) and table[10, 3] == pytest.approx(0.9) and table[1, 1] == 1.0


def test_majority_answer():
  assert answers_lib.majority_answer(["b", "a", "a", "b"]) == "b"  # tie: the first given
  assert answers_lib.majority_answer(["", "x", ""]) == "x" and answers_lib.majority_answer(["", ""]) == ""


@pytest.fixture
def qa_records(tmp_path):
  d = str(tmp_path / "qa_records")
  write_records(d, questions=True)  # train 37, validation 13
  return d


def _expected_majorities(n):
  """By hand from ``qa_fixture``: the first answer if 5 or more of 10 gave it (or it is the only one), else yes."""
  out = []
  for i in range(n):
    for j in range(i % 4):
      first, single, k = f"a{(i + j) % 4}", (i + j) % 5 == 0, (i + 3 * j) % 11
      out.append((QA_TYPES[(i + j) % 3], first if single or k >= 5 else "yes"))
  return out


def test_build_answer_vocab_counted(qa_records, tmp_path):
  majorities = _expected_majorities(37)
  counts = collections.Counter(a for _, a in majorities)
  vocab = answers_lib.build_answer_vocab(qa_records, min_count=10)
  assert set(vocab.answers) == {a for a, c in counts.items() if c >= 10}
  assert [counts[a] for a in vocab.answers] == sorted((counts[a] for a in vocab.answers), reverse=True)
  assert vocab.types == QA_TYPES and vocab.meta["num_questions"] == len(majorities)
  assert vocab.meta["type_counts"] == dict(collections.Counter(t for t, _ in majorities))
  for t in QA_TYPES:
    per = collections.Counter(a for k, a in majorities if k == t)
    assert per[vocab.majority[t]] == max(per.values())
  assert vocab.meta["coverage"] == pytest.approx(sum(counts[a] for a in vocab.answers) / len(majorities))
  top = answers_lib.build_answer_vocab(qa_records, min_count=1, top_k=2)
  assert top.answers == answers_lib.build_answer_vocab(qa_records, min_count=1).answers[:2]
  path = answers_lib.default_path(qa_records)
  vocab.save(path)
  assert not [f for f in os.listdir(qa_records) if ".tmp" in f]
  loaded = answers_lib.load_answer_vocab(path, records_dir=qa_records)
  assert loaded.answers == vocab.answers and loaded.types == vocab.types and loaded.majority == vocab.majority
  other = str(tmp_path / "other")
  write_records(other, questions=True, seed=1)
  with pytest.raises(records.DataError, match="built from other records .*fingerprint differs"):
    answers_lib.load_answer_vocab(path, records_dir=other)
  with pytest.raises(records.DataError, match="lower --min_count"):
    answers_lib.build_answer_vocab(qa_records, min_count=1000)
  with pytest.raises(records.DataError, match="no fixed answer vocabulary"):
    answers_lib.build_answer_vocab(qa_records, vocabulary="fixed")


def test_world_vocabulary_is_fixed(qa_records):
  from bigen_jax.worlds.scenes import qa  # pylint: disable=g-import-not-at-top
  manifest = records.read_manifest(qa_records)
  manifest["source"] = {"name": "scenes", "config": "tiny"}
  fileio.write_json_atomic(os.path.join(qa_records, records.MANIFEST_NAME), manifest)
  vocab = answers_lib.build_answer_vocab(qa_records)
  assert vocab.answers == tuple(qa.ANSWERS) and vocab.types == tuple(qa.QUESTION_TYPES)
  assert vocab.meta["vocabulary"] == "fixed" and vocab.meta["min_count"] is None


def test_world_question_types_from_templates():
  from bigen_jax.worlds.scenes import qa, world  # pylint: disable=g-import-not-at-top
  seen = set()
  for i in range(40):
    rng = world.example_rng(0, "train", i)
    scene = world.sample_scene(rng)
    for kind, pairs in qa._candidates(scene, rng).items():  # pylint: disable=protected-access
      for question, _ in pairs:
        assert qa.question_type(question) == kind, question
        seen.add(kind)
  assert seen == set(qa.QUESTION_TYPES)
  with pytest.raises(ValueError, match="not a question of the captioned-scenes world"):
    qa.question_type("what is the meaning of life?")


# ------------------------------------------------------------------------------------------- input pipeline


def _vocab(records_dir, **kw):
  vocab = answers_lib.build_answer_vocab(records_dir, min_count=1, **kw)
  vocab.save(answers_lib.default_path(records_dir))
  return vocab


def _it(records_dir, **kw):
  args = dict(records_dir=records_dir, split="train", global_batch_size=8, seed=0, process_index=0,
              process_count=1, shuffle_buffer=64, questions=True)
  args.update(kw)
  return input_pipeline.create_iterator(**args)


def _take(it, n):
  return [next(it) for _ in range(n)]


# (record, question) -> its answers' soft scores, by hand from qa_fixture's answers: e.g. (7, 0) has a3 from 7 of
# 10 annotators (1.0) and yes from 3 (0.9); (5, 0) one answer (one-hot).
HAND_TARGETS = {(1, 0): {"a1": 0.3, "yes": 1.0}, (5, 0): {"a1": 1.0}, (6, 1): {"a3": 1.0, "yes": 0.3},
                (7, 0): {"a3": 1.0, "yes": 0.9}, (7, 2): {"a1": 0.6, "yes": 1.0}}


def _nonzero(vocab, target):
  return {vocab.answers[k]: round(float(v), 5) for k, v in enumerate(target) if v}


def _check_rows(batch, vocab):
  """Every row's question fields against ``qa_fixture`` of its record (and ``HAND_TARGETS``)."""
  types = {t: i for i, t in enumerate(vocab.types)}
  for r, (i, q) in enumerate(zip(batch["index"], batch["question_index"])):
    rows = qa_fixture(int(i))
    if not rows:
      assert q == -1 and batch["question_type"][r] == -1 and not batch["question_mask"][r].any()
      assert not batch["answer_target"][r].any() and (batch["question_ids"][r] == 0).all()
      continue
    ids, _, kind, given = rows[q]
    np.testing.assert_array_equal(batch["question_ids"][r], ids + [0] * (6 - len(ids)))
    np.testing.assert_array_equal(batch["question_mask"][r], [1] * len(ids) + [0] * (6 - len(ids)))
    assert batch["question_type"][r] == types[kind]
    np.testing.assert_allclose(batch["answer_target"][r], vocab.soft_target(given), rtol=1e-6)
    if (int(i), int(q)) in HAND_TARGETS:
      assert _nonzero(vocab, batch["answer_target"][r]) == HAND_TARGETS[int(i), int(q)]


def test_train_batches_carry_one_question(qa_records):
  vocab = _vocab(qa_records)
  it = _it(qa_records)
  batch = next(it)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items() if k.startswith(("question", "answer"))}
  assert shapes == {"question_ids": ((8, 6), np.int32), "question_mask": ((8, 6), np.int32),
                    "answer_target": ((8, vocab.num_answers), np.float32), "question_type": ((8,), np.int32),
                    "question_index": ((8,), np.int32)}
  assert {"text_ids", "text_mask", "dense", "boxes", "index", "caption_index"} <= set(batch)
  seen = collections.defaultdict(set)
  for b in [batch] + [next(it) for _ in range(23)]:  # 6 epochs
    _check_rows(b, vocab)
    for i, q in zip(b["index"], b["question_index"]):
      seen[int(i)].add(int(q))
  assert all(s == {-1} for i, s in seen.items() if i % 4 == 0)
  assert all(max(s) < i % 4 for i, s in seen.items() if i % 4)
  assert any(len(s) == 3 for i, s in seen.items() if i % 4 == 3)  # drawn, not always the first
  for (i, j), want in HAND_TARGETS.items():
    assert _nonzero(vocab, vocab.soft_target(qa_fixture(i)[j][3])) == want


def test_question_draws_are_deterministic_and_resume(qa_records):
  _vocab(qa_records)
  reference, again = _take(_it(qa_records), 7), _take(_it(qa_records), 7)
  for a, b in zip(reference, again):
    np.testing.assert_array_equal(a["question_index"], b["question_index"])
  it = _it(qa_records)
  _take(it, 5)
  resumed = _it(qa_records)
  resumed.set_state(it.get_state())
  for want, got in zip(again[5:], _take(resumed, 2)):
    for k in ("index", "question_index", "question_ids", "answer_target", "text_ids"):
      np.testing.assert_array_equal(want[k], got[k])
  def picks(batches):  # record -> its question in the first epoch
    return {int(i): int(q) for b in batches[:4] for i, q in zip(b["index"], b["question_index"])}

  first, other = picks(again), picks(_take(_it(qa_records, seed=1), 4))
  both = [i for i in first if i in other and i % 4 > 1]  # records with 2 or 3 questions under both seeds
  assert len(both) > 5 and any(first[i] != other[i] for i in both)  # another seed draws other questions


def test_eval_batches_first_question_and_padding(qa_records):
  vocab = _vocab(qa_records)
  batches = list(_it(qa_records, split="validation", train=False, global_batch_size=8))
  assert len(batches) == 2
  last = batches[-1]
  assert list(last["valid"]) == [True] * 5 + [False] * 3
  assert (last["question_type"][5:] == -1).all() and (last["question_index"][5:] == -1).all()
  for b in batches:
    assert ((b["question_index"] == 0) | (b["question_index"] == -1)).all()
    _check_rows({k: v[b["valid"]] for k, v in b.items()}, vocab)


def test_questions_need_records_and_vocabulary(records_dir, qa_records):
  with pytest.raises(records.DataError, match="manifest.json says its records hold no questions"):
    _it(records_dir)
  with pytest.raises(records.DataError, match="no answer vocabulary .*answers.json: build it with tools/build_answers"):
    _it(qa_records)
  _vocab(qa_records)
  assert "question_ids" not in next(_it(qa_records, questions=False))


# --------------------------------------------------------------------------------- every-question evaluation


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_iterator_covers_every_question_once(qa_records, count):
  vocab = _vocab(qa_records)
  total = sum(i % 4 for i in range(13))
  its = [qa_pipeline.QuestionEvalIterator(records_dir=qa_records, split="validation", global_batch_size=3 * count,
                                          process_index=p, process_count=count) for p in range(count)]
  assert its[0].num_questions == total and len({len(it) for it in its}) == 1
  pairs = []
  for it in its:
    batches = list(it)
    assert len(batches) == len(it) == -(-total // (3 * count))
    for b in batches:
      assert b["question_ids"].shape == (3, 6) and b["answer_target"].shape == (3, vocab.num_answers)
      assert b["answers"].shape == (3, QA_MAX_ANSWERS) and b["dense"].shape == (3, 64, 8)
      assert (b["question_type"][~b["valid"]] == -1).all()
      real = {k: v[b["valid"]] for k, v in b.items()}
      _check_rows(real, vocab)
      for i, q, text in zip(real["index"], real["question_index"], real["questions"]):
        assert text.decode() == qa_fixture(int(i))[q][1]
      pairs += [(int(i), int(q)) for i, q in zip(real["index"], real["question_index"])]
  want = [(i, j) for i in range(13) for j in range(i % 4)]
  assert sorted(pairs) == want and len(pairs) == len(want)
  if count == 1:
    assert pairs == want  # file order, each record's questions in order


def test_eval_iterator_first_records_and_errors(qa_records):
  _vocab(qa_records)
  it = qa_pipeline.QuestionEvalIterator(records_dir=qa_records, split="train", global_batch_size=4,
                                        process_index=0, process_count=1, num_examples=7)
  pairs = [(int(i), int(q)) for b in it for i, q, v in zip(b["index"], b["question_index"], b["valid"]) if v]
  assert pairs == [(i, j) for i in range(7) for j in range(i % 4)]
  manifest = records.read_manifest(qa_records)
  manifest["splits"]["validation"]["shards"][0]["num_questions"] += 4  # the manifest promises more
  fileio.write_json_atomic(os.path.join(qa_records, records.MANIFEST_NAME), manifest)
  with pytest.raises(records.DataError, match="gave process 0 .* questions, .* expected"):
    list(qa_pipeline.QuestionEvalIterator(records_dir=qa_records, split="validation", global_batch_size=4,
                                          process_index=0, process_count=1))
