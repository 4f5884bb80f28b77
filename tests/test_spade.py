"""The SPADE GAN: shapes, functional spectral norm, decode_image, losses, a GAN step that learns, the PyTorch
twin."""

import importlib.util
import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigen_jax.models import spade
from bigen_jax.models import spade_losses

CONFIG = spade.spade_config("tiny")
WEIGHTS = dict(CONFIG.loss_weights)


def _grid(batch, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, 8, 8, CONFIG.feature_dim))


def _with_noise_scales(variables, value):
  """G's variables with every noise scale set to ``value`` (they start at zero)."""
  flat = flax.traverse_util.flatten_dict(nn.unbox(variables["params"]))
  flat = {k: jnp.full_like(v, value) if k[-1] == "scale" else v for k, v in flat.items()}
  return dict(variables, params=flax.traverse_util.unflatten_dict(flat))


def test_shapes_and_block_count():
  g_vars = spade.init_generator(CONFIG, jax.random.key(0))
  d_vars = spade.init_discriminator(CONFIG, jax.random.key(1))
  g, d = spade.build_generator(CONFIG), spade.build_discriminator(CONFIG)
  images = jax.jit(lambda v, x: g.apply(v, x, rngs={"noise": jax.random.key(2)}))(g_vars, _grid(2))
  assert images.shape == (2, 32, 32, 3) and float(jnp.max(jnp.abs(images))) <= 1.0
  out = jax.jit(d.apply)(d_vars, images)
  assert out.logits.shape == (2, 8, 8) and out.class_logits.shape == (2, 8, 8, CONFIG.num_clusters)
  assert [f.shape for f in out.features] == [(2, 16, 16, 8), (2, 8, 8, 8)]
  assert [spade.num_blocks(s) for s in (16, 128, 256)] == [1, 4, 5]
  with pytest.raises(ValueError, match="image_size"):
    spade.spade_config("tiny", image_size=48)
  with pytest.raises(KeyError):
    spade.spade_config("tiny", no_such_field=1)
  assert spade.spade_config("demo").feature_dim == 27
  assert spade.param_counts(spade.spade_config()) == dict(generator=1614159, discriminator=984465)


def test_spectral_state_updated_in_training_only():
  g_vars = spade.init_generator(CONFIG, jax.random.key(0))
  g = spade.build_generator(CONFIG)
  apply = jax.jit(lambda v, train: g.apply(v, _grid(2), update_stats=train, mutable=["spectral"],
                                           rngs={"noise": jax.random.key(1)})[1], static_argnums=1)
  train, evaluate = apply(g_vars, True), apply(g_vars, False)
  old = jax.tree.leaves(nn.unbox(g_vars["spectral"]))
  changed = [not np.array_equal(a, b) for a, b in zip(old, jax.tree.leaves(nn.unbox(train["spectral"])))]
  assert len(old) == 1 + 2 * 2 and all(changed)  # one u each: the stem, two convs per block
  for a, b in zip(old, jax.tree.leaves(nn.unbox(evaluate["spectral"]))):
    np.testing.assert_array_equal(a, b)


def test_power_iterations_normalise_the_top_singular_value():
  conv = spade.Conv(6, spectral=True)
  x = jnp.ones((1, 4, 4, 5))
  variables = conv.init(jax.random.key(0), x)
  u = jax.random.normal(jax.random.key(1), (6,))
  variables = dict(params=variables["params"], spectral={"u": u / jnp.linalg.norm(u)})  # a fresh, random u

  @jax.jit
  def step(variables):
    _, state = conv.apply(variables, x, update_stats=True, mutable=["spectral"])
    return dict(variables, spectral=nn.unbox(state["spectral"]))

  for _ in range(40):
    variables = step(variables)
  kernel = nn.unbox(variables["params"])["kernel"]
  normalised = spade.spectral_normalize(kernel, variables["spectral"]["u"])
  top = np.linalg.svd(np.asarray(normalised).reshape(-1, 6), compute_uv=False)[0]
  np.testing.assert_allclose(top, 1.0, rtol=1e-4)
  baked = spade.bake_spectral_norm(variables)["kernel"]
  np.testing.assert_allclose(baked, normalised, rtol=1e-6)


