"""CIDEr-D: the vectorised ``CiderD`` equals pycocoevalcap's ``Cider`` on English, captioned-scenes and random
corpora (with edge cases); the jitted id form equals the dict form; precomputed document frequencies from a
separate corpus equal a direct dictionary computation."""

import collections
import math

import jax
import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from bigen_jax.worlds.scenes import world as scenes
from bigen_jax.eval import cider

ENGLISH = {
    "391895": (["a man with a red helmet on a small moped on a dirt road",
                "man riding a motor bike on a dirt road on the countryside",
                "a man riding on the back of a motorcycle",
                "a dirt path with a young person on a motor bike rests to the foreground of a verdant area",
                "a man in a red shirt and a red hat is on a motorcycle on a hill side"],
               "a man riding a motorcycle on a dirt road"),
    "522418": (["a woman wearing a net on her head cutting a cake",
                "a woman cutting a large white sheet cake",
                "a woman wearing a hair net cutting a large sheet cake",
                "there is a woman that is cutting a white cake",
                "a woman marking a cake with the back of a chefs knife"],
               "a woman cutting a cake with a knife"),
    "184613": (["a child holding a flowered umbrella and petting a yak",
                "a young man holding an umbrella next to a herd of cattle",
                "a young boy barefoot holding an umbrella touching the horn of a cow",
                "a young boy with an umbrella who is touching the horn of a cow",
                "a boy holding an umbrella while standing next to livestock"],
               "a boy holding an umbrella next to a cow"),
    "318219": (["a young boy standing in front of a computer keyboard",
                "a little boy wearing headphones and looking at a computer monitor",
                "he is listening intently to the computer at school",
                "a young boy stares up at the computer monitor",
                "a young kid with head phones on using a computer"],
               "a little boy sitting in front of a computer"),
    "554625": (["a boy wearing headphones using one computer in a long row of computers",
                "a little boy with earphones on listening to something",
                "a group of people sitting at desk using computers",
                "children sitting at computer stations on a long table",
                "a small child wearing headphones plays on the computer"],
               "a group of children using computers at a table"),
    "397133": (["a man is in a kitchen making pizzas",
                "man in apron standing on front of oven with pans and bakeware",
                "a baker is working in the kitchen rolling dough",
                "a person standing by a stove in a kitchen",
                "a table with pies being made and a person standing near a wall with pots and pans hanging on it"],
               "a man standing in a kitchen with a pizza"),
}


def _assert_matches_pycocoevalcap(gts, res, **kw):
  want, want_each = Cider(**kw).compute_score(gts, res)
  got, got_each = cider.CiderD(**kw).compute_score(gts, res)
  assert isinstance(got, float) and got_each.shape == (len(gts),)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
  np.testing.assert_allclose(got_each, want_each, rtol=0, atol=1e-9)


def _random_corpus(seed, *, images=30, vocab=9):
  """Random words, references 1..15 words (1..7 per image, some duplicated), candidates 0..15 words."""
  rng = np.random.default_rng(seed)
  words = [f"w{i}" for i in range(vocab)]
  gts, res = {}, {}
  for i in range(images):
    refs = [" ".join(rng.choice(words, rng.integers(1, 16))) for _ in range(rng.integers(1, 8))]
    if rng.random() < 0.2:
      refs.append(refs[0])
    gts[i] = refs
    res[i] = [" ".join(rng.choice(words + ["unseen", "novel"], rng.integers(0, 16)))]
  return gts, res


def test_english_captions():
  gts = {k: refs for k, (refs, _) in ENGLISH.items()}
  res = {k: [cand] for k, (_, cand) in ENGLISH.items()}
  _assert_matches_pycocoevalcap(gts, res)
  swapped = dict(zip(res, list(res.values())[1:] + list(res.values())[:1]))  # another image's caption
  _assert_matches_pycocoevalcap(gts, swapped)


def test_scenes_captions():
  examples = [scenes.make_example(i, split="validation") for i in range(30)]
  gts = {ex["image_id"]: ex["captions"][1:] for ex in examples}
  res = {ex["image_id"]: [ex["captions"][0] if i % 2 else examples[(i + 7) % 30]["captions"][0]]
         for i, ex in enumerate(examples)}
  _assert_matches_pycocoevalcap(gts, res)


@pytest.mark.parametrize("seed", range(4))
def test_random_corpora(seed):
  _assert_matches_pycocoevalcap(*_random_corpus(seed))


def test_other_n_sigma_and_edge_cases():
  gts, res = _random_corpus(7, images=12)
  _assert_matches_pycocoevalcap(gts, res, sigma=3.0)
  for n in (2, 5):  # pycocoevalcap's Cider(n=...) ignores n when counting n-grams (and fails for n < 4)
    want = _direct_cider([res[k][0] for k in gts], list(gts.values()), list(gts.values()), n=n)
    np.testing.assert_allclose(cider.CiderD(n=n).compute_score(gts, res)[1], want, rtol=0, atol=1e-9)
  gts.update({"ws": [" a  b\tc ", "a b"], "nul": ["a \0 b", "b c"], "dup": ["x y", "x y", "x y"]})
  res.update({"ws": ["a b\nc"], "nul": ["\0 b"], "dup": ["x y"]})  # odd whitespace, NUL words, duplicates
  _assert_matches_pycocoevalcap(gts, res)
  _assert_matches_pycocoevalcap({1: ["a b c"]}, {1: ["a b"]})  # one image: every idf is log(1) = 0
  with pytest.raises(ValueError):
    cider.CiderD().compute_score({1: ["a"]}, {2: ["a"]})


