"""``validation_loss``'s true-vs-shuffled gap: every caption paired with another image of its batch (the images
move for I2T, the captions for T2I), the same rng, so the pairing is the only difference; zero when the
batch's examples are all the same."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigen_jax import experiment
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from bigen_jax.eval import validation_loss
from bigen_jax.models import lxmert
from configs import demo
from conftest import write_records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gap"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 8, "validation": 16}, dim=8, max_len=6)
  vocab.build_vocab(records_dir, vocab_dir, k=6, iterations=5, sample_size=1000, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=records_dir, vocab_dir=vocab_dir, tokenizer=vocab_txt))
  config.mesh.num_devices = 1
  config.eval.num_batches = 2
  ctx = experiment.build_context(config, os.path.join(root, "run"))
  params = nn.unbox(lxmert.init_params(ctx.model, ctx.config.model, jax.random.key(0)))
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    yield ctx, validation_loss.Evaluator(ctx), params


def _evaluate(evaluator, params, batches):
  evaluator.batches = batches
  return evaluator.run(params, step=0)


def test_roll_images_moves_only_the_visual_side():
  batch = {"text_ids": np.arange(3)[:, None], "boxes": np.arange(3)[:, None], "dense": np.arange(3)[:, None],
           "cluster_ids": np.arange(3)[:, None] + 10}
  rolled = jax.device_get(validation_loss.roll_images(batch))
  np.testing.assert_array_equal(rolled["dense"][:, 0], [2, 0, 1])
  np.testing.assert_array_equal(rolled["cluster_ids"][:, 0], [12, 10, 11])
  np.testing.assert_array_equal(rolled["text_ids"], batch["text_ids"])
  np.testing.assert_array_equal(rolled["boxes"], batch["boxes"])


def test_gap_is_shuffled_minus_true_loss(setup):
  ctx, evaluator, params = setup
  batches = list(evaluator.batches)
  out = _evaluate(evaluator, params, batches)
  for task in ("i2t", "t2i"):
    keys = [f"validation_loss/{task}/{k}" for k in ("loss", "accuracy", "shuffled_loss", "gap")]
    assert all(k in out and np.isfinite(out[k]) for k in keys), sorted(out)
    loss, _, shuffled, gap = (out[k] for k in keys)
    assert gap == shuffled - loss
    assert gap != 0  # the images differ and even a random model looks at them
  for task in ("i2t", "t2i"):
    fields = validation_loss.CONDITION[task]
    rolled = [ctx.batch_to_global(jax.device_get(validation_loss.roll_fields(b, fields))) for b in batches]
    on_rolled = _evaluate(evaluator, params, rolled)
    assert out[f"validation_loss/{task}/shuffled_loss"] == pytest.approx(
        on_rolled[f"validation_loss/{task}/loss"], rel=1e-5)
  assert validation_loss.CONDITION["t2i"] == ("text_ids", "text_mask")  # T2I keeps its targets in place
  evaluator.batches = batches


def test_gap_is_zero_for_identical_examples(setup):
  ctx, evaluator, params = setup
  batches = list(evaluator.batches)
  first = jax.device_get(batches[0])
  same = ctx.batch_to_global({k: np.repeat(v[:1], len(v), axis=0) for k, v in first.items()})
  out = _evaluate(evaluator, params, [same])
  for task in ("i2t", "t2i"):
    assert out[f"validation_loss/{task}/gap"] == 0.0
    assert out[f"validation_loss/{task}/shuffled_loss"] == out[f"validation_loss/{task}/loss"]
  evaluator.batches = batches
