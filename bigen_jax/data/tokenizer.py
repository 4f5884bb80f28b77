"""Caption tokenizer: BERT WordPiece (uncased) from a ``vocab.txt``, or trained offline on the captions.

Captions become ``[CLS] w1 .. wn [SEP] [PAD] ..`` rows of length L = 17 (the paper's caption length).
A vocabulary that fails to load never falls back silently: its size and special tokens are checked.
"""

import os
import tempfile
from typing import Iterable, Sequence

from etils import epath
import numpy as np

from bigen_jax import fileio
from bigen_jax.data.records import DataError

MAX_LEN = 17
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_UNCASED_VOCAB_SIZE = 30522


def _offline():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _read_vocab(vocab_path: str) -> list[str]:
  """The tokens of ``vocab_path``, one a line (local or a URL: epath)."""
  path = epath.Path(vocab_path)
  if not path.exists() or path.is_dir():
    raise DataError(f"tokenizer vocabulary {vocab_path} does not exist")
  lines = path.read_text(encoding="utf-8").split("\n")
  tokens = [line.rstrip() for line in (lines[:-1] if lines[-1] == "" else lines)]
  missing = [t for t in SPECIAL_TOKENS if t not in tokens]
  if missing:
    raise DataError(f"tokenizer vocabulary {vocab_path} lacks special token(s) {missing}")
  return tokens


class CaptionTokenizer:
  """Encodes captions to fixed-length id rows and decodes them back; wraps the (Rust-backed) ``BertTokenizer``."""

  def __init__(self, vocab_path: str, *, expected_vocab_size: int | None = None):
    _offline()
    from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top
    tokens = _read_vocab(vocab_path)
    if expected_vocab_size is not None and len(tokens) != expected_vocab_size:
      raise DataError(f"tokenizer vocabulary {vocab_path} has {len(tokens)} tokens, "
                      f"expected {expected_vocab_size}")
    self.vocab_path = vocab_path
    # The tokens, not the path: the file may be a URL, which the Rust tokenizer cannot open.
    self._tok = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    if len(self._tok) != len(tokens):
      raise DataError(f"tokenizer built from {vocab_path} has {len(self._tok)} tokens but the file has "
                      f"{len(tokens)} lines (duplicate or malformed entries?)")
    ids = self._tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids

  @property
  def vocab_size(self) -> int:
    return len(self._tok)

  def encode(self, texts: Sequence[str], max_len: int = MAX_LEN) -> np.ndarray:
    """Captions → int32 [N, max_len] ids, truncated so that [SEP] always ends the caption."""
    if not texts:
      return np.zeros((0, max_len), np.int32)
    out = self._tok(list(texts), max_length=max_len, padding="max_length", truncation=True,
                    return_tensors="np")
    return out["input_ids"].astype(np.int32)

  def tokenize(self, text: str) -> list[str]:
    return self._tok.tokenize(text)

  def decode(self, ids: np.ndarray) -> list[str]:
    """int [N, L] (or [L]) ids → captions; reading stops at the first [SEP] or [PAD]."""
    ids = np.asarray(ids)
    rows = ids[None] if ids.ndim == 1 else ids
    texts = []
    for row in rows:
      row = [int(i) for i in row]
      if row and row[0] == self.cls_id:
        row = row[1:]
      kept = []
      for i in row:
        if i in (self.sep_id, self.pad_id):
          break
        kept.append(i)
      texts.append(self._tok.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=True))
    return texts


def load_tokenizer(vocab_path: str, *, expected_vocab_size: int | None = None) -> CaptionTokenizer:
  return CaptionTokenizer(vocab_path, expected_vocab_size=expected_vocab_size)


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, out_dir: str, min_frequency: int = 1) -> str:
  """Trains an uncased WordPiece vocabulary on ``texts`` offline; returns the path of ``vocab.txt``."""
  from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  tok = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
  tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                          special_tokens=list(SPECIAL_TOKENS))
  path = os.path.join(out_dir, "vocab.txt")
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp_dir, open(tok.save_model(tmp_dir)[0], "rb") as f:
    fileio.write_atomic(path, f.read())
  return path
