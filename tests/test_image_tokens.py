"""T2I decoding: the compiled ``parallel_decode`` equals plain Python loops with the model, per order, with
MaskGIT sampling and classifier-free guidance."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from bigen_jax.models import lxmert
from bigen_jax.tasks import layouts
from bigen_jax.sampling import image_tokens
from configs import model as model_config


@pytest.fixture(scope="module")
def setup():
  config = model_config.get_config("tiny")
  config.num_cells = 64  # the paper's 8x8 grid: K = 64 decides one cell per pass
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(5, config.vocab_size, (2, config.max_len)), jnp.int32)
  inputs = dict(text_ids=text, text_mask=jnp.ones_like(text),
                boxes=jnp.asarray(rng.uniform(size=(2, config.num_cells, 4)), jnp.float32),
                codebook=jnp.asarray(rng.normal(size=(config.num_clusters, config.visual_feat_dim)), jnp.float32))

  @jax.jit
  def forward(ids, masked):
    out = model.apply({"params": params}, inputs["text_ids"], inputs["text_mask"], boxes=inputs["boxes"],
                      cluster_ids=ids, codebook=inputs["codebook"], visual_mask=masked, image_logits=True)
    return jax.nn.softmax(out.image_logits, axis=-1)

  def probs(ids, masked):
    """One model pass: cluster probabilities [B, M, K] of every cell."""
    return np.asarray(forward(jnp.asarray(ids), jnp.asarray(masked)))

  return config, model, params, inputs, probs


def _decode(model, params, inputs, order, num_steps):
  fn = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, num_steps=num_steps, order=order,
                                                         **inputs))
  return np.asarray(fn(params, jax.random.key(0))[0])


def test_linear_schedule():
  counts = [int(image_tokens.masked_count(t, num_steps=4, num_cells=64)) for t in range(4)]
  assert counts == [48, 32, 16, 0]


def test_easy_first_one_cell_per_step_equals_sequential_loop(setup):
  """K = 64: each pass fixes the single most confident masked cell."""
  config, model, params, inputs, probs = setup
  m = config.num_cells
  ids, masked = np.zeros((2, m), np.int32), np.ones((2, m), bool)
  for _ in range(m):
    p = probs(ids, masked)
    for b in range(2):
      best = p[b].max(-1)
      cell = int(np.argmax(np.where(masked[b], best, -1.0)))
      ids[b, cell], masked[b, cell] = int(np.argmax(p[b, cell])), False
  np.testing.assert_array_equal(_decode(model, params, inputs, "easy_first", m), ids)


def test_left_to_right_equals_raster_loop(setup):
  config, model, params, inputs, probs = setup
  m = config.num_cells
  ids, masked = np.zeros((2, m), np.int32), np.ones((2, m), bool)
  for cell in range(m):
    p = probs(ids, masked)
    ids[:, cell], masked[:, cell] = p[:, cell].argmax(-1), False
  np.testing.assert_array_equal(_decode(model, params, inputs, "left_to_right", m), ids)


@pytest.mark.parametrize("num_steps", [4, 64])
def test_mask_predict_equals_reference_loop(setup, num_steps):
  """Mask-predict: re-predict masked cells, then re-mask the least confident of the whole grid."""
  config, model, params, inputs, probs = setup
  m = config.num_cells
  ids, masked, conf = np.zeros((2, m), np.int32), np.ones((2, m), bool), np.zeros((2, m), np.float32)
  for t in range(num_steps):
    p = probs(ids, masked)
    ids = np.where(masked, p.argmax(-1), ids)
    conf = np.where(masked, p.max(-1), conf)
    keep_masked = m * (num_steps - 1 - t) // num_steps
    masked = np.zeros((2, m), bool)
    for b in range(2):
      masked[b, np.argsort(conf[b], kind="stable")[:keep_masked]] = True
  np.testing.assert_array_equal(_decode(model, params, inputs, "mask_predict", num_steps), ids)


def _random_permutations(rng, batch, num_cells):
  """The documented random order, in numpy: image b decides its cells by decreasing uniform draw
  ``jax.random.uniform(split(rng)[0], (B, M))[b]`` (ties, of probability ~0, by position)."""
  order_rng, _ = jax.random.split(rng)
  draws = np.asarray(jax.random.uniform(order_rng, (batch, num_cells)), np.float64)
  return np.stack([np.argsort(-row, kind="stable") for row in draws])


def _permutation_loop(logits_fn, inputs, perm, num_steps):
  """Temperature 0 in a fixed order per image: pass t predicts every masked cell by argmax and fixes the next
  M / K cells of the image's permutation ``perm`` [B, M]; the others stay masked."""
  batch, m = perm.shape
  per_pass = m // num_steps
  ids, masked = np.zeros((batch, m), np.int32), np.ones((batch, m), bool)
  for t in range(num_steps):
    guess = logits_fn(ids, masked, inputs["text_ids"], inputs["text_mask"]).argmax(-1)
    for b in range(batch):
      cells = perm[b, t * per_pass:(t + 1) * per_pass]
      ids[b, cells], masked[b, cells] = guess[b, cells], False
  return ids