def _ids(sentences, vocab, length):
  """Sentences → int32 [N, length], word i+1 per vocab index, 0-padded."""
  out = np.zeros((len(sentences), length), np.int32)
  for row, s in zip(out, sentences):
    row[:len(s.split())] = [vocab[w] for w in s.split()]
  return out


def _id_batch(gts, res, vocab, length=16, refs=8):
  keys = list(gts)
  cands = _ids([res[k][0] for k in keys], vocab, length)
  references = np.stack([_ids(gts[k] + [""] * (refs - len(gts[k])), vocab, length) for k in keys])
  return cands, references


@pytest.mark.parametrize("seed", range(2))
def test_ids_form_equals_dict_form(seed):
  gts, res = _random_corpus(seed)
  vocab = {w: i + 1 for i, w in enumerate(sorted({w for v in [*gts.values(), *res.values()] for s in v
                                                   for w in s.split()}))}
  cands, references = _id_batch(gts, res, vocab)
  table = cider.cider_table(cider.document_frequencies_from_ids(list(references), pad_id=0))
  _, want = cider.CiderD().compute_score(gts, res)
  # The same candidates again, each followed by an end id and junk, which must be ignored.
  end = len(vocab) + 1
  lengths = (cands > 0).sum(1)
  junk = np.where(np.arange(cands.shape[1]) > lengths[:, None], 3, cands)
  junk[np.arange(len(cands)), lengths] = end
  mask = (references > 0).any(-1)
  score = jax.jit(lambda c, r, t, m: cider.cider_d_ids(c, r, t, pad_id=0, end_id=end, ref_mask=m))
  got = score(np.concatenate([cands, junk]), np.concatenate([references] * 2), table, np.concatenate([mask] * 2))
  np.testing.assert_allclose(got, np.concatenate([want] * 2), rtol=1e-6, atol=1e-6)


def test_ids_form_float64_with_large_ids():
  """Token ids near 2**30 make the packed int64 keys overflow, so the (k-1)-gram keys get dense codes."""
  gts, res = _random_corpus(11, vocab=20)
  words = sorted({w for v in [*gts.values(), *res.values()] for s in v for w in s.split()})
  vocab = {w: 2**30 - 7 * i for i, w in enumerate(words)}
  _, want = cider.CiderD().compute_score(gts, res)
  with jax.enable_x64(True):
    cands, references = _id_batch(gts, res, vocab)
    table = cider.cider_table(cider.document_frequencies_from_ids(list(references), pad_id=0), dtype=np.float64)
    got = jax.jit(lambda c, r, t: cider.cider_d_ids(c, r, t, pad_id=0))(cands, references, table)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def _direct_cider(cands, refs, df_corpus, n=4, sigma=6.0):
  """CIDEr-D with document frequencies from ``df_corpus``, straight from the definition with dictionaries."""
  def grams(sentence):
    words = sentence.split()
    return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

  df = collections.Counter(g for doc in df_corpus for g in set().union(*(grams(r) for r in doc)))
  log_docs = math.log(len(df_corpus))

  def vector(sentence):
    vec = {g: tf * (log_docs - math.log(max(1, df[g]))) for g, tf in grams(sentence).items()}
    norms = [math.sqrt(sum(v * v for g, v in vec.items() if len(g) == k)) for k in range(1, n + 1)]
    return vec, norms, max(len(sentence.split()) - 1, 0)

  scores = []
  for cand, image_refs in zip(cands, refs):
    c_vec, c_norm, c_len = vector(cand)
    total = 0.0
    for ref in image_refs:
      r_vec, r_norm, r_len = vector(ref)
      for k in range(1, n + 1):
        dot = sum(min(v, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, v in c_vec.items() if len(g) == k)
        if c_norm[k - 1] and r_norm[k - 1]:
          dot /= c_norm[k - 1] * r_norm[k - 1]
        total += dot * math.exp(-(c_len - r_len)**2 / (2 * sigma**2)) / n
    scores.append(10.0 * total / len(image_refs))
  return np.array(scores)


def test_precomputed_document_frequencies():
  gts, res = _random_corpus(3, images=20)
  df_corpus = list(_random_corpus(4, images=50)[0].values()) + [[" ".join(gts[0][0].split()[:3])]]
  df = cider.document_frequencies(df_corpus)
  _, got = cider.CiderD(df=df).compute_score(gts, res)
  want = _direct_cider([res[k][0] for k in gts], list(gts.values()), df_corpus)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
  # With the scored references as the separate corpus, it is plain CIDEr-D.
  _, plain = Cider().compute_score(gts, res)
  np.testing.assert_allclose(cider.CiderD(df=cider.document_frequencies(list(gts.values()))).compute_score(
      gts, res)[1], plain, rtol=0, atol=1e-9)
  # The jitted form with a table from the same separate corpus (word ids, so one id per word).
  vocab = {w: i + 1 for i, w in enumerate(df.vocab)}
  vocab.update({w: len(vocab) + 1 + i for i, w in enumerate(sorted(
      {w for v in [*gts.values(), *res.values()] for s in v for w in s.split()} - set(vocab)))})
  table = cider.cider_table(cider.document_frequencies_from_ids([list(_ids(d, vocab, 16)) for d in df_corpus],
                                                                pad_id=0))
  cands, references = _id_batch(gts, res, vocab)
  np.testing.assert_allclose(jax.jit(lambda c, r, t: cider.cider_d_ids(c, r, t, pad_id=0))(
      cands, references, table), want, rtol=1e-6, atol=1e-6)