def test_decode_image_deterministic_per_rng():
  g_vars = _with_noise_scales(spade.init_generator(CONFIG, jax.random.key(0)), 0.5)
  decode = jax.jit(spade.decode_image)
  grid = _grid(2)
  a = decode(g_vars, grid, jax.random.key(7))
  assert a.shape == (2, 32, 32, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, decode(g_vars, grid, jax.random.key(7)))
  np.testing.assert_array_equal(a, decode(g_vars, grid.reshape(2, 64, -1), jax.random.key(7)))
  assert float(jnp.max(jnp.abs(a - decode(g_vars, grid, jax.random.key(8))))) > 1e-3
  pixels = spade.to_uint8(a)
  assert pixels.dtype == jnp.uint8
  np.testing.assert_array_equal(spade.to_uint8(jnp.array([-1.0, 0.0, 1.0])), [0, 128, 255])


def _output(logits, class_logits=None, features=()):
  class_logits = jnp.zeros(logits.shape + (2,)) if class_logits is None else class_logits
  return spade.DiscriminatorOutput(logits=jnp.asarray(logits), class_logits=class_logits,
                                   features=tuple(features))


def test_losses_on_known_inputs():
  real, fake = jnp.array([2.0, -0.5]), jnp.array([0.5, -2.0])
  np.testing.assert_allclose(spade_losses.discriminator_hinge_loss(real_logits=real, fake_logits=fake), 1.5)
  np.testing.assert_allclose(spade_losses.generator_hinge_loss(fake_logits=fake), 0.75)
  logits = jnp.log(jnp.array([[[[1.0, 3.0]]], [[[1.0, 1.0]]]]))  # [2, 1, 1, 2]: p(1) = 3/4, then 1/2
  ce = spade_losses.acgan_loss(class_logits=logits, cluster_ids=jnp.array([[1], [0]]))
  np.testing.assert_allclose(ce, (np.log(4 / 3) + np.log(2)) / 2, rtol=1e-6)
  feats = [jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 2, 2, 3))]
  assert float(spade_losses.feature_matching_loss(real_features=feats, fake_features=feats)) == 0.0
  shifted = [feats[0] - 1.0, feats[1] + 2.0]
  np.testing.assert_allclose(spade_losses.feature_matching_loss(real_features=feats, fake_features=shifted), 3.0)

  ids = jnp.array([[0], [1]])
  d_loss, d_metrics = spade_losses.discriminator_loss(real=_output(real[:, None]), fake=_output(fake[:, None]),
                                                      cluster_ids=ids, weights=WEIGHTS)
  np.testing.assert_allclose(d_loss, 1.5 + 2 * np.log(2), rtol=1e-6)  # uniform class logits: CE = log 2 each
  assert set(d_metrics) >= {"hinge", "acgan_real", "acgan_fake"}
  g_loss, g_metrics = spade_losses.generator_loss(
      fake=_output(fake[:, None], features=shifted), real=_output(real[:, None], features=feats),
      cluster_ids=ids, weights=WEIGHTS, perceptual_fn=lambda f, r: jnp.mean(f - r),
      fake_images=jnp.full((2, 4, 4, 3), 0.25), real_images=jnp.zeros((2, 4, 4, 3)))
  np.testing.assert_allclose(g_loss, 0.75 + np.log(2) + 10 * 3.0 + 10 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(g_metrics["perceptual"], 0.25)
  with pytest.raises(ValueError, match="perceptual_fn"):
    spade_losses.generator_loss(fake=_output(fake), real=_output(real), cluster_ids=ids, weights=WEIGHTS,
                                perceptual_fn=lambda f, r: 0.0)
  assert "reconstruction" not in g_metrics  # the paper's weight is 0
  l1_loss, l1_metrics = spade_losses.generator_loss(
      fake=_output(fake[:, None], features=shifted), real=_output(real[:, None], features=feats),
      cluster_ids=ids, weights={**WEIGHTS, "reconstruction": 2.0},
      fake_images=jnp.full((2, 4, 4, 3), 0.25), real_images=jnp.zeros((2, 4, 4, 3)).at[0].set(1.0))
  np.testing.assert_allclose(l1_metrics["reconstruction"], (0.75 + 0.25) / 2, rtol=1e-6)
  np.testing.assert_allclose(l1_loss, 0.75 + np.log(2) + 10 * 3.0 + 2.0 * 0.5, rtol=1e-6)


def test_gan_steps_overfit_the_discriminator():
  """Alternating jitted D and G steps (Adam b1=0, b2=0.999) on one fixed batch: D's hinge loss falls."""
  g, d = spade.build_generator(CONFIG), spade.build_discriminator(CONFIG)
  g_vars = nn.unbox(spade.init_generator(CONFIG, jax.random.key(0)))
  d_vars = nn.unbox(spade.init_discriminator(CONFIG, jax.random.key(1)))
  g_opt, d_opt = optax.adam(1e-3, b1=0.0, b2=0.999), optax.adam(1e-2, b1=0.0, b2=0.999)
  state = (g_vars, d_vars, g_opt.init(g_vars["params"]), d_opt.init(d_vars["params"]))
  grid = _grid(2)
  real = jnp.tanh(jax.random.normal(jax.random.key(3), (2, 32, 32, 3)))
  ids = jax.random.randint(jax.random.key(4), (2, 64), 0, CONFIG.num_clusters)
  noise = jax.random.key(5)

  @jax.jit
  def step(state):
    g_vars, d_vars, g_state, d_state = state
    fake, g_spectral = g.apply(g_vars, grid, update_stats=True, mutable=["spectral"], rngs={"noise": noise})
    fake = jax.lax.stop_gradient(fake)

    def d_loss_fn(params):
      variables = dict(d_vars, params=params)
      real_out, spectral = d.apply(variables, real, update_stats=True, mutable=["spectral"])
      fake_out = d.apply(dict(variables, **spectral), fake, update_stats=False)
      loss, metrics = spade_losses.discriminator_loss(real=real_out, fake=fake_out, cluster_ids=ids,
                                                      weights=WEIGHTS)
      return loss, (metrics, spectral)

    (_, (d_metrics, d_spectral)), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_vars["params"])
    updates, d_state = d_opt.update(grads, d_state)
    d_vars = dict(params=optax.apply_updates(d_vars["params"], updates), **d_spectral)

    def g_loss_fn(params):
      fake = g.apply(dict(g_vars, params=params), grid, rngs={"noise": noise})
      return spade_losses.generator_loss(fake=d.apply(d_vars, fake), real=d.apply(d_vars, real),
                                         cluster_ids=ids, weights=WEIGHTS)[0]

    grads = jax.grad(g_loss_fn)(g_vars["params"])
    updates, g_state = g_opt.update(grads, g_state)
    g_vars = dict(params=optax.apply_updates(g_vars["params"], updates), **g_spectral)
    return (g_vars, d_vars, g_state, d_state), d_metrics["hinge"]

  hinges = []
  for _ in range(20):
    state, hinge = step(state)
    hinges.append(float(hinge))
  assert np.all(np.isfinite(hinges))
  assert np.mean(hinges[-3:]) < 0.9 * hinges[0], hinges


