"""What the task losses share: picking the visual input, calling the model, smoothed cross-entropy."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bigen_jax.models import lxmert

Array = jax.Array


def visual_input(batch: dict[str, Array], kind: str, frozen: dict[str, Any]) -> dict[str, Array]:
  """Model keyword arguments for the visual input ``kind``: "dense" features or "discrete" cluster ids."""
  if kind == "dense":
    return {"visual_feats": batch["dense"]}
  if kind == "discrete":
    return {"cluster_ids": batch["cluster_ids"], "codebook": frozen["codebook"]}
  raise ValueError(f"visual_input {kind!r}: expected 'dense' or 'discrete'")


def apply_model(model, params, *, task: str, rng: Array | None, head: Callable[[Any, Any], Array],
                **inputs) -> Array:
  """Runs ``model`` on ``inputs`` and ``head(module, ModelOutput)`` inside one ``apply``.

  Heads are applied only where a loss needs them (e.g. the one [MASK] position of I2T), not over every
  position. ``rng`` None means deterministic (no dropout). With the two-model ablation ``task`` picks the
  model.
  """
  two_model = isinstance(model, lxmert.TwoModel)
  task_kw = {"task": task} if two_model else {}

  def forward(module, **kw):
    out = module(**kw, **task_kw)
    sub = getattr(module, task) if two_model else module
    return head(sub, out)

  rngs = {} if rng is None else {"dropout": rng}
  return model.apply({"params": params}, method=forward, rngs=rngs, deterministic=rng is None, **inputs)


def cross_entropy(logits: Array, targets: Array, weights: Array, *, label_smoothing: float
                  ) -> tuple[Array, dict[str, Array]]:
  """Weighted mean of (label-smoothed) cross-entropy and accuracy. logits [..., C], targets/weights [...]."""
  logits = logits.astype(jnp.float32)
  labels = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  losses = optax.softmax_cross_entropy(logits, labels)
  weights = weights.astype(jnp.float32)
  denom = jnp.maximum(weights.sum(), 1.0)
  loss = (losses * weights).sum() / denom
  accuracy = ((logits.argmax(-1) == targets) * weights).sum() / denom
  return loss, {"loss": loss, "accuracy": accuracy}
