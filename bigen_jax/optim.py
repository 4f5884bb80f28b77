"""The optimiser of METHOD.md §3-4 from config: AdamW, warm-up + cosine (stage 1) or constant (stage 2),
global-norm clipping, no weight decay on biases and LayerNorm scales (as in BERT/LXMERT)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bigen_jax import errors


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """``cfg.schedule``: "warmup_cosine" (linear 0 -> lr over ``warmup_fraction``, cosine to 0), "warmup_linear"
  (linear 0 -> lr, then linear to 0 at ``total_steps``: LXMERT's BertAdam) or "constant"."""
  warmup = max(1, int(round(cfg.get("warmup_fraction", 0.0) * total_steps)))
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
                                              decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if cfg.schedule == "warmup_linear":
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                 optax.linear_schedule(cfg.lr, 0.0, max(total_steps - warmup, 1))], [warmup])
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.lr)
  raise errors.ConfigError(f"--config.optimizer.schedule={cfg.schedule!r}: use 'warmup_cosine', 'warmup_linear' or "
                           "'constant'")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the gradients by min(1, max_norm / global norm): ``optax.clip_by_global_norm``'s result (equal where
  the norm is below ``max_norm``, within rounding where it clips), written as one multiply. optax's
  ``lax.select`` between the clipped and unclipped trees keeps XLA's CPU backend from fusing the clipping into
  the AdamW update: at the paper config (231M parameters) clipping + AdamW took 716 ms on one core against
  280 ms for this form (``scripts/benchmarks/bench_optimizer.py``)."""
  def update_fn(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def decay_mask(params: Any) -> Any:
  """True for weight matrices and embeddings; False for biases and normalisation scales."""
  def keep(path, leaf):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return leaf.ndim > 1 and not any(n in ("bias", "scale") for n in names[-1:])
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                               optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) for ``cfg`` = ``config.optimizer``."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm:
    parts.append(clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
