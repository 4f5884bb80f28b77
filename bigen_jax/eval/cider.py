"""CIDEr-D exactly as ``pycocoevalcap`` computes it, vectorised with numpy, and a jittable form over token ids.

The definition (``pycocoevalcap/cider/cider_scorer.py``), for n-gram orders k = 1..n (n = 4):

* a document is the reference set of one image; df(g) = number of documents containing the n-gram g, from
  the references of the scored corpus (or of a separate reference corpus, ``DocumentFrequencies``);
* a sentence's vector for order k holds tf(g) * (log(num_docs) - log(max(1, df(g)))) for each k-gram g;
* per reference r of an image: val_k = sum_g min(c_g, r_g) * r_g / (|c_k| |r_k|) (left unnormalised when a
  norm is 0, where the sum is 0 too), times exp(-delta^2 / (2 sigma^2)); delta is the difference of the
  sentences' "lengths", which pycocoevalcap counts as their numbers of bigrams (max(words - 1, 0));
* score = 10 * mean over k of the sum over references of val_k / number of references.

N-grams never go through a hash, so nothing can collide. numpy packs a k-gram's token ids exactly into an
int64 key (key_{k-1} * base + last token), replacing the (k-1)-gram keys by dense codes first when the
packing could overflow, and sorts the occurrences by (key, sentence): one sort per order gives the distinct
k-grams, their counts per sentence and their document frequencies. Distinct k-grams are also kept as a trie
(index of their (k-1)-gram prefix, last token), which is how ``DocumentFrequencies`` stores a reference
corpus. The jitted form looks n-grams up in that trie with a lexicographic binary search over int32 pairs
(no x64 needed) and finds term frequencies by comparing the token ids at positions directly.
"""

import dataclasses
import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DocumentFrequencies:
  """Document frequencies of the n-grams of a reference corpus (a document = the references of one image).

  prefix[k - 1], last[k - 1]: int64 [G_k], the distinct k-grams as (index of their (k-1)-gram prefix in
  order k - 1, 0 for unigrams; last token id), sorted lexicographically. df[k - 1]: int64 [G_k], documents
  containing each. num_docs: documents. vocab: word -> token id when built from strings, else None.
  """
  prefix: tuple[np.ndarray, ...]
  last: tuple[np.ndarray, ...]
  df: tuple[np.ndarray, ...]
  num_docs: int
  vocab: dict[str, int] | None = None

  @property
  def n(self) -> int:
    return len(self.df)


class CiderTable(NamedTuple):
  """``DocumentFrequencies`` as device arrays for ``cider_d_ids`` (a pytree; pass it as a jit argument).

  prefix, last: int32 [G_k] per order (the trie, sorted); idf: float [G_k], log(num_docs) - log(max(1, df));
  log_num_docs: float [], the idf of an n-gram absent from the corpus. The float dtype is the computation's.
  """
  prefix: tuple[jax.Array, ...]
  last: tuple[jax.Array, ...]
  idf: tuple[jax.Array, ...]
  log_num_docs: jax.Array


class _WordIds(dict):
  """word -> id, giving an unseen word the next free id ``next_id``."""
  next_id: int

  def __missing__(self, word: str) -> int:
    self[word] = self.next_id
    self.next_id += 1
    return self.next_id - 1


