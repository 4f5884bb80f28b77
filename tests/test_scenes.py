"""Captioned-scenes world: determinism, true captions, false hard negatives, QA, rendering, the TFDS builder."""

import importlib
import json
import re

import numpy as np
import pytest

from bigen_jax.worlds.scenes import lexicon as V
from bigen_jax.worlds.scenes import world as scenes
from bigen_jax.worlds.scenes.grammar import parse_caption, word_swaps
from bigen_jax.worlds.scenes.render import COLOUR_RGB

N_SCENES = 48


@pytest.fixture(scope="module")
def examples():
  return [scenes.make_example(i, split="validation") for i in range(N_SCENES)]


def _scene(ex):
  return json.loads(ex["scene_graph"])


def _hand_scene():
  """Red circle (left, top), blue star (right, top), two green triangles (bottom)."""
  cfg = scenes.SceneConfig()
  scene = scenes.sample_scene(np.random.default_rng(0), cfg)
  objs = [dict(shape="circle", colour="red", size="large", x=30.0, y=30.0, r=18.0),
          dict(shape="star", colour="blue", size="small", x=100.0, y=32.0, r=10.0),
          dict(shape="triangle", colour="green", size="small", x=30.0, y=100.0, r=10.0),
          dict(shape="triangle", colour="green", size="large", x=95.0, y=100.0, r=18.0)]
  for o in objs:
    o["bbox"] = [o["x"] - o["r"], o["y"] - o["r"], o["x"] + o["r"], o["y"] + o["r"]]
  rels = [[a, rel, b] for a in range(4) for b in range(4) if a != b for rel in V.RELATIONS
          if V.relation_holds(objs[a], rel, objs[b], scene["relation_margin"])]
  return dict(scene, objects=objs, relations=rels)


def test_determinism_and_variety():
  a, b = scenes.make_example(7, split="train"), scenes.make_example(7, split="train")
  assert a["image"].tobytes() == b["image"].tobytes()
  assert a["captions"] == b["captions"] and a["scene_graph"] == b["scene_graph"]
  assert a["hard_negatives"] == b["hard_negatives"] and a["qa"] == b["qa"]
  assert a["key"] == "scenes/train/000007" and a["image_id"] == 7
  c, d = scenes.make_example(8, split="train"), scenes.make_example(7, split="test")
  assert c["image"].tobytes() != a["image"].tobytes() and d["image"].tobytes() != a["image"].tobytes()
  assert d["image_id"] != a["image_id"]
  e = scenes.make_example(7, scenes.SceneConfig(seed=1), split="train")
  assert e["image"].tobytes() != a["image"].tobytes()
  # Rendering depends on the scene graph alone, also after a JSON round trip.
  assert scenes.render(json.loads(a["scene_graph"])).tobytes() == a["image"].tobytes()


def test_captions_distinct_true_and_short(examples):
  for ex in examples:
    caps = ex["captions"]
    assert len(caps) == 5 and len(set(caps)) == 5
    for c in caps:
      assert c == c.lower() and re.fullmatch(r"[a-z ]+", c) and len(c.split()) <= V.MAX_WORDS
      assert scenes.check_caption(c, ex["scene_graph"]), c
  templates = " ".join(c for ex in examples for c in ex["captions"])
  for phrase in ("to the left of", "there are", " and a ", "the ", "including", "background", "box"):
    assert phrase in templates


def test_checker_on_a_hand_made_scene():
  s = _hand_scene()
  true = ["a red circle left of a blue star", "to the left of a blue star there is a red circle",
          "there are two green triangles", "there are four shapes including a large disc",
          "the red circle is above the small triangle", "a large green triangle and a small green triangle",
          "two triangles and a red circle", "a green object below a red disc"]
  false = ["a red circle right of a blue star", "there are three green triangles", "a purple circle",
           "the green triangle is below the red circle",  # two green triangles: "the" is not unique
           "a red circle and a red circle", "a small red circle", "there are two shapes",
           "a red circle left of a red circle", "red circle", "a circle is red", "the red"]
  for c in true:
    assert scenes.check_caption(c, s), c
  for c in false:
    assert not scenes.check_caption(c, s), c
  assert scenes.check_caption(f"a red circle on a {s['background']['type']} background", s)
  other = next(b for b in V.BACKGROUNDS if b != s["background"]["type"])
  assert not scenes.check_caption(f"a red circle on a {other} background", s)
  claims = parse_caption("above a green triangle there is a big blue star")
  assert claims["relations"] == [(1, "above", 0)] and claims["mentions"][1]["size"] == "large"


