"""Question answering evaluation: VQA accuracy of the model's answer head on every (image, question) pair of the
eval split, overall and per question type, beside the majority-answer baseline of each type.

Every process reads its rows of each global batch (``qa_pipeline.QuestionEvalIterator``: every question of the
first ``num_examples`` records of ``config.data.eval_split``, 0: all) and runs the answer head (jitted, the params
an argument, no dropout) on them; its argmax is the predicted answer. Each process scores its questions a batch at a
time (``qa_accuracy.vqa_accuracy``; host memory stays one batch of soft targets), and the majority answer of their
types from the answer vocabulary file (``qa_accuracy.majority_baseline``); the figures of every batch and process are
merged weighted by their question counts (``merge``), so every process returns the whole split's. Process 0 writes
``workdir/eval/qa_<step>.md`` (type | questions | accuracy | majority baseline) and ``qa_<step>.json``.

Metrics: ``qa/accuracy``, ``qa/num_questions``, ``qa/majority/accuracy`` and per type ``qa/accuracy/<type>``,
``qa/num_questions/<type>``, ``qa/majority/accuracy/<type>``. Config ``config.eval.qa``: batch_size (per device),
num_examples. The model needs an answer head (``model.num_answers``) over the answer vocabulary of
``config.data.answers_file`` ("" = RECORDS_DIR/answers.json); the visual input is ``tasks.qa.visual_input``.
"""

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax.data import qa_pipeline
from bigen_jax.eval import eval_set
from bigen_jax.eval import qa_accuracy
from bigen_jax.tasks import qa as qa_task

NAME = "qa"
MODEL_FIELDS = ("question_ids", "question_mask", "dense", "boxes", "cluster_ids")
DEFAULTS = {"batch_size": 64, "num_examples": 0}


def settings(config) -> dict[str, int]:
  """``config.eval.qa`` with ``DEFAULTS`` for fields it lacks (configs saved before the evaluator existed)."""
  block = config.eval.get("qa") or {}
  return {k: block.get(k, v) for k, v in DEFAULTS.items()}


def merge(parts: list[dict[str, float]]) -> dict[str, float]:
  """Per-process ``vqa_accuracy`` results -> the whole set's: accuracies weighted by their question counts."""
  out = {}
  for key in {k for p in parts for k in p if k.startswith("num_questions")}:
    acc_key = "accuracy" + key[len("num_questions"):]
    total = sum(p.get(key, 0) for p in parts)
    out[key] = total
    out[acc_key] = sum(p[acc_key] * p[key] for p in parts if p.get(key)) / total if total else 0.0
  return out


def _fetched(local: dict[str, np.ndarray], ids: list[jax.Array]) -> dict[str, np.ndarray]:
  return {"prediction": np.concatenate(jax.device_get(ids)),
          **{k: local[k] for k in ("answer_target", "question_type", "valid")}}


def markdown_table(results: dict[str, float], type_names: list[str], step: int) -> str:
  """``| type | questions | accuracy | majority baseline |`` rows: every type with questions, then all."""
  lines = [f"| type (step {step}) | questions | accuracy | majority baseline |", "|---|---|---|---|"]
  for name in [t for t in type_names if f"num_questions/{t}" in results] + [None]:
    suffix = "" if name is None else f"/{name}"
    lines.append(f"| {name or 'all'} | {int(results['num_questions' + suffix])} | "
                 f"{results['accuracy' + suffix]:.4f} | {results['majority/accuracy' + suffix]:.4f} |")
  return "\n".join(lines) + "\n"