@pytest.mark.parametrize("num_steps", [4, 64])
def test_random_order_at_temperature_zero_equals_permutation_loop(setup, sharp, num_steps):
  """The sharp model, whose argmax depends on the decided cells, so that another order decodes other ids."""
  config, _, _, inputs, _ = setup
  model, params, logits_fn = sharp
  perm = _random_permutations(jax.random.key(7), 2, config.num_cells)
  assert sorted(perm[0]) == list(range(config.num_cells)) and (perm[0] != perm[1]).any()
  expected = _permutation_loop(logits_fn, inputs, perm, num_steps)
  assert (expected != _permutation_loop(logits_fn, inputs, perm[:, ::-1], num_steps)).any()  # order matters
  fn = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, num_steps=num_steps, order="random",
                                                         **inputs)[0])
  np.testing.assert_array_equal(np.asarray(fn(params, jax.random.key(7))), expected)


def test_random_order_and_sampling_are_seeded(setup):
  config, model, params, inputs, probs = setup
  fn = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, order="random", temperature=1.0,
                                                         **inputs)[0])
  a, b = np.asarray(fn(params, jax.random.key(1))), np.asarray(fn(params, jax.random.key(2)))
  np.testing.assert_array_equal(a, np.asarray(fn(params, jax.random.key(1))))
  assert (a != b).any() and a.min() >= 0 and a.max() < config.num_clusters
  with pytest.raises(ValueError, match="decoding order"):
    image_tokens.parallel_decode(params, jax.random.key(0), model=model, order="spiral", **inputs)


@pytest.fixture(scope="module")
def sharp(setup):
  """The tiny model initialised at std 0.2: peaked cluster logits that depend on the caption (at the default
  0.02 they are near uniform). (model, params, logits_fn): one model pass on any caption, logits [B, M, K]."""
  config, _, _, inputs, _ = setup
  config = config.copy_and_resolve_references()
  config.init_std = 0.2
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())

  @jax.jit
  def forward(ids, masked, text_ids, text_mask):
    return model.apply({"params": params}, text_ids, text_mask, boxes=inputs["boxes"], cluster_ids=ids,
                       codebook=inputs["codebook"], visual_mask=masked, image_logits=True).image_logits

  def logits_fn(ids, masked, text_ids, text_mask):
    return np.asarray(forward(jnp.asarray(ids), jnp.asarray(masked), text_ids, text_mask), np.float32)

  return model, params, logits_fn


def _null(inputs):
  ids, mask = layouts.null_captions(inputs["text_ids"], cls_id=2, sep_id=3, pad_id=0)
  return {"null_text_ids": ids, "null_text_mask": mask}


