"""T2I caption dropout: the null caption ``[CLS] [SEP]``, the dropped fraction, and that the loss sees it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigen_jax.models import lxmert
from bigen_jax.tasks import layouts
from bigen_jax.tasks import t2i
from configs import base
from configs import model as model_config

PAD, CLS, SEP, MASK = 0, 2, 3, 4
IDS = dict(cls_id=CLS, sep_id=SEP, pad_id=PAD)


def _captions(batch: int, length: int = 8, seed: int = 0):
  """Random captions [CLS] w.. [SEP] [PAD].. of 1..length-2 words: (text_ids, text_mask) int32 [B, L]."""
  rng = np.random.default_rng(seed)
  words = rng.integers(5, 64, (batch, length))
  n = rng.integers(1, length - 1, batch)[:, None]
  index = np.arange(length)[None]
  ids = np.where(index == 0, CLS, np.where(index <= n, words, np.where(index == n + 1, SEP, PAD)))
  return jnp.asarray(ids, jnp.int32), jnp.asarray(index <= n + 1, jnp.int32)


def _tiny_model_and_batch(size: int):
  """The tiny model (64 cells) with params, a batch of ``size`` random captions, cluster ids and boxes, and a
  random frozen codebook: (model, params, batch, frozen)."""
  config = model_config.get_config("tiny")
  config.num_cells = 64
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(1)
  text_ids, text_mask = _captions(size, length=config.max_len)
  batch = dict(text_ids=text_ids, text_mask=text_mask,
               cluster_ids=jnp.asarray(rng.integers(0, config.num_clusters, (size, 64)), jnp.int32),
               boxes=jnp.asarray(rng.uniform(size=(size, 64, 4)), jnp.float32))
  codebook = rng.normal(size=(config.num_clusters, config.visual_feat_dim))
  return model, params, batch, {"codebook": jnp.asarray(codebook, jnp.float32)}


def test_null_captions():
  text_ids, _ = _captions(3)
  ids, mask = layouts.null_captions(text_ids, **IDS)
  assert ids.dtype == text_ids.dtype and ids.shape == mask.shape == text_ids.shape
  np.testing.assert_array_equal(ids, np.tile([CLS, SEP] + [PAD] * 6, (3, 1)))
  np.testing.assert_array_equal(mask, np.tile([1, 1] + [0] * 6, (3, 1)))


def test_drop_captions_rate_and_rows():
  text_ids, text_mask = _captions(10_000)
  ids, mask, dropped = jax.jit(lambda r, i, m: t2i.drop_captions(r, text_ids=i, text_mask=m, rate=0.5, **IDS))(
      jax.random.key(0), text_ids, text_mask)
  ids, mask, dropped = np.asarray(ids), np.asarray(mask), np.asarray(dropped)
  assert abs(dropped.mean() - 0.5) < 0.03
  null_ids, null_mask = map(np.asarray, layouts.null_captions(text_ids, **IDS))
  np.testing.assert_array_equal(ids[dropped], null_ids[dropped])
  np.testing.assert_array_equal(mask[dropped], null_mask[dropped])
  np.testing.assert_array_equal(ids[~dropped], np.asarray(text_ids)[~dropped])
  np.testing.assert_array_equal(mask[~dropped], np.asarray(text_mask)[~dropped])
  assert mask.dtype == np.int32
  _, _, none = t2i.drop_captions(jax.random.key(0), text_ids=text_ids, text_mask=text_mask, rate=0.0, **IDS)
  assert not np.asarray(none).any()


@pytest.fixture(scope="module")
def results():
  """(loss, metrics) of one batch of 256 under several caption_dropout / deterministic settings, same rng,
  compiled as one program."""
  model, params, batch, frozen = _tiny_model_and_batch(256)
  null_ids, null_mask = layouts.null_captions(batch["text_ids"], **IDS)
  all_null = {**batch, "text_ids": null_ids, "text_mask": null_mask}
  runs = {"p0.5": (batch, 0.5, False), "p0": (batch, 0.0, False), "p0.5 deterministic": (batch, 0.5, True),
          "p1": (batch, 1.0, False), "p1 deterministic": (batch, 1.0, True),
          "p0 deterministic": (batch, 0.0, True), "null captions p0": (all_null, 0.0, False)}

  def cfg(caption_dropout):
    out = ml_collections.ConfigDict(base.get_config().tasks.t2i.to_dict())
    out.update(dict(caption_dropout=caption_dropout, mask_id=MASK, **IDS))
    return ml_collections.FrozenConfigDict(out)

  @jax.jit
  def run(params, rng):
    return {name: t2i.loss_fn(params, b, rng, model=model, cfg=cfg(p), frozen=frozen, deterministic=d)
            for name, (b, p, d) in runs.items()}

  return jax.device_get(run(params, jax.random.key(3)))


def test_loss_reports_dropped_fraction(results):
  assert abs(results["p0.5"][1]["caption_dropped"] - 0.5) < 0.12  # 256 examples: sd 0.031
  assert results["p0"][1]["caption_dropped"] == 0.0
  assert results["p0.5 deterministic"][1]["caption_dropped"] == 0.0
  assert base.get_config().tasks.t2i.caption_dropout == 0.0


def test_dropped_captions_reach_the_model(results):
  """p = 1 is the loss of the same batch with every caption the null one; deterministic keeps the captions."""
  assert results["p1"][1]["caption_dropped"] == 1.0
  assert results["p1"][0] == results["null captions p0"][0]
  assert results["p1"][0] != results["p0"][0]
  assert results["p1 deterministic"][0] == results["p0 deterministic"][0]


def test_feature_regression_loss_by_hand():
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(10, 3)).astype(np.float32)
  targets = rng.integers(0, 10, (2, 5))
  weights = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], np.float32)
  feats = rng.normal(size=(2, 5, 3)).astype(np.float32)
  want = ((feats - codebook[targets]) ** 2).mean(-1) / (codebook ** 2).mean()
  got = t2i.feature_regression_loss(jnp.asarray(feats), jnp.asarray(targets), jnp.asarray(weights), codebook)
  np.testing.assert_allclose(got, (want * weights).sum() / weights.sum(), rtol=1e-6)
  exact = t2i.feature_regression_loss(jnp.asarray(codebook[targets]), jnp.asarray(targets), jnp.asarray(weights),
                                      codebook)
  assert float(exact) == 0.0
  with pytest.raises(ValueError, match="image_head_dim"):
    t2i.feature_regression_loss(jnp.zeros((2, 5, 4)), jnp.asarray(targets), jnp.asarray(weights), codebook)


def _aided_loss(model, params, batch, frozen, field: str):
  """``run(weight, deterministic)``: T2I's (loss, metrics) on ``batch`` with ``tasks.t2i.<field>`` = weight."""
  def run(weight, deterministic):
    cfg = ml_collections.ConfigDict(base.get_config().tasks.t2i.to_dict())
    cfg.update({field: weight, "mask_id": MASK, **IDS})
    return t2i.loss_fn(params, batch, jax.random.key(3), model=model, cfg=ml_collections.FrozenConfigDict(cfg),
                       frozen=frozen, deterministic=deterministic)
  return run