class Evaluator:
  """``qa/...``: see the module docstring."""

  def __init__(self, ctx):
    self.ctx = ctx
    config = ctx.config
    self.cfg = settings(config)
    num_answers = config.model.get("num_answers", 0)
    if num_answers <= 0:
      raise errors.ConfigError(f"the qa evaluator needs a model with an answer head: --config.model.num_answers="
                               f"{num_answers} (-1: the answer vocabulary's size, with --config.data.questions=True)")
    self.data = qa_pipeline.QuestionEvalIterator(
        records_dir=config.data.records_dir, split=config.data.eval_split,
        global_batch_size=eval_set.global_batch_size(ctx, self.cfg["batch_size"]),
        answers_file=config.data.get("answers_file", ""), vocab_dir=config.data.vocab_dir,
        pad_id=ctx.tokenizer.pad_id, num_examples=self.cfg["num_examples"])
    self.vocab = self.data.vocab
    if not self.data.num_questions:
      raise errors.UserError(f"split {config.data.eval_split!r} of {config.data.records_dir} has no questions to "
                             "evaluate")
    if self.vocab.num_answers != num_answers:
      raise errors.ConfigError(
          f"--config.model.num_answers={num_answers} but the answer vocabulary "
          f"{qa_pipeline.answers_path(config.data.records_dir, config.data.get('answers_file', ''))} has "
          f"{self.vocab.num_answers} answers")
    qa_task = config.tasks.get("qa")
    self.visual_kind = qa_task.visual_input if qa_task is not None else config.tasks.i2t.visual_input
    logits = self._logits_fn()
    self.answer_logits = jax.jit(logits, out_shardings=ctx.batch_sharding())  # [B, A] (tests read it)
    self._predict = jax.jit(lambda params, batch: jnp.argmax(logits(params, batch), axis=-1),
                            out_shardings=ctx.batch_sharding())

  def _logits_fn(self):
    ctx, kind = self.ctx, self.visual_kind

    def logits(params, batch):
      """question_ids/question_mask [B, L], boxes [B, M, 4], dense or cluster_ids -> answer logits [B, A]."""
      return qa_task.answer_logits(ctx.model, params, batch, visual_input=kind, frozen=ctx.frozen)

    return logits

  def batches(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
    """(this process's numpy rows, the global batch the model reads) of every evaluation batch."""
    for batch in self.data:
      yield batch, self.ctx.batch_to_global(batch, MODEL_FIELDS)

  def rows(self, params) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows, a batch at a time: ``prediction`` int [b] (the argmax answer), ``answer_target``
    float32 [b, A], ``question_type`` int32 [b], ``valid`` bool [b] (False: padding). A batch's predictions are
    fetched once the next batch is on its way (no wait for the host between batches)."""
    pending = None
    for local, batch in self.batches():
      ids = eval_set.own_rows(self._predict(params, batch))
      if pending is not None:
        yield _fetched(*pending)
      pending = (local, ids)
    if pending is not None:
      yield _fetched(*pending)

  def scores(self, rows: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``vqa_accuracy`` of ``rows`` (one of ``self.rows``) and the majority baseline's, unprefixed."""
    common = dict(targets=rows["answer_target"], types=rows["question_type"], type_names=self.vocab.types,
                  valid=rows["valid"])
    return {"model": qa_accuracy.vqa_accuracy(predictions=rows["prediction"], **common),
            "majority": qa_accuracy.majority_baseline(answers=self.vocab.answers, majority=self.vocab.majority,
                                                      **common)}

  def run(self, params, *, step: int) -> dict[str, Any]:
    parts = [self.scores(rows) for rows in self.rows(params)]
    parts = eval_set.gather_json([{k: merge([p[k] for p in parts]) for k in ("model", "majority")}])
    model, majority = merge([p["model"] for p in parts]), merge([p["majority"] for p in parts])
    results = {**model, **{f"majority/{k}": v for k, v in majority.items() if k.startswith("accuracy")}}
    if self.ctx.workdir and jax.process_index() == 0:
      fileio.write_atomic(fileio.join(self.ctx.workdir, "eval", f"{NAME}_{step}.md"),
                          markdown_table(results, list(self.vocab.types), step))
      fileio.write_json_atomic(fileio.join(self.ctx.workdir, "eval", f"{NAME}_{step}.json"), results)
    return {f"{NAME}/{k}": float(v) for k, v in results.items()}