def _maskgit_loop(logits_fn, inputs, *, num_steps, temperature, choice_temperature, schedule, guidance=0.0):
  """MaskGIT in plain Python with the decoder's rng use: sample every masked cell, confidence = log p +
  annealed Gumbel noise over the still-masked cells, the least confident stay masked."""
  order_rng, sample_rng = jax.random.split(jax.random.key(0))
  batch, m = inputs["boxes"].shape[:2]
  null = _null(inputs)
  ids, masked = np.zeros((batch, m), np.int32), np.ones((batch, m), bool)
  for t in range(num_steps):
    logits = logits_fn(ids, masked, inputs["text_ids"], inputs["text_mask"])
    if guidance:
      logits = (1 + guidance) * logits - guidance * logits_fn(ids, masked, null["null_text_ids"],
                                                              null["null_text_mask"])
    log_p = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    guess = np.asarray(jax.random.categorical(jax.random.fold_in(sample_rng, t), log_p / temperature, axis=-1))
    guess_log_p = np.take_along_axis(np.asarray(log_p), guess[..., None], axis=-1)[..., 0]
    gumbel = np.asarray(jax.random.gumbel(jax.random.fold_in(order_rng, t), (batch, m)))
    conf = np.where(masked, guess_log_p + choice_temperature * (1 - (t + 1) / num_steps) * gumbel, np.inf)
    ids = np.where(masked, guess, ids)
    count = int(image_tokens.masked_count(t, num_steps=num_steps, num_cells=m, schedule=schedule))
    masked = np.zeros((batch, m), bool)
    for b in range(batch):
      masked[b, np.argsort(conf[b], kind="stable")[:count]] = True
  return ids


def test_cosine_schedule():
  """MaskGIT's floor(M cos(pi/2 (t+1)/K)), at least one cell decided per pass, >= 1 masked until the last."""
  def counts(k):
    return [int(image_tokens.masked_count(t, num_steps=k, num_cells=64, schedule="cosine")) for t in range(k)]

  assert counts(4) == [59, 45, 24, 0]
  assert counts(8) == [62, 59, 53, 45, 35, 24, 12, 0]
  assert counts(64) == list(range(63, -1, -1))  # floor(64 cos(pi/128 * 2)) = 63: clipped to 62
  assert counts(80) == list(range(63, 0, -1)) + [1] * 16 + [0]
  with pytest.raises(ValueError, match="masking schedule"):
    image_tokens.masked_count(0, num_steps=4, num_cells=64, schedule="square")


@pytest.mark.parametrize("schedule,num_steps", [("cosine", 8), ("linear", 4)])
def test_maskgit_sampling_equals_reference_loop(setup, sharp, schedule, num_steps):
  config, _, _, inputs, _ = setup
  model, params, logits_fn = sharp
  kw = dict(num_steps=num_steps, temperature=1.0, choice_temperature=4.5, schedule=schedule)
  expected = _maskgit_loop(logits_fn, inputs, **kw)
  fn = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, order="maskgit", **kw, **inputs))
  np.testing.assert_array_equal(np.asarray(fn(params, jax.random.key(0))[0]), expected)
  assert len(np.unique(expected)) > 1 and expected.max() < config.num_clusters


@pytest.mark.parametrize("order", image_tokens.ORDERS)
def test_guidance_zero_is_plain_decoding(setup, order):
  _, model, params, inputs, _ = setup
  kw = dict(order=order, num_steps=4, temperature=1.0, choice_temperature=2.0, schedule="cosine")
  plain = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, **kw, **inputs))
  guided = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, guidance=0.0, **kw, **inputs,
                                                             **_null(inputs)))
  for a, b in zip(plain(params, jax.random.key(5)), guided(params, jax.random.key(5))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guidance_equals_reference_loop(setup, sharp):
  """w = 3: every pass decodes from (1 + w) * cond - w * uncond logits (the null caption [CLS] [SEP])."""
  inputs = setup[3]
  model, params, logits_fn = sharp
  kw = dict(num_steps=8, temperature=1.0, choice_temperature=4.5, schedule="cosine", guidance=3.0)
  expected = _maskgit_loop(logits_fn, inputs, **kw)
  fn = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, order="maskgit", **kw, **inputs,
                                                         **_null(inputs)))
  np.testing.assert_array_equal(np.asarray(fn(params, jax.random.key(0))[0]), expected)
  assert (expected != _maskgit_loop(logits_fn, inputs, **{**kw, "guidance": 0.0})).mean() > 0.2
  with pytest.raises(ValueError, match="null_text_ids"):
    image_tokens.parallel_decode(params, jax.random.key(0), model=model, order="maskgit", **kw, **inputs)


