"""Visual question answering, X-LXMERT's (and LXMERT's) QA objective (METHOD.md §7) and its VQA fine-tuning.

The question replaces the caption as the text input, the image is whole and nothing is masked; the model's answer
head on the pooled output (``model.num_answers`` answers) scores every answer against the soft target (VQA's
scores in [0, 1]; one-hot for single-answer sources). ``loss`` "bce" (LXMERT's VQA fine-tuning): sigmoid binary
cross-entropy summed over the answers, mean over the questions; "softmax" (pretraining): cross-entropy against the
target normalised to a distribution, mean over the questions that have an answer in the table. Rows without a
question (``question_type`` -1: an image without questions, evaluation padding) count nowhere.
"""

import jax
import jax.numpy as jnp
import optax

from bigen_jax import errors
from bigen_jax.models import apply

Array = jax.Array
QUESTION_FIELDS = ("question_ids", "question_mask", "answer_target", "question_type")
LOSSES = ("bce", "softmax")


def _mean(x: Array, weights: Array) -> Array:
  return (x * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def answer_loss(logits: Array, target: Array, valid: Array, *, loss: str) -> Array:
  """The QA loss of ``logits`` [B, A] against soft ``target`` [B, A] over the rows of ``valid`` bool [B]
  (``loss`` "bce" or "softmax", see above)."""
  logits, target, valid = logits.astype(jnp.float32), target.astype(jnp.float32), valid.astype(jnp.float32)
  if loss == "bce":
    return _mean(optax.sigmoid_binary_cross_entropy(logits, target).sum(-1), valid)
  if loss == "softmax":
    mass = target.sum(-1)
    labels = target / jnp.maximum(mass, 1e-12)[:, None]
    return _mean(optax.softmax_cross_entropy(logits, labels), valid * (mass > 0))
  raise errors.ConfigError(f"--config.tasks.qa.loss={loss!r}: expected one of {LOSSES}")


def answer_metrics(logits: Array, target: Array, valid: Array) -> dict[str, Array]:
  """Over the rows of ``valid`` [B]: score, the mean soft target at the argmax answer (VQA accuracy); accuracy,
  how often the argmax is the target's argmax."""
  best = jnp.argmax(logits, axis=-1)
  score = jnp.take_along_axis(target.astype(jnp.float32), best[:, None], axis=1)[:, 0]
  valid = valid.astype(jnp.float32)
  return {"score": _mean(score, valid), "accuracy": _mean(best == jnp.argmax(target, axis=-1), valid)}


def answer_logits(model, params, batch, *, visual_input: str, frozen, rng: Array | None = None) -> Array:
  """Answer logits [B, A] float32 of the answer head on the pooled output, the question as the text input and the
  image whole (``visual_input`` "dense" or "discrete"; ``rng`` None: no dropout). The one forward pass of QA's
  loss, its evaluator and ``scripts/qa_type_probe.py``."""
  return apply.apply_model(
      model, params, task="i2t", rng=rng, head=lambda module, out: module.predict_answer(out.pooled),
      text_ids=batch["question_ids"], text_mask=batch["question_mask"], boxes=batch["boxes"],
      **apply.visual_input(batch, visual_input, frozen))


def loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False):
  """batch: question_ids/question_mask int32 [B, L], answer_target float32 [B, A], question_type int32 [B] (-1: no
  question), dense [B, M, D] or cluster_ids [B, M], boxes [B, M, 4].

  cfg: loss ("bce" or "softmax"), visual_input. Returns (loss, metrics: loss, score, accuracy).
  """
  missing = [k for k in QUESTION_FIELDS if k not in batch]
  if missing:
    raise errors.ConfigError(f"tasks.qa needs batches with questions ({missing} missing): set "
                             "--config.data.questions=True, with records that hold questions")
  logits = answer_logits(model, params, batch, visual_input=cfg.visual_input, frozen=frozen,
                         rng=None if deterministic else rng)
  target = batch["answer_target"]
  if target.shape[-1] != logits.shape[-1]:
    raise errors.ConfigError(f"--config.model.num_answers={logits.shape[-1]} but the batches' answer_target has "
                             f"{target.shape[-1]} answers")
  valid = batch["question_type"] >= 0
  loss = answer_loss(logits, target, valid, loss=cfg.loss)
  return loss, {"loss": loss, **answer_metrics(logits, target, valid), "questions": valid.mean()}
