"""The ``qa`` evaluator (VQA accuracy of the answer head per question type, the majority baseline) against numpy
on the logits it read, and ``init_from`` of a pretraining run whose params hold heads a stage-1 model lacks."""

import logging
import os

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from bigen_jax import experiment
from bigen_jax import optim
from bigen_jax import state as state_lib
from bigen_jax import train
from bigen_jax.data import answers
from bigen_jax.eval import qa
from bigen_jax.eval import registry
from bigen_jax.models import lxmert
from configs import demo
from configs import xlxmert_pretrain
from conftest import write_training_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Records with questions (``conftest.qa_fixture``), their visual vocabulary, a WordPiece vocabulary and the
  counted answer vocabulary."""
  root = str(tmp_path_factory.mktemp("qa_eval"))
  data = write_training_data(root, splits={"train": 24, "validation": 11}, questions=True, words=300)
  return {**data, "root": root}


def _pretrain_config(data, **overrides):
  config = xlxmert_pretrain.get_config("tiny")
  config.update_from_flattened_dict({
      "data.records_dir": data["records_dir"], "data.vocab_dir": data["vocab_dir"],
      "data.tokenizer": data["tokenizer"], **overrides})
  return config


@pytest.fixture(scope="module")
def evaluator(data):
  """(ctx, qa evaluator, params) of the tiny X-LXMERT model on 2 devices, 3 questions per device and batch."""
  config = _pretrain_config(data, **{"mesh.num_devices": 2, "eval.qa.batch_size": 3})
  ctx = experiment.build_context(config, os.path.join(data["root"], "eval_run"))
  params = nn.unbox(lxmert.init_params(ctx.model, ctx.config.model, jax.random.key(1)))
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    ev = registry.create("qa", ctx)
  return ctx, ev, params


def _numpy_accuracy(scores, types, names):
  out = {"accuracy": scores.mean()}
  out.update({f"accuracy/{n}": scores[types == t].mean() for t, n in enumerate(names) if (types == t).any()})
  return out


def test_accuracy_equals_numpy_on_the_same_logits(evaluator):
  ctx, ev, params = evaluator
  logits, targets, types, valid = [], [], [], []
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    for local, batch in ev.batches():
      logits.append(np.asarray(ev.answer_logits(params, batch)))
      targets.append(local["answer_target"])
      types.append(local["question_type"])
      valid.append(local["valid"])
    results = ev.run(params, step=3)
  logits, targets, types, valid = (np.concatenate(x) for x in (logits, targets, types, valid))
  assert valid.sum() == ev.data.num_questions > 0 and not valid.all()  # 11 records' questions, padded to 6s
  targets, types, logits = targets[valid].astype(np.float64), types[valid], logits[valid]
  names = ev.vocab.types
  model = _numpy_accuracy(targets[np.arange(len(targets)), logits.argmax(-1)], types, names)
  majority_ids = np.asarray([ev.vocab.answers.index(ev.vocab.majority[t]) for t in names])
  baseline = _numpy_accuracy(targets[np.arange(len(targets)), majority_ids[types]], types, names)

  for key, value in model.items():
    np.testing.assert_allclose(results[f"qa/{key}"], value, rtol=1e-12, err_msg=key)
  for key, value in baseline.items():
    np.testing.assert_allclose(results[f"qa/majority/{key}"], value, rtol=1e-12, err_msg=key)
  assert results["qa/num_questions"] == valid.sum()
  assert sum(results[f"qa/num_questions/{n}"] for n in names if f"qa/num_questions/{n}" in results) == valid.sum()
  with open(os.path.join(ctx.workdir, "eval", "qa_3.md")) as f:
    table = f.read()
  assert "| type (step 3) | questions | accuracy | majority baseline |" in table
  assert f"| all | {int(valid.sum())} | {results['qa/accuracy']:.4f} | {results['qa/majority/accuracy']:.4f} |" in table


def test_a_head_rigged_to_the_majority_answer_scores_the_baseline(data, evaluator, tmp_path):
  """Every type's majority answer set to the overall one (answers.json's ``majority``), and the answer head's
  classifier to always answer it: the model's accuracy is the baseline's, type by type."""
  ctx, ev, params = evaluator
  table = answers.load_answer_vocab(answers.default_path(data["records_dir"]))
  top = table.meta["overall_majority"]
  rigged_vocab = answers.AnswerVocab(answers=table.answers, types=table.types, majority={t: top for t in table.types},
                                     meta=table.meta)
  path = str(tmp_path / "answers.json")
  rigged_vocab.save(path)
  config = _pretrain_config(data, **{"mesh.num_devices": 2, "eval.qa.batch_size": 3, "data.answers_file": path})
  rigged_ctx = experiment.build_context(config, str(tmp_path / "run"))
  head = params["answer_head"]["classifier"]
  bias = np.zeros(head["bias"].shape, np.float32)
  bias[table.answers.index(top)] = 10.0
  rigged = dict(params, answer_head=dict(params["answer_head"], classifier={
      "kernel": np.zeros(head["kernel"].shape, np.float32), "bias": bias}))
  with jax.set_mesh(rigged_ctx.mesh), nn.logical_axis_rules(rigged_ctx.rules):
    results = qa.Evaluator(rigged_ctx).run(rigged, step=0)
  accuracies = {k: v for k, v in results.items() if k.startswith("qa/accuracy")}
  assert len(accuracies) > 2
  for key, value in accuracies.items():
    assert value == results[key.replace("qa/accuracy", "qa/majority/accuracy")], key


def test_needs_an_answer_head(data):
  from bigen_jax import errors  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.update_from_flattened_dict({"data.records_dir": data["records_dir"], "data.vocab_dir": data["vocab_dir"],
                                     "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1})
  ctx = experiment.build_context(config, os.path.join(data["root"], "no_head"))
  with pytest.raises(errors.ConfigError, match="--config.model.num_answers=0"):
    qa.Evaluator(ctx)


def test_merge_weights_by_question_counts():
  parts = [{"accuracy": 0.5, "num_questions": 2, "accuracy/a": 0.5, "num_questions/a": 2},
           {"accuracy": 1.0, "num_questions": 6, "accuracy/a": 1.0, "num_questions/a": 1, "accuracy/b": 1.0,
            "num_questions/b": 5},
           {"accuracy": 0.0, "num_questions": 0}]
  merged = qa.merge(parts)
  assert merged == {"accuracy": 7 / 8, "num_questions": 8, "accuracy/a": 2 / 3, "num_questions/a": 3,
                    "accuracy/b": 1.0, "num_questions/b": 5}


def test_stage_one_starts_from_a_pretraining_run_with_other_heads(data, tmp_path, caplog):
  """A 2-step X-LXMERT pretraining run (answer head, one shared cross-attention module) as ``init_from`` of a
  stage-1 model without an answer head, with a cross-attention module per direction and a code-bag head: the
  shared params come from the run, the vision cross-attention from its shared module, the code-bag head from the
  fresh init; the answer head is left out, and the log lists each."""
  run = str(tmp_path / "pretrain")
  train.train_and_evaluate(_pretrain_config(data, **{
      "mesh.num_devices": 1, "total_steps": 2, "checkpoint.every": 2}), run)
  config = demo.get_config("tiny")
  config.update_from_flattened_dict({
      "data.records_dir": data["records_dir"], "data.vocab_dir": data["vocab_dir"],
      "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1, "init_from": run,
      "model.shared_cross_attention": False, "model.code_bag_head": "features"})
  ctx = experiment.build_context(config, str(tmp_path / "stage1"))
  tx, _ = optim.make_optimizer(ctx.config.optimizer, ctx.config.total_steps)
  _, _, init = state_lib.create_state(ctx, tx, ctx.vocab.codebook)
  with caplog.at_level(logging.WARNING):
    params = flax.traverse_util.flatten_dict(jax.device_get(init(jax.random.key(ctx.config.seed)).params))
  from bigen_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(f"{run}/checkpoints", save_every=1, async_save=False, create=False)
  shapes = ckpt.param_shapes()
  saved, _ = ckpt.restore_params(flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}))
  ckpt.close()
  saved = flax.traverse_util.flatten_dict(jax.device_get(saved))
  fresh = flax.traverse_util.flatten_dict(jax.device_get(nn.unbox(lxmert.init_params(
      ctx.model, ctx.config.model, jax.random.split(jax.random.key(ctx.config.seed))[0]))))
  assert any(k[0] == "answer_head" for k in saved) and not any(k[0] == "answer_head" for k in params)
  vision = [k for k in params if "vision_cross_attention" in k]
  assert vision and not any("vision_cross_attention" in k for k in saved)
  for key, value in params.items():
    if key[0] == "code_bag_head":
      np.testing.assert_allclose(value, fresh[key], rtol=1e-5, err_msg=str(key))  # jitted init: last bits differ
    else:
      source = tuple("cross_attention" if p == "vision_cross_attention" else p for p in key)
      np.testing.assert_array_equal(value, saved[source], err_msg=str(key))
  log = caplog.text
  assert "answer_head" in log and "code_bag_head" in log and "vision_cross_attention" in log
