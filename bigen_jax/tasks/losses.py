"""What the task losses share: label-smoothed cross-entropy with its accuracy."""

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


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