def _torch_spade():
  pytest.importorskip("torch")
  path = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmarks", "torch_spade.py")
  spec = importlib.util.spec_from_file_location("torch_spade", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_torch_twin_matches():
  torch_spade = _torch_spade()
  import torch  # pylint: disable=g-import-not-at-top
  g = spade.build_generator(CONFIG)
  g_vars = _with_noise_scales(spade.init_generator(CONFIG, jax.random.key(0)), 0.3)
  _, spectral = jax.jit(lambda v: g.apply(v, _grid(2), update_stats=True, mutable=["spectral"],
                                          rngs={"noise": jax.random.key(1)}))(g_vars)
  g_vars = dict(g_vars, **spectral)  # u advanced once: the baked sigma is not the init's
  rng = np.random.default_rng(0)
  noise = [rng.normal(size=s).astype(np.float32) for s in spade.noise_shapes(2, 2)]
  grid = np.array(_grid(2, seed=3))
  want = jax.jit(lambda v, x, n: g.apply(v, x, noise=n))(g_vars, grid, noise)
  net = torch_spade.from_flax(g_vars)
  with torch.no_grad():
    got = net(torch.from_numpy(grid).permute(0, 3, 1, 2),
              [torch.from_numpy(n).permute(0, 3, 1, 2) for n in noise]).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)
  assert float(np.max(np.abs(np.asarray(want)))) > 0.05