def _tokenize(sentences: Sequence[str], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """Whitespace-split ``sentences`` → token ids int64 [T], lengths int64 [S] and ``vocab`` (word -> id, ids
  0..V-1) extended with the unseen words.

  One ``str.split`` of the sentences joined by a NUL word, several times faster than one split per
  sentence (used instead when a sentence holds a NUL).
  """
  ids = _WordIds(vocab)
  ids.next_id = len(vocab)
  joined = " \0 ".join(sentences)
  if joined.count("\0") != max(len(sentences) - 1, 0):
    split = [s.split() for s in sentences]
    tokens = np.fromiter(map(ids.__getitem__, itertools.chain.from_iterable(split)), np.int64)
    return tokens, np.fromiter(map(len, split), np.int64, len(split)), dict(ids)
  words = joined.split()
  ids["\0"] = -1  # the separator
  tokens = np.fromiter(map(ids.__getitem__, words), np.int64, len(words))
  del ids["\0"]
  if "\0" in vocab:
    ids["\0"] = vocab["\0"]
  if not sentences:
    return tokens, np.zeros(0, np.int64), dict(ids)
  cuts = np.flatnonzero(tokens < 0)
  return tokens[tokens >= 0], np.diff(np.concatenate([[-1], cuts, [len(tokens)]])) - 1, dict(ids)


class _Order(NamedTuple):
  """The k-grams of a corpus of sentences for one order k.

  sentence, gram, count: int64 [E], the distinct (k-gram, sentence) pairs, sorted by gram then sentence,
  and the k-gram's count in the sentence. keys: int64 [G_k], the sorted distinct k-gram keys
  (prefix key * base + last token), parents: int64 [G_{k-1}], the sorted distinct prefix keys.
  """
  sentence: np.ndarray
  gram: np.ndarray
  count: np.ndarray
  keys: np.ndarray
  parents: np.ndarray
  base: int

  def trie(self) -> tuple[np.ndarray, np.ndarray]:
    """(prefix, last) int64 [G_k]: each k-gram's (k-1)-gram index and last token, sorted."""
    return np.searchsorted(self.parents, self.keys // self.base), self.keys % self.base


def _changes(x: np.ndarray) -> np.ndarray:
  """bool [N]: x[i] differs from x[i - 1] (True at 0)."""
  out = np.ones(len(x), bool)
  np.not_equal(x[1:], x[:-1], out=out[1:])
  return out


def _ngrams(tokens: np.ndarray, lengths: np.ndarray, n: int) -> list[_Order]:
  """The 1..n-grams of sentences (tokens int64 [T] concatenated, lengths int64 [S]), one sort per order.

  A k-gram's int64 key packs its tokens exactly (key_{k-1} * base + last token, base = max token id + 1);
  when that could overflow, the (k-1)-gram keys are first replaced by their dense codes. Sorting the
  occurrences by (key, sentence) gives the distinct k-grams and their per-sentence counts at once.
  """
  num_tokens, num_sentences = len(tokens), max(len(lengths), 1)
  base = int(tokens.max()) + 1 if num_tokens else 1
  if num_tokens * base * num_sentences >= 2**63:
    raise ValueError("corpus too large for int64 n-gram keys; score it in parts")
  sentence = np.repeat(np.arange(len(lengths)), lengths)
  room = np.repeat(np.cumsum(lengths), lengths) - np.arange(num_tokens)  # tokens left in the sentence
  key = np.zeros(num_tokens, np.int64)  # the (k-1)-gram at each position (garbage where there is none)
  space = np.zeros(1, np.int64)  # the distinct (k-1)-gram keys, sorted: their trie indices
  out, code = [], None
  for k in range(1, n + 1):
    if (int(key.max(initial=0)) + 1) * base * num_sentences >= 2**63:
      key = np.zeros(len(key), np.int64)
      key[code[0]] = code[1]
      space = np.arange(len(space))
    size = max(num_tokens - k + 1, 0)
    key = key[:size] * base + tokens[k - 1:]
    sort_key = key * num_sentences + sentence[:size]
    valid = room[:size] >= k
    sort_key[~valid] = np.iinfo(np.int64).max
    order = np.argsort(sort_key)[:np.count_nonzero(valid)]
    gram_key, gram_sentence = key[order], sentence[order]
    new_gram = _changes(gram_key)
    code = order, np.cumsum(new_gram) - 1  # positions and dense codes of the sorted occurrences
    first = np.flatnonzero(new_gram | _changes(gram_sentence))
    distinct = gram_key[new_gram]
    out.append(_Order(gram_sentence[first], code[1][first], np.diff(np.append(first, len(order))), distinct,
                      space, base))
    space = distinct
  return out


def _doc_freq(order: _Order, doc: np.ndarray) -> np.ndarray:
  """int64 [G_k]: documents containing each k-gram; doc int64 [E] of each entry of ``order`` (already
  sorted by gram then document, as documents are runs of sentences)."""
  first = _changes(order.gram) | _changes(doc)
  return np.bincount(order.gram[first], minlength=len(order.keys))


def _split_docs(references: Sequence[Sequence]) -> tuple[list, np.ndarray]:
  """Flat list of reference sentences and the document (image) index int64 [S] of each."""
  counts = np.fromiter(map(len, references), np.int64, len(references))
  return list(itertools.chain.from_iterable(references)), np.repeat(np.arange(len(references)), counts)


def _document_frequencies(tokens, lengths, doc, num_docs: int, n: int, vocab=None) -> DocumentFrequencies:
  """Builds ``DocumentFrequencies`` from tokenised sentences and their document indices doc int64 [S]."""
  orders = _ngrams(tokens, lengths, n)
  prefix, last = zip(*(o.trie() for o in orders))
  return DocumentFrequencies(prefix, last, tuple(_doc_freq(o, doc[o.sentence]) for o in orders), num_docs, vocab)


def document_frequencies(references: Sequence[Sequence[str]], *, n: int = 4) -> DocumentFrequencies:
  """Document frequencies of a corpus of tokenised (space-separated) reference captions, one list per image."""
  sentences, doc = _split_docs(references)
  tokens, lengths, vocab = _tokenize(sentences, {})
  return _document_frequencies(tokens, lengths, doc, len(references), n, vocab)


def _cut(ids, pad_id: int | None, end_id: int | None) -> np.ndarray:
  """An id sequence up to (excluding) its first ``pad_id`` or ``end_id``."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  stop = np.isin(ids, [i for i in (pad_id, end_id) if i is not None])
  return ids[:np.argmax(stop)] if stop.any() else ids


def document_frequencies_from_ids(references: Sequence[Sequence[Sequence[int]]], *, n: int = 4,
                                  pad_id: int | None = None, end_id: int | None = None) -> DocumentFrequencies:
  """Document frequencies of a corpus of token-id references (one list, or [R, L] array, per image); each
  sequence is read up to its first ``pad_id`` / ``end_id`` when given."""
  sentences, doc = _split_docs(references)
  seqs = [_cut(s, pad_id, end_id) for s in sentences]
  lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
  tokens = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
  if len(tokens) and tokens.min() < 0:
    raise ValueError("token ids must be non-negative")
  return _document_frequencies(tokens, lengths, doc, len(references), n)


def _lookup_df(df: DocumentFrequencies, orders: list[_Order]) -> list[np.ndarray]:
  """Document frequency int64 [G_k] in ``df`` of each distinct k-gram of a corpus (0 where absent)."""
  out = []
  mapped = np.zeros(1, np.int64)  # the corpus trie's nodes in df's trie (-1: absent); the root is 0 in both
  for k, o in enumerate(orders):
    prefix, last = o.trie()
    base = int(max(last.max(initial=0), df.last[k].max(initial=0))) + 1
    table = np.append(df.prefix[k] * base + df.last[k], np.iinfo(np.int64).max)
    parent = mapped[prefix]
    keys = np.where(parent >= 0, parent * base + last, -1)
    idx = np.searchsorted(table, keys)
    found = table[idx] == keys
    mapped = np.where(found, idx, -1)
    out.append(np.where(found, np.append(df.df[k], 0)[idx], 0))
  return out


def _bigrams(lengths: np.ndarray, n: int) -> np.ndarray:
  """pycocoevalcap's sentence "length": its number of bigrams (0 when n < 2)."""
  return np.maximum(lengths - 1, 0) if n >= 2 else np.zeros_like(lengths)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0,
            df: DocumentFrequencies | None = None) -> np.ndarray:
  """CIDEr-D float64 [N] of candidate i (tokenised string) against references[i] (non-empty list).

  Document frequencies come from ``references`` (pycocoevalcap) unless ``df`` is given.
  """
  if df is not None and (df.vocab is None or df.n < n):
    raise ValueError(f"df must be built from strings (document_frequencies) with n >= {n}")
  num = len(candidates)
  num_refs = np.fromiter(map(len, references), np.int64, num)
  # Sentences image by image, each candidate before its references: within a run of equal k-grams (sorted
  # by sentence) an image's entries are then contiguous with the candidate's first.
  sentences = list(itertools.chain.from_iterable([c, *r] for c, r in zip(candidates, references)))
  tokens, lengths, _ = _tokenize(sentences, {} if df is None else df.vocab)
  image = np.repeat(np.arange(num), num_refs + 1)  # [S]
  cand_sentence = np.cumsum(num_refs + 1) - num_refs - 1  # [N]
  is_cand = np.zeros(len(sentences), bool)
  is_cand[cand_sentence] = True
  ref_sentence = np.flatnonzero(~is_cand)  # [R_total], image-major
  ref_image = image[ref_sentence]
  orders = _ngrams(tokens, lengths, n)
  doc_freqs = None if df is None else _lookup_df(df, orders)
  log_num_docs = np.log(float(num if df is None else df.num_docs))
  vals = np.zeros((n, len(ref_sentence)))
  for k, o in enumerate(orders):
    cand = is_cand[o.sentence]
    run_start = _changes(o.gram) | _changes(image[o.sentence])  # first entry of each (k-gram, image)
    if df is None:
      first_ref = ~cand & (run_start | np.append(False, cand[:-1]))
      freq = np.bincount(o.gram, first_ref, minlength=len(o.keys))
    else:
      freq = doc_freqs[k]
    vec = o.count * (log_num_docs - np.log(np.maximum(1.0, freq)))[o.gram]
    norm = np.sqrt(np.bincount(o.sentence, vec**2, minlength=len(sentences)))
    start = np.maximum.accumulate(np.where(run_start, np.arange(len(cand)), 0))
    vec_cand = np.where(cand, vec, 0.0)[start]  # the candidate's value for this entry's k-gram
    dot = np.bincount(o.sentence, np.minimum(vec_cand, vec) * vec, minlength=len(sentences))[ref_sentence]
    denom = norm[cand_sentence][ref_image] * norm[ref_sentence]
    vals[k] = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot)
  length = _bigrams(lengths, n)
  delta = (length[cand_sentence][ref_image] - length[ref_sentence]).astype(np.float64)
  per_ref = vals.mean(axis=0) * np.exp(-delta**2 / (2 * sigma**2))
  return 10.0 * np.bincount(ref_image, per_ref, minlength=num) / np.maximum(num_refs, 1)


