"""Optimiser from config: the paper's schedule and the weight-decay mask."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bigen_jax import optim


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(lr=5e-5, schedule="warmup_cosine", warmup_fraction=0.05, b1=0.9,
                                       b2=0.999, eps=1e-6, weight_decay=1e-2, clip_norm=1.0))
  cfg.update(kw)
  return cfg


def test_warmup_cosine_schedule():
  _, sched = optim.make_optimizer(_cfg(), total_steps=1000)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(25)), 2.5e-5, rtol=1e-6)  # linear warm-up over 50 steps
  np.testing.assert_allclose(float(sched(50)), 5e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(525)), 2.5e-5, rtol=1e-4)  # half-way through the cosine
  assert float(sched(1000)) < 1e-12


def test_constant_and_bad_schedule():
  _, sched = optim.make_optimizer(_cfg(schedule="constant", lr=1e-6), total_steps=10)
  assert float(sched(0)) == float(sched(9)) == pytest.approx(1e-6)
  with pytest.raises(ValueError, match="optimizer.schedule"):
    optim.make_optimizer(_cfg(schedule="linear"), total_steps=10)


def test_decay_mask_and_update():
  params = {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "ln": {"scale": jnp.ones(3)},
            "emb": {"embedding": jnp.ones((5, 3))}}
  mask = optim.decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
                  "emb": {"embedding": True}}
  tx, _ = optim.make_optimizer(_cfg(schedule="constant", lr=0.1, weight_decay=0.5), total_steps=10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.05)  # decay only: -lr * wd * w
  np.testing.assert_allclose(updates["dense"]["bias"], 0.0)



@pytest.mark.parametrize("scale", [0.1, 30.0])  # global norm below and above clip_norm = 1
def test_clipping_equals_optax(scale):
  """The one-multiply clipping (fast on XLA CPU) equals optax.clip_by_global_norm, below and above the norm,
  and the whole optimiser equals optax's clip + adamw over a few steps."""
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)
  ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
  assert float(optax.tree.norm(ours)) == pytest.approx(min(1.0, float(optax.tree.norm(grads))), rel=1e-5)
  cfg = _cfg(schedule="constant", lr=0.1)
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                                               weight_decay=cfg.weight_decay, mask=optim.decay_mask))
  p, q, s, t = params, params, tx.init(params), ref.init(params)
  for _ in range(3):
    u, s = tx.update(grads, s, p)
    v, t = ref.update(grads, t, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, q)
