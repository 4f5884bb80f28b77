"""CLIPScore formulas; R-precision (easy and hard) with oracle, random and constant scorers; hard negatives."""

import numpy as np
import pytest

from bigen_jax.worlds.scenes import world as scenes
from bigen_jax.eval import clip_score
from bigen_jax.eval import r_precision

CAPTIONS = ("A man riding a red bicycle down the street.", "two dogs sitting on a white couch",
            "An elephant standing next to three trees", "a woman holding an orange umbrella",
            "Three zebras eating grass near a tree", "a cat laying on a bed", "the sky is blue")


def test_clip_scores_match_manual_cosines():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  txt[0] = -img[0]  # cosine -1: clipped to 0
  manual = np.array([np.dot(i, t) / np.sqrt(np.dot(i, i) * np.dot(t, t)) for i, t in zip(img, txt)])
  np.testing.assert_allclose(clip_score.clip_score(img, txt), 100 * np.maximum(manual, 0), rtol=1e-12)
  np.testing.assert_allclose(clip_score.captioning_clip_score(img * 3.0, txt), 2.5 * np.maximum(manual, 0),
                             rtol=1e-12)
  assert clip_score.clip_score(img, txt)[0] == 0 and clip_score.clip_score(img[:1], 7 * img[:1])[0] == 100
  with pytest.raises(ValueError, match="aligned"):
    clip_score.clip_score(img, txt[:3])


def _oracle(truth):
  """An aligned-pair scorer knowing each image's true caption (images are indices into ``truth``)."""
  return lambda images, captions: np.array([float(truth[i] == c) for i, c in zip(images, captions)])


def test_easy_oracle_random_and_constant_scorers():
  n, k = 300, 9
  captions = [f"caption number {i}" for i in range(n)]
  images = np.arange(n)
  calls = []

  def checking_oracle(images, candidates):
    calls.append(1)
    assert len(set(images)) == 1 and len(candidates) == k + 1 and len(set(candidates)) == k + 1
    return _oracle(captions)(images, candidates)
  assert r_precision.easy(images, captions, checking_oracle, num_negatives=k).overall == 1.0
  assert len(calls) == n
  rng = np.random.default_rng(0)
  random = r_precision.easy(images, captions, lambda i, c: rng.uniform(size=len(c)), num_negatives=k)
  assert abs(random.overall - 1 / (k + 1)) < 0.06
  constant = lambda i, c: np.zeros(len(c))  # noqa: E731
  assert r_precision.easy(images, captions, constant, num_negatives=k).overall == 0.0
  tied = r_precision.easy(images, captions, constant, num_negatives=k, ties="random").overall
  assert abs(tied - 1 / (k + 1)) < 0.06
  with pytest.raises(ValueError, match="distinct captions"):
    r_precision.easy(images[:5], captions[:5], constant)


def test_easy_negatives_exclude_duplicates_of_the_true_caption():
  captions = ["same"] * 3 + [f"other {i}" for i in range(10)]
  seen = []

  def record(images, candidates):
    seen.append((candidates[0], candidates[1:]))
    return np.zeros(len(candidates))
  r_precision.easy(list(range(13)), captions, record, num_negatives=5, seed=3)
  assert all(true not in negatives for true, negatives in seen)


def test_swap_negatives_change_one_word_within_its_category():
  lists = {"noun": set(r_precision.NOUNS) | set(r_precision.NOUNS.values()), "verb": set(r_precision.VERBS),
           "colour": set(r_precision.COLOURS), "number": set(r_precision.NUMBERS)}
  assert all(not (lists[a] & lists[b]) for a in lists for b in lists if a < b)  # no word in two categories
  rng = np.random.default_rng(0)
  found = set()
  for _ in range(20):
    for caption in CAPTIONS:
      for category, negative in r_precision.swap_negatives(caption, rng):
        found.add(category)
        old, new = caption.split(), negative.split()
        diff = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(old) == len(new) and len(diff) == 1, (caption, negative)
        a, b = (w.strip(".,").lower() for w in diff[0])
        assert a in lists[category] and b in lists[category] and a != b
        assert (a in r_precision.NOUNS) == (b in r_precision.NOUNS)  # singular stays singular
        before = old[old.index(diff[0][0]) - 1].lower()
        if before in ("a", "an"):
          assert (before == "an") == (b[0] in "aeiou"), negative
        assert diff[0][1][0].isupper() == diff[0][0][0].isupper()
  assert found == set(r_precision.CATEGORIES)
  assert [c for c, _ in r_precision.swap_negatives("the sky is blue", rng)] == ["colour"]
  assert r_precision.swap_negatives("nothing to swap here", rng) == []


def test_hard_oracle_and_constant_scorers():
  images = np.arange(len(CAPTIONS))
  oracle = r_precision.hard(images, CAPTIONS, _oracle(CAPTIONS))
  assert oracle.overall == 1.0 and set(oracle.per_category) == set(r_precision.CATEGORIES)
  assert all(v == 1.0 for v in oracle.per_category.values())
  assert oracle.num_trials == sum(oracle.counts.values()) and oracle.counts["colour"] == 3  # no colour but "orange" takes "an"
  assert oracle.metrics("hard")["hard/verb"] == 1.0
  constant = lambda i, c: np.ones(len(c))  # noqa: E731
  assert r_precision.hard(images, CAPTIONS, constant).overall == 0.0
  many = np.arange(400) % len(CAPTIONS)
  tied = r_precision.hard(many, [CAPTIONS[i] for i in many], constant, ties="random")
  assert abs(tied.overall - 0.5) < 0.07  # one negative per trial: chance is 1/2


def test_hard_with_scene_negatives_and_contexts():
  """The captioned-scenes world's hard_negatives(caption, scene_graph, rng), scene graphs as contexts."""
  rng = np.random.default_rng(0)
  graphs = [scenes.sample_scene(rng) for _ in range(12)]
  captions = [scenes.captions(g, rng, n=1)[0] for g in graphs]

  def oracle(images, caps):
    return np.array([float(scenes.check_caption(c, g)) for g, c in zip(images, caps)])
  result = r_precision.hard(graphs, captions, oracle, negatives_fn=scenes.hard_negatives, contexts=graphs)
  assert result.overall == 1.0 and result.num_trials >= len(graphs)
  assert set(result.per_category) <= set(scenes.NEGATIVE_CATEGORIES)
  given = [[("colour", "a made up negative")], []]
  fixed = r_precision.hard(graphs[:2], captions[:2], oracle, negatives=given)
  assert fixed.counts == {"colour": 1} and fixed.overall == 1.0
