"""``loop.compile_ahead``: every step kind of a schedule compiled before the first step (XLA's compiles in parallel
threads), and ``jax.jit`` reusing those programs: the steps then run without compiling again, with the same
results as steps compiled on their first call."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from bigen_jax import loop


def _steps():
  def update(sign):
    def step(state, batch, scale):
      new = state + sign * scale * jnp.tanh(batch @ batch.T).sum()
      return new, {"loss": new.sum()}
    return jax.jit(step, donate_argnums=(0,))
  return {"up": loop.BoundStep(update(1.0), (jnp.float32(0.5),)), "down": loop.BoundStep(update(-2.0), (1.0,))}


def _run(steps, state, batch, cycle):
  for name in cycle:
    state, _ = steps[name](state, batch)
  return state


def test_steps_compiled_ahead_run_without_compiling_and_give_the_same_state(caplog):
  batch, cycle = jnp.arange(12.0).reshape(3, 4) / 10, ["up", "down", "up"]
  want = _run(_steps(), jnp.zeros(5), batch, cycle)
  steps = _steps()
  state = jnp.zeros(5)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    loop.compile_ahead(steps, cycle, state, batch)
    ahead = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    caplog.clear()
    got = _run(steps, state, batch, cycle)
    again = [r.getMessage() for r in caplog.records if "compil" in r.getMessage().lower()]
  assert len(ahead) == 2, [r.getMessage()[:90] for r in caplog.records]
  assert not again, again
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
