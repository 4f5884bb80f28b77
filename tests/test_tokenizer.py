"""Tokenizer: offline WordPiece training, fixed-length encoding, decoding, and loud failures."""

import numpy as np
import pytest

from bigen_jax.data import tokenizer as tokenizer_lib
from bigen_jax.data.records import DataError

CAPTIONS = [
    "a red circle to the left of a blue square",
    "two green triangles above a small yellow star",
    "there is a large purple diamond",
    "a tiny orange hexagon below three white crosses",
] * 5


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
  return tokenizer_lib.train_wordpiece(CAPTIONS, vocab_size=200,
                                       out_dir=str(tmp_path_factory.mktemp("tok")))


def test_encode_layout_and_round_trip(vocab_path):
  tok = tokenizer_lib.load_tokenizer(vocab_path)
  ids = tok.encode(CAPTIONS[:4])
  assert ids.shape == (4, 17) and ids.dtype == np.int32
  assert (ids[:, 0] == tok.cls_id).all()
  for row, text in zip(ids, CAPTIONS[:4]):
    n = len(tok.tokenize(text))
    assert row[n + 1] == tok.sep_id
    assert (row[n + 2:] == tok.pad_id).all()
  assert tok.decode(ids) == CAPTIONS[:4]
  assert tok.decode(ids[0]) == CAPTIONS[:1]


def test_truncation_keeps_sep(vocab_path):
  tok = tokenizer_lib.load_tokenizer(vocab_path)
  long = " ".join(["red circle"] * 20)
  ids = tok.encode([long])[0]
  assert ids[-1] == tok.sep_id and tok.pad_id not in ids
  assert tok.decode(ids)[0].split() == long.split()[:15]


def test_uppercase_is_lowered(vocab_path):
  tok = tokenizer_lib.load_tokenizer(vocab_path)
  np.testing.assert_array_equal(tok.encode(["A RED Circle"]), tok.encode(["a red circle"]))


def test_unknown_word_maps_to_unk(vocab_path):
  tok = tokenizer_lib.load_tokenizer(vocab_path)
  assert tok.unk_id in tok.encode(["zebra"])[0]


def test_expected_size_mismatch_is_an_error(vocab_path):
  with pytest.raises(DataError, match="30522"):
    tokenizer_lib.load_tokenizer(vocab_path, expected_vocab_size=tokenizer_lib.BERT_UNCASED_VOCAB_SIZE)


def test_missing_or_broken_vocab_is_an_error(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope.txt"))
  bad = tmp_path / "vocab.txt"
  bad.write_text("hello\nworld\n")
  with pytest.raises(DataError, match=r"lacks special token.*\[PAD\]"):
    tokenizer_lib.load_tokenizer(str(bad))
