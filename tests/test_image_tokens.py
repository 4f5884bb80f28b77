"""T2I decoding: the compiled ``parallel_decode`` equals plain Python loops with the model, per order."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from bigen_jax.models import lxmert
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


def test_random_order_and_sampling_are_seeded(setup):
  config, model, params, inputs, probs = setup
  fn = jax.jit(lambda p, r: image_tokens.parallel_decode(p, r, model=model, order="random", temperature=1.0,
                                                         **inputs)[0])
  a, b = np.asarray(fn(params, jax.random.key(1))), np.asarray(fn(params, jax.random.key(2)))
  np.testing.assert_array_equal(a, np.asarray(fn(params, jax.random.key(1))))
  assert (a != b).any() and a.min() >= 0 and a.max() < config.num_clusters
  with pytest.raises(ValueError, match="decoding order"):
    image_tokens.parallel_decode(params, jax.random.key(0), model=model, order="spiral", **inputs)
