r"""The optimiser's update alone (global-norm clipping + AdamW with the weight-decay mask) over a model config's
parameter tree: ours (``optim.make_optimizer``) vs PyTorch's ``clip_grad_norm_`` + ``torch.optim.AdamW`` on
tensors of the same shapes, and optax's own ``clip_by_global_norm`` + ``adamw`` for reference.

  python scripts/benchmarks/bench_optimizer.py --config paper --threads 1

JAX: one jitted update with the parameters and the optimiser state donated (as the trainer's step).
PyTorch: the gradients set once, then ``clip_grad_norm_`` and ``step()`` (its default CPU implementation).
Prints milliseconds per update of each (median) and ours / PyTorch as a rate ratio (> 1: ours faster).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import timing  # pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_enum("config", "paper", ["tiny", "small", "paper"], "Model config (configs/model.py).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed updates.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed updates first (compilation).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")

OPTIMIZER = ml_collections.ConfigDict(dict(lr=5e-5, schedule="constant", b1=0.9, b2=0.999, eps=1e-6,
                                           weight_decay=1e-2, clip_norm=1.0))


def _shapes(config_name: str) -> dict:
  """The model's parameter tree as ShapeDtypeStructs (unscanned layout)."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  config = model_configs.get_config(config_name)
  config.scan_layers, config.dtype = False, "float32"
  model = lxmert.build_model(config)
  return jax.eval_shape(lambda: nn.unbox(lxmert.init_params(model, config, jax.random.key(0))))


def bench_jax(shapes, tx) -> float:
  """Updates/s of ``tx`` over ``shapes`` with donated state."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
  grads = jax.tree.map(lambda s: jnp.full(s.shape, 1e-3, s.dtype), shapes)
  state = [params, tx.init(params)]

  def update(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  update = jax.jit(update, donate_argnums=(0, 1))

  def run():
    state[0], state[1] = update(state[0], state[1], grads)
    jax.block_until_ready(state)

  return timing.steps_per_second(run, steps=_STEPS.value, warmup=_WARMUP.value)


def bench_torch(shapes) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax import optim  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(shapes)
  decay = jax.tree.leaves(optim.decay_mask(shapes))
  params = [torch.nn.Parameter(torch.full(s.shape, 0.01)) for s in leaves]
  for p in params:
    p.grad = torch.full_like(p, 1e-3)
  groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": OPTIMIZER.weight_decay},
            {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=OPTIMIZER.lr, betas=(OPTIMIZER.b1, OPTIMIZER.b2), eps=OPTIMIZER.eps)

  def run():
    torch.nn.utils.clip_grad_norm_(params, OPTIMIZER.clip_norm)
    opt.step()

  return timing.steps_per_second(run, steps=_STEPS.value, warmup=_WARMUP.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  shapes = _shapes(_CONFIG.value)
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bigen_jax import optim  # pylint: disable=g-import-not-at-top
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  print(f"config={_CONFIG.value} ({count / 1e6:.1f}M parameters) threads={threads}")
  torch_rate = bench_torch(shapes)
  ours = bench_jax(shapes, optim.make_optimizer(OPTIMIZER, 10)[0])
  optax_tx = optax.chain(optax.clip_by_global_norm(OPTIMIZER.clip_norm),
                         optax.adamw(OPTIMIZER.lr, b1=OPTIMIZER.b1, b2=OPTIMIZER.b2, eps=OPTIMIZER.eps,
                                     weight_decay=OPTIMIZER.weight_decay, mask=optim.decay_mask))
  reference = bench_jax(shapes, optax_tx)
  print(f"ours (optim.make_optimizer):        {1e3 / ours:8.1f} ms/update")
  print(f"optax clip_by_global_norm + adamw:  {1e3 / reference:8.1f} ms/update")
  print(f"torch clip_grad_norm_ + AdamW:      {1e3 / torch_rate:8.1f} ms/update")
  print(f"ours / torch = {ours / torch_rate:.2f}x; ours / optax's = {ours / reference:.2f}x")
  timing.write_result(_JSON.value, ours=ours, peer=torch_rate, unit="updates/s",
                      optax=timing.result(ours=ours, peer=reference, unit="updates/s"))


if __name__ == "__main__":
  app.run(main)