def test_hard_negatives_one_word_swapped_and_false(examples):
  categories = set()
  rng = np.random.default_rng(0)
  for ex in examples:
    scene = _scene(ex)
    pairs = [(n["caption"], n["category"], n["negative"]) for n in ex["hard_negatives"]]
    pairs += [(c, cat, neg) for c in ex["captions"] for cat, neg in scenes.hard_negatives(c, scene, rng)]
    for caption, category, negative in pairs:
      pw, nw = caption.split(), negative.split()
      assert len(pw) == len(nw)
      diff = [i for i in range(len(pw)) if pw[i] != nw[i]]
      assert len(diff) == 1, (caption, negative)
      cat, options = word_swaps(pw[diff[0]])
      assert cat == category and nw[diff[0]] in options
      assert not scenes.check_caption(negative, scene) and not scenes.check_caption(negative, scene, margin=0)
      parse_caption(negative)  # still grammatical
      categories.add(category)
  assert {"shape", "colour", "number", "relation"} <= categories


def test_scene_graph_consistency(examples):
  sizes = {len(_scene(ex)["objects"]) for ex in examples}
  assert sizes == {1, 2, 3, 4}
  for ex in examples:
    s = _scene(ex)
    objs, size, m = s["objects"], s["image_size"], s["relation_margin"]
    for o in objs:
      x1, y1, x2, y2 = o["bbox"]
      assert 0 <= x1 < o["x"] < x2 <= size and 0 <= y1 < o["y"] < y2 <= size
      side = 2 * o["r"]
      assert (18 <= side <= 24) if o["size"] == "small" else (34 <= side <= 44)
    for a in range(len(objs)):
      for b in range(a + 1, len(objs)):
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = objs[a]["bbox"], objs[b]["bbox"]
        assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1, "objects overlap"
    expected = {(a, rel, b) for a in range(len(objs)) for b in range(len(objs)) if a != b
                for rel in V.RELATIONS if V.relation_holds(objs[a], rel, objs[b], m)}
    assert {tuple(r) for r in s["relations"]} == expected
    for a, rel, b in s["relations"]:
      dx, dy = objs[b]["x"] - objs[a]["x"], objs[b]["y"] - objs[a]["y"]
      assert {"left of": dx > m, "right of": -dx > m, "above": dy > m, "below": -dy > m}[rel]
    for c in ex["captions"]:  # counts said in captions match the graph
      total = re.fullmatch(r"there (?:are|is) (\w+) (?:shapes|objects)(?: .*)?", c)
      if total:
        assert V.NUMBER_VALUE[total.group(1)] == len(objs)
      for desc, n in parse_caption(c)["counts"]:
        assert n == sum(all(desc[k] in (None, o[k]) for k in ("shape", "colour", "size")) for o in objs)


def _unique(objs, **attrs):
  found = [o for o in objs if all(o[k] == v for k, v in attrs.items())]
  assert len(found) == 1, attrs
  return found[0]


def _answer(q, s):
  """Re-derives a question's answer from the scene graph, independently of ``scenes_qa``."""
  objs, m = s["objects"], s["relation_margin"]
  rel = "(left of|right of|above|below)"
  count = lambda **kw: V.NUMBERS[sum(all(o[k] == v for k, v in kw.items()) for o in objs) - 1]
  if q == "how many shapes are there?":
    return V.NUMBERS[len(objs) - 1]
  if q == "what pattern is the background?":
    return s["background"]["type"]
  if g := re.fullmatch(r"how many (\w+) shapes are there\?", q):
    return count(colour=g[1])
  if g := re.fullmatch(r"how many (\w+) are there\?", q):
    return count(shape=V.SHAPE_PLURAL[g[1]])
  if g := re.fullmatch(r"what colour is the (\w+)\?", q):
    return _unique(objs, shape=g[1])["colour"]
  if g := re.fullmatch(r"what shape is the (\w+) object\?", q):
    return _unique(objs, colour=g[1])["shape"]
  if g := re.fullmatch(r"what size is the (\w+) (\w+)\?", q):
    return _unique(objs, colour=g[1], shape=g[2])["size"]
  if g := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
    return "yes" if any(o["colour"] == g[1] and o["shape"] == g[2] for o in objs) else "no"
  if g := re.fullmatch(rf"what shape is {rel} the (\w+) (\w+)\?", q):
    ref = _unique(objs, colour=g[2], shape=g[3])
    found = [o for o in objs if o is not ref and V.relation_holds(o, g[1], ref, 0.0)]
    assert len(found) == 1 and V.relation_holds(found[0], g[1], ref, m)
    return found[0]["shape"]
  if g := re.fullmatch(rf"is the (\w+) (\w+) {rel} the (\w+) (\w+)\?", q):
    a, b = _unique(objs, colour=g[1], shape=g[2]), _unique(objs, colour=g[4], shape=g[5])
    if V.relation_holds(a, g[3], b, m):
      return "yes"
    assert not V.relation_holds(a, g[3], b, 0.0)
    return "no"
  raise AssertionError(f"unexpected question {q!r}")