def _assert_added_in_training_only(run, field: str):
  """The auxiliary ``field`` adds weight x its metric to the training loss, and nothing in evaluation."""
  (plain, _), (aided, metrics) = run(0.0, False), run(0.5, False)
  np.testing.assert_allclose(aided, plain + 0.5 * metrics[field], rtol=1e-6)
  assert metrics[field] > 0 and metrics["loss"] == aided
  assert run(0.5, True)[0] == run(0.0, True)[0]
  assert base.get_config().tasks.t2i[field] == 0.0


def test_feature_regression_is_added_in_training_only():
  run = _aided_loss(*_tiny_model_and_batch(4), "feature_regression")
  _assert_added_in_training_only(run, "feature_regression")


def test_code_bag_losses_by_hand():
  """Both bags count each distinct code of the image once, whatever the number of cells it covers."""
  rng = np.random.default_rng(0)
  targets = np.array([[1, 1, 1, 4, 2], [0, 0, 3, 3, 3]])
  weights = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], np.float32)
  logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
  bag = np.zeros((2, 6))
  bag[0, [1, 2, 4]] = 1 / 3
  bag[1, [0, 3]] = 1 / 2
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(bag[:, None, :] * log_p).sum(-1)
  got = t2i.code_bag_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(got, (want * weights).sum() / weights.sum(), rtol=1e-5)

  codebook = rng.normal(size=(6, 3)).astype(np.float32) * [1.0, 5.0, 0.1] + 2.0
  standard = (codebook - codebook.mean(0)) / codebook.std(0)
  mean = bag @ standard
  feats = rng.normal(size=(2, 5, 3)).astype(np.float32)
  want = ((feats - mean[:, None, :]) ** 2).mean(-1)
  got = t2i.feature_bag_loss(jnp.asarray(feats), jnp.asarray(targets), jnp.asarray(weights), codebook)
  np.testing.assert_allclose(got, (want * weights).sum() / weights.sum(), rtol=1e-5)
  exact = t2i.feature_bag_loss(jnp.asarray(np.broadcast_to(mean[:, None], (2, 5, 3))), jnp.asarray(targets),
                               jnp.asarray(weights), codebook)
  assert float(exact) < 1e-10


@pytest.mark.parametrize("head", ["codes", "features"])
def test_code_bag_is_added_in_training_only(head):
  config = model_config.get_config("tiny")
  config.num_cells = 64
  config.code_bag_head = head
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  width = config.num_clusters if head == "codes" else config.visual_feat_dim
  assert params["code_bag_head"]["kernel"].shape == (config.hidden_size, width)
  _, _, batch, frozen = _tiny_model_and_batch(4)
  _assert_added_in_training_only(_aided_loss(model, params, batch, frozen, "code_bag"), "code_bag")


def test_code_bag_needs_its_head():
  from bigen_jax import config_checks, errors  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.tasks.t2i.code_bag = 1.0
  with pytest.raises(errors.ConfigError, match="code_bag_head"):
    config_checks.check_config(config)
  config.model.code_bag_head = "features"
  config_checks.check_config(config)