class CiderD:
  """Drop-in for ``pycocoevalcap.cider.cider.Cider`` (which is CIDEr-D), vectorised.

  ``df``: document frequencies from a separate reference corpus (SCST); default: from the scored references.
  """

  def __init__(self, n: int = 4, sigma: float = 6.0, df: DocumentFrequencies | None = None):
    self._n, self._sigma, self._df = n, sigma, df

  def compute_score(self, gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """gts: image id -> list of tokenised references; res: image id -> [candidate]. Returns (mean score,
    float64 [N] per image in the order of ``gts``)."""
    if gts.keys() != res.keys():
      raise ValueError("gts and res must have the same image ids")
    if not gts:
      raise ValueError("no images to score")
    for key in gts:
      if not isinstance(res[key], list) or len(res[key]) != 1:
        raise ValueError(f"res[{key!r}] must be a list holding one candidate")
      if not isinstance(gts[key], list) or not gts[key]:
        raise ValueError(f"gts[{key!r}] must be a non-empty list of references")
    scores = cider_d([res[key][0] for key in gts], [gts[key] for key in gts], n=self._n, sigma=self._sigma,
                     df=self._df)
    return float(np.mean(scores)), scores

  def method(self) -> str:
    return "CIDEr"


def cider_table(df: DocumentFrequencies, *, dtype=jnp.float32) -> CiderTable:
  """The device form of ``df`` for ``cider_d_ids``, which computes in ``dtype`` (float64 needs x64);
  raises if a token id does not fit int32."""
  limit = np.iinfo(np.int32).max
  for k in range(df.n):
    if len(df.last[k]) > limit or df.last[k].max(initial=0) > limit:
      raise ValueError(f"order-{k + 1} n-grams or token ids do not fit int32")
  log_num_docs = np.log(float(max(df.num_docs, 1)))
  idf = tuple(jnp.asarray(log_num_docs - np.log(np.maximum(1.0, d)), dtype) for d in df.df)
  return CiderTable(tuple(jnp.asarray(p, jnp.int32) for p in df.prefix),
                    tuple(jnp.asarray(w, jnp.int32) for w in df.last), idf, jnp.asarray(log_num_docs, dtype))


def _search(prefix: jax.Array, last: jax.Array, p: jax.Array, w: jax.Array) -> jax.Array:
  """Index of each pair (p, w) in the lexicographically sorted pairs (prefix, last) int32 [G], or -1."""
  size = prefix.shape[0]
  if size == 0:
    return jnp.full(p.shape, -1, jnp.int32)

  def step(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    pm, wm = prefix[jnp.minimum(mid, size - 1)], last[jnp.minimum(mid, size - 1)]
    less = (pm < p) | ((pm == p) & (wm < w))
    active = lo < hi
    return jnp.where(active & less, mid + 1, lo), jnp.where(active & ~less, mid, hi)

  lo, _ = jax.lax.fori_loop(0, size.bit_length(), step, (jnp.zeros(p.shape, jnp.int32),
                                                          jnp.full(p.shape, size, jnp.int32)))
  idx = jnp.minimum(lo, size - 1)
  return jnp.where((lo < size) & (prefix[idx] == p) & (last[idx] == w), lo, -1)


def _lengths(ids: jax.Array, pad_id: int, end_id: int | None) -> jax.Array:
  """Tokens before the first ``pad_id`` / ``end_id`` of each row of ids [..., L] → int32 [...]."""
  stop = ids == pad_id if end_id is None else (ids == pad_id) | (ids == end_id)
  return jnp.where(stop.any(-1), jnp.argmax(stop, -1), ids.shape[-1]).astype(jnp.int32)


def _orders(ids: jax.Array, length: jax.Array, table: CiderTable, n: int):
  """Per order k: (valid bool [..., L], idf [..., L] of the k-gram starting at each position), and the
  token views shifted by 0..n-1 [n][..., L] that the k-grams are made of."""
  size = ids.shape[-1]
  padded = jnp.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, n - 1)])
  shifts = [padded[..., t:t + size] for t in range(n)]
  node = jnp.zeros(ids.shape, jnp.int32)
  out = []
  for k in range(n):
    node = jnp.where(node >= 0, _search(table.prefix[k], table.last[k], node, shifts[k]), -1)
    known = jnp.append(table.idf[k], table.log_num_docs)  # [G_k + 1]: an absent n-gram last (G_k may be 0)
    idf = known[jnp.where(node >= 0, node, known.shape[0] - 1)]
    out.append((jnp.arange(size) + k + 1 <= length[..., None], idf))
  return out, shifts