def test_questions_consistent_with_scene_graph(examples):
  answers, kinds = [], set()
  for ex in examples:
    s = _scene(ex)
    assert 4 <= len(ex["qa"]) <= 6 and len({qa["question"] for qa in ex["qa"]}) == len(ex["qa"])
    for qa in ex["qa"]:
      assert qa["answer"] in scenes.ANSWERS
      assert qa["answer"] == _answer(qa["question"], s), qa
      answers.append(qa["answer"])
      kinds.add(qa["question"].split()[0] + " " + qa["question"].split()[1])
  assert {"yes", "no"} <= set(answers) and len(set(answers)) > 15
  assert {"how many", "what colour", "what shape", "is there", "is the"} <= kinds


def test_render_shape_dtype_and_colours(examples):
  for ex in examples[:24]:
    img, s = ex["image"], _scene(ex)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    for o in s["objects"]:
      x1, y1, x2, y2 = o["bbox"]
      cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
      patch = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(np.float32).mean(0)
      assert np.abs(patch - np.array(COLOUR_RGB[o["colour"]])).max() < 20, (o, patch)
  big = scenes.make_example(0, scenes.SceneConfig(image_size=256))
  assert big["image"].shape == (256, 256, 3) and json.loads(big["scene_graph"])["image_size"] == 256


def test_word_categories_exported():
  assert len(scenes.SHAPES) >= 6 and len(scenes.COLOURS) == 8 and scenes.SIZES == ("small", "large")
  assert scenes.RELATIONS == ("left of", "right of", "above", "below") and "two" in scenes.NUMBERS
  for w in scenes.SHAPES + scenes.COLOURS + scenes.SIZES:
    assert w[0] not in "aeiou"  # one-word swaps never need a new article
  assert len(set(scenes.ANSWERS)) == len(scenes.ANSWERS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_tfds_tiny_source(tiny_dir):
  from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
  sizes = {"train": 64, "validation": 16, "test": 16}
  for split, n in sizes.items():
    rows = list(tfds_builder.source(split, data_dir=tiny_dir, config="tiny"))
    assert len(rows) == n
    assert [r["key"] for r in rows] == [f"scenes/{split}/{i:06d}" for i in range(n)]
    assert len({r["image_id"] for r in rows}) == n
  row = rows[3]
  assert set(row) == {"image_id", "key", "image", "captions", "scene_graph", "hard_negatives", "qa", "questions"}
  assert row["image"].shape == (64, 64, 3) and row["image"].dtype == np.uint8
  want = scenes.make_example(3, scenes.SceneConfig(image_size=64), split="test")
  assert row["image"].tobytes() == want["image"].tobytes()
  for k in ("image_id", "key", "captions", "scene_graph", "hard_negatives", "qa"):
    assert row[k] == want[k], k
  assert all(isinstance(c, str) for c in row["captions"])
  from bigen_jax.worlds.scenes import qa  # pylint: disable=g-import-not-at-top
  typed = [{"question": p["question"], "answers": [p["answer"]], "type": qa.question_type(p["question"])}
           for p in want["qa"]]
  assert row["questions"] == typed  # the extractor's form, typed by template


def test_tfds_custom_config_and_reimport(tiny_dir):
  from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
  importlib.reload(tfds_builder)  # no global registration to collide with
  b = tfds_builder.builder(tiny_dir, "tiny", num_train=3, num_validation=2, num_test=1, seed=5)
  assert b.builder_config.name == "tiny-num_test1-num_train3-num_validation2-seed5"
  rows = list(tfds_builder.source("train", data_dir=tiny_dir, config="tiny", num_train=3, num_validation=2,
                                  num_test=1, seed=5))
  assert len(rows) == 3
  assert rows[0]["captions"] == scenes.make_example(0, scenes.SceneConfig(image_size=64, seed=5))["captions"]
  with pytest.raises(ValueError):
    tfds_builder.builder(tiny_dir, "nope")
  with pytest.raises(ValueError):
    tfds_builder.builder(tiny_dir, "tiny", colour_count=3)