def test_nearest_centroid_readout_equals_numpy_argmin(setup):
  """readout="nearest_centroid": each pass's logits are -||f - c_k||^2 of the image head's D-wide feature f, and
  the raster decoder (through the registry) takes the nearest centroid of each cell in turn."""
  from bigen_jax.models import apply  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import registry  # pylint: disable=g-import-not-at-top
  config, model, params, inputs, _ = setup

  @jax.jit
  def features(ids, masked, codebook):
    return apply.apply_model(model, params, task="t2i", rng=None,
                             head=lambda module, out: module.image_head(out.vision, with_features=True)[1],
                             text_ids=inputs["text_ids"], text_mask=inputs["text_mask"], boxes=inputs["boxes"],
                             cluster_ids=ids, codebook=codebook, visual_mask=masked)

  # centroids among the features of the blank grid's cells (at init the features are far smaller than the fixture's
  # codebook, whose smallest centroid would be every cell's nearest)
  m = config.num_cells
  blank = np.asarray(features(jnp.zeros((2, m), jnp.int32), jnp.ones((2, m), bool), inputs["codebook"]))
  picked = np.random.default_rng(1).choice(2 * m, config.num_clusters, replace=False)
  inputs = dict(inputs, codebook=jnp.asarray(blank.reshape(2 * m, -1)[picked], jnp.float32))
  codebook = np.asarray(inputs["codebook"], np.float64)

  def distances(ids, masked):
    f = np.asarray(features(jnp.asarray(ids), jnp.asarray(masked), inputs["codebook"]), np.float64)
    return ((f[:, :, None, :] - codebook[None, None]) ** 2).sum(-1)  # [B, M, K]

  ids, masked = np.zeros((2, m), np.int32), np.ones((2, m), bool)
  logits = image_tokens.pass_logits(params, jnp.asarray(ids), jnp.asarray(masked), model=model,
                                    readout="nearest_centroid", **inputs)
  np.testing.assert_allclose(np.asarray(logits), -distances(ids, masked), rtol=1e-4, atol=1e-6)
  for cell in range(m):
    ids[:, cell], masked[:, cell] = distances(ids, masked)[:, cell].argmin(-1), False
  decoder = registry.image_decoder("left_to_right", {"num_steps": m, "readout": "nearest_centroid"})
  decoded = jax.jit(lambda p, r: decoder(p, r, model=model, **inputs)[0])(params, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(decoded), ids)
  assert len(np.unique(ids)) > 1
  classifier = _decode(model, params, inputs, "left_to_right", m)
  assert (classifier != ids).mean() > 0.5  # the untrained classifier reads other clusters


def test_nearest_centroid_readout_needs_a_feature_as_wide_as_the_codebook(setup):
  config, _, _, inputs, _ = setup
  config = config.copy_and_resolve_references()
  config.image_head_dim = 8  # codebook: 16-d
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  with pytest.raises(ValueError, match="nearest-centroid readout needs the image head's feature as wide"):
    image_tokens.parallel_decode(params, jax.random.key(0), model=model, readout="nearest_centroid", **inputs)
  with pytest.raises(ValueError, match="unknown readout"):
    image_tokens.parallel_decode(params, jax.random.key(0), model=model, readout="nearest", **inputs)
