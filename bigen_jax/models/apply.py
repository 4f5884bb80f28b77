"""Calling the model: its visual input of a batch, and one ``apply`` that runs the encoders and a head.

Training tasks, decoders and evaluators all call the model through ``apply_model``; caption decoders first run
the image's vision stream once (``encode_vision``) and pass it to every step's ``apply_model``.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from bigen_jax.models import lxmert

Array = jax.Array


def visual_input(batch: dict[str, Array], kind: str, frozen: dict[str, Any]) -> dict[str, Array]:
  """Model keyword arguments for the visual input ``kind``: "dense" features or "discrete" cluster ids."""
  if kind == "dense":
    return {"visual_feats": batch["dense"]}
  if kind == "discrete":
    return {"cluster_ids": batch["cluster_ids"], "codebook": frozen["codebook"]}
  raise ValueError(f"visual_input {kind!r}: expected 'dense' or 'discrete'")


def causal_attention(real: Array) -> Array:
  """bool [B, L, L]: query i sees key j when j <= i and both are real (``real`` bool [B, L])."""
  length = real.shape[1]
  lower = jnp.tril(jnp.ones((length, length), bool))
  return lower[None] & real[:, :, None] & real[:, None, :]


def cls_only(shape: tuple[int, int]) -> Array:
  """int32 ``shape`` [B, L]: 1 at position 0 ([CLS]), the only word I2T's visual cells see in the causal
  layout (``tasks.layouts.i2t_causal_inputs``)."""
  return jnp.broadcast_to(jnp.arange(shape[1]) == 0, shape).astype(jnp.int32)


DROPOUT_RNGS = ("threefry", "rbg")


def dropout_key(rng: Array, impl: str) -> Array:
  """The key the model's dropout masks are drawn from: ``rng`` itself ("threefry"), or an XLA RngBitGenerator
  key seeded by ``rng``'s bits ("rbg"; ``configs/model.py:dropout_rng``)."""
  if impl == "threefry":
    return rng
  if impl == "rbg":
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
  raise ValueError(f"model.dropout_rng {impl!r}: expected one of {DROPOUT_RNGS}")


def first_model(model) -> lxmert.UnifiedTransformer:
  """``model`` itself, or its I2T half for the two-model ablation (both halves share the config)."""
  return model.i2t if isinstance(model, lxmert.TwoModel) else model


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

  rngs = {} if rng is None else {"dropout": dropout_key(rng, first_model(model).spec.dropout_rng)}
  return model.apply({"params": params}, method=forward, rngs=rngs, deterministic=rng is None, **inputs)


def can_encode_vision(model) -> bool:
  """Whether the I2T model's vision stream depends on the image alone (not with ``caption_to_cells``), so that
  ``encode_vision`` can compute it once for many captions' forward passes."""
  return not first_model(model).caption_to_cells


def encode_vision(model, params, *, task: str, boxes: Array, **visual) -> Array:
  """The vision stream [B, M, H] before the cross-modality layers (``UnifiedTransformer.encode_vision``), no
  dropout: ``apply_model(..., vision_encoder=it)`` then skips the visual embedding and vision layers. ``visual``:
  the model's visual input (``visual_input``); boxes [B, M, 4]. With the two-model ablation ``task`` picks the
  model."""
  task_kw = {"task": task} if isinstance(model, lxmert.TwoModel) else {}
  return model.apply({"params": params}, boxes, method="encode_vision", deterministic=True, **visual, **task_kw)