def _matches(a: list[jax.Array], b: list[jax.Array], k: int) -> jax.Array:
  """bool [..., L, M]: the k-gram at position i of a equals the one at j of b (token views from _orders)."""
  eq = a[0][..., :, None] == b[0][..., None, :]
  for t in range(1, k):
    eq &= a[t][..., :, None] == b[t][..., None, :]
  return eq


def cider_d_ids(candidates: jax.Array, references: jax.Array, table: CiderTable, *, pad_id: int,
                end_id: int | None = None, ref_mask: jax.Array | None = None, sigma: float = 6.0) -> jax.Array:
  """CIDEr-D [B] of candidates int32 [B, L] against references int32 [B, R, L], jittable.

  Each row is read up to its first ``pad_id`` (or ``end_id``). ``ref_mask`` bool [B, R] marks the real
  references (default: non-empty rows; pycocoevalcap counts an empty reference string, so mark it to
  match); the score averages over them. ``table`` (``cider_table``) gives the
  document frequencies, as ``CiderD(df=...)`` with the same corpus; n = len(table.idf); the result has the
  table's float dtype (float32 unless built with float64 under x64).
  """
  n, dtype = len(table.idf), table.log_num_docs.dtype
  cand_len = _lengths(candidates, pad_id, end_id)
  ref_len = _lengths(references, pad_id, end_id)
  mask = ref_len > 0 if ref_mask is None else ref_mask.astype(bool)
  cand, cand_tok = _orders(candidates, cand_len, table, n)
  refs, ref_tok = _orders(references, ref_len, table, n)
  cand_tok_r = [t[:, None] for t in cand_tok]
  vals = []
  for k in range(n):
    (c_valid, c_idf), (r_valid, r_idf) = cand[k], refs[k]
    c_tf = jnp.sum(_matches(cand_tok, cand_tok, k + 1) & c_valid[:, None, :], -1).astype(dtype)
    r_tf = jnp.sum(_matches(ref_tok, ref_tok, k + 1) & r_valid[..., None, :], -1).astype(dtype)
    cr_tf = jnp.sum(_matches(cand_tok_r, ref_tok, k + 1) & r_valid[:, :, None, :], -1).astype(dtype)
    c_norm = jnp.sqrt(jnp.sum(jnp.where(c_valid, c_tf * c_idf**2, 0.0), -1))  # [B]
    r_norm = jnp.sqrt(jnp.sum(jnp.where(r_valid, r_tf * r_idf**2, 0.0), -1))  # [B, R]
    c_vec, cr_vec = (c_tf * c_idf)[:, None], cr_tf * c_idf[:, None]  # [B, 1, L], [B, R, L]
    clipped = jnp.minimum(c_vec, cr_vec) * cr_vec / jnp.maximum(c_tf, 1.0)[:, None]  # / c_tf: once per n-gram
    dot = jnp.sum(jnp.where(c_valid[:, None], clipped, 0.0), -1)
    denom = c_norm[:, None] * r_norm
    vals.append(jnp.where(denom != 0, dot / jnp.where(denom != 0, denom, 1.0), dot))
  delta = (jnp.maximum(cand_len - 1, 0)[:, None] - jnp.maximum(ref_len - 1, 0)) * (n >= 2)
  per_ref = jnp.mean(jnp.stack(vals), 0) * jnp.exp(-delta.astype(dtype)**2 / (2 * sigma**2))
  return 10.0 * jnp.sum(jnp.where(mask, per_ref, 0.0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
