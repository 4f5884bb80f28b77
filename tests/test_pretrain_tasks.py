"""X-LXMERT's pretraining objectives as tasks (MLM, CCC with uniform masking or feature regression, QA), the
"random" schedule that draws one per step, the answer head, and the pretraining configs.

Each loss is checked against a numpy computation from the logits the model gave it (``apply.apply_model`` is
wrapped to record its inputs and outputs), and which modality each step kind masks is read from those inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bigen_jax import config_checks
from bigen_jax import errors
from bigen_jax import optim
from bigen_jax import tasks as tasks_lib
from bigen_jax.data import records
from bigen_jax.models import apply
from bigen_jax.models import lxmert
from bigen_jax.tasks import layouts
from bigen_jax.tasks import mlm
from bigen_jax.tasks import qa
from bigen_jax.tasks import t2i
from configs import model as model_config
from configs import xlxmert_pretrain
from configs import xlxmert_vqa

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = dict(mask_id=MASK, pad_id=PAD, cls_id=CLS, sep_id=SEP, unk_id=UNK)
NUM_ANSWERS = 5


def _cfg(**kw):
  return ml_collections.FrozenConfigDict({**SPECIAL, "label_smoothing": 0.0, "visual_input": "discrete", **kw})


CCC = dict(mask_schedule="uniform", min_masked=1, max_masked=64, caption_dropout=0.0)


def _captions(rng, batch, length, vocab, min_words=1):
  """[CLS] w.. [SEP] [PAD].. of min_words..length-2 words (ids > MASK): (ids, mask) int32 [B, L]."""
  n = rng.integers(min_words, length - 1, batch)[:, None]
  index = np.arange(length)[None]
  words = rng.integers(MASK + 1, vocab, (batch, length))
  ids = np.where(index == 0, CLS, np.where(index <= n, words, np.where(index == n + 1, SEP, PAD)))
  return ids.astype(np.int32), (index <= n + 1).astype(np.int32)


def _model(**overrides):
  config = model_config.get_config("tiny")
  config.update({"dropout_rate": 0.0, "attention_dropout_rate": 0.0, "num_answers": NUM_ANSWERS, **overrides})
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  return config, model, params


def _batch(config, batch=8, seed=0):
  """Captions, questions with soft answer targets (row 1 without a question, row 2 with no answer in the table),
  cluster ids, dense = centroid + noise, grid boxes; and the frozen codebook."""
  rng = np.random.default_rng(seed)
  cells, dim = config.num_cells, config.visual_feat_dim
  codebook = rng.normal(size=(config.num_clusters, dim)).astype(np.float32)
  text_ids, text_mask = _captions(rng, batch, config.max_len, config.vocab_size)
  question_ids, question_mask = _captions(rng, batch, config.max_len, config.vocab_size)
  target = np.where(rng.uniform(size=(batch, NUM_ANSWERS)) < 0.4, rng.choice([0.3, 0.6, 1.0], (batch, NUM_ANSWERS)),
                    0.0).astype(np.float32)
  target[0] = 0.0
  target[0, 3] = 1.0
  target[2] = 0.0
  question_type = rng.integers(0, 3, batch).astype(np.int32)
  question_type[1] = -1
  cluster_ids = rng.integers(0, config.num_clusters, (batch, cells))
  out = dict(text_ids=text_ids, text_mask=text_mask, question_ids=question_ids, question_mask=question_mask,
             answer_target=target, question_type=question_type, cluster_ids=cluster_ids.astype(np.int32),
             dense=(codebook[cluster_ids] + 0.1 * rng.normal(size=(batch, cells, dim))).astype(np.float32),
             boxes=np.broadcast_to(records.grid_boxes(int(np.sqrt(cells))), (batch, cells, 4)).astype(np.float32))
  return jax.tree.map(jnp.asarray, out), {"codebook": jnp.asarray(codebook)}


@pytest.fixture(scope="module")
def tiny():
  config, model, params = _model()
  batch, frozen = _batch(config)
  return config, model, params, batch, frozen


@pytest.fixture
def calls(monkeypatch):
  """The keyword inputs and the output of every ``apply.apply_model`` call the tasks make."""
  recorded, real = [], apply.apply_model

  def spy(model, params, **kw):
    out = real(model, params, **kw)
    recorded.append({**kw, "out": out})
    return out

  monkeypatch.setattr(apply, "apply_model", spy)
  return recorded


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------- MLM


def test_mlm_masking_follows_bert():
  rng = np.random.default_rng(0)
  ids, mask = _captions(rng, 4000, 17, 64, min_words=15)  # 15 words each
  ids[:100, 1], ids[:100, 2:], mask[:100, 2:] = SEP, PAD, 0  # 100 captions without a word: [CLS] [SEP]
  out = layouts.mlm_inputs(jax.random.key(0), text_ids=jnp.asarray(ids), text_mask=jnp.asarray(mask), rate=0.15,
                           mask_id=MASK, vocab_size=64, special_ids=(CLS, SEP, PAD, UNK))
  chosen, new = np.asarray(out.chosen), np.asarray(out.text_ids)
  words = (mask == 1) & ~np.isin(ids, [CLS, SEP, PAD, UNK])
  assert not (chosen & ~words).any()  # never [CLS], [SEP] or padding
  assert (chosen[100:].sum(1) >= 1).all() and not chosen[:100].any()  # at least one per caption with words
  np.testing.assert_array_equal(np.asarray(out.targets), ids)
  np.testing.assert_array_equal(new[~chosen], ids[~chosen])
  # E[chosen] = 15 x 0.15 + P(none drawn) = 2.25 + 0.85^15 per caption of 15 words
  assert abs(chosen[100:].sum() / words[100:].sum() - (2.25 + 0.85 ** 15) / 15) < 0.006
  was, now = ids[chosen], new[chosen]
  assert abs((now == MASK).mean() - 0.8) < 0.02
  random_word = (now != MASK) & (now != was)
  assert abs(random_word.mean() - 0.1 * 58 / 59) < 0.015  # a random word other than the 5 specials: 59 ids
  assert abs((now == was).mean() - (0.1 + 0.1 / 59)) < 0.015
  assert not np.isin(now[random_word], [CLS, SEP, PAD, UNK, MASK]).any()
  assert len(set(now[random_word])) == 59


def test_mlm_scores_only_the_chosen_positions(tiny, calls):
  config, model, params, batch, frozen = tiny
  rng = jax.random.key(7)
  loss, metrics = mlm.loss_fn(params, batch, rng, model=model, cfg=_cfg(mask_rate=0.3), frozen=frozen,
                              deterministic=True)
  (call,) = calls
  want = layouts.mlm_inputs(jax.random.split(rng)[0], text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                            rate=0.3, mask_id=MASK, vocab_size=config.vocab_size, special_ids=(CLS, SEP, PAD, UNK))
  np.testing.assert_array_equal(call["text_ids"], want.text_ids)
  np.testing.assert_array_equal(call["text_mask"], batch["text_mask"])  # the caption attends bidirectionally
  assert "visual_mask" not in call and "text_attention" not in call  # the image whole
  chosen = np.asarray(want.chosen)
  assert chosen.any() and (call["text_ids"] != batch["text_ids"]).any()
  log_probs = _log_softmax(call["out"])
  nll = -np.take_along_axis(log_probs, np.asarray(batch["text_ids"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[chosen].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["masked_words"]), chosen.sum(1).mean())


# ---------------------------------------------------------------------------------------------------- CCC


def test_uniform_masking_ratio():
  m = np.asarray(layouts.t2i_mask(jax.random.key(0), batch_size=8192, num_cells=64, schedule="uniform"))
  counts = m.sum(1)
  assert counts.min() >= 1 and counts.max() == 64
  # ceil(64 U(0, 1]) is uniform on 1..64: a quarter of the examples in each quarter of the range
  np.testing.assert_allclose(np.histogram(counts, bins=[1, 17, 33, 49, 65])[0] / len(counts), 0.25, atol=0.02)
  np.testing.assert_array_equal(
      m, layouts.t2i_mask(jax.random.key(0), batch_size=8192, num_cells=64, schedule="ratio"))


def test_ccc_masks_cells_and_keeps_the_caption(tiny, calls):
  config, model, params, batch, frozen = tiny
  loss, metrics = tasks_lib.get_task("ccc")(params, batch, jax.random.key(3), model=model, cfg=_cfg(**CCC),
                                            frozen=frozen, deterministic=True)
  (call,) = calls
  np.testing.assert_array_equal(call["text_ids"], batch["text_ids"])
  np.testing.assert_array_equal(call["text_mask"], batch["text_mask"])
  masked = np.asarray(call["visual_mask"])
  assert (masked.sum(1) >= 1).all() and len(set(masked.sum(1))) > 1  # a ratio per example
  logits = call["out"][0]
  nll = -np.take_along_axis(_log_softmax(logits), np.asarray(batch["cluster_ids"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[masked].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["masked_cells"]), masked.sum(1).mean())


@pytest.mark.parametrize("visual_input", ["discrete", "dense"])
def test_regression_objective_regresses_the_cells_features(tiny, calls, visual_input):
  config, model, params, batch, frozen = tiny
  cfg = _cfg(**{**CCC, "objective": "regression", "visual_input": visual_input})
  loss, metrics = t2i.loss_fn(params, batch, jax.random.key(3), model=model, cfg=cfg, frozen=frozen,
                              deterministic=True)
  (call,) = calls
  masked, feats = np.asarray(call["visual_mask"]), np.asarray(call["out"][1], np.float64)
  codebook, targets = np.asarray(frozen["codebook"], np.float64), np.asarray(batch["cluster_ids"])
  inputs = codebook[targets] if visual_input == "discrete" else np.asarray(batch["dense"], np.float64)
  error = np.mean((feats - inputs) ** 2, -1) / np.mean(codebook ** 2)
  np.testing.assert_allclose(float(loss), error[masked].mean(), rtol=1e-5)
  nearest = np.argmin(((feats[..., None, :] - codebook) ** 2).sum(-1), -1)
  np.testing.assert_allclose(float(metrics["accuracy"]), (nearest == targets)[masked].mean(), atol=1e-6)
  grads = jax.grad(lambda p: t2i.loss_fn(p, batch, jax.random.key(3), model=model, cfg=cfg, frozen=frozen,
                                         deterministic=True)[0])(params)
  assert not np.asarray(grads["image_head"]["classifier"]["kernel"]).any()  # nothing is classified
  assert np.asarray(grads["image_head"]["feat_proj"]["kernel"]).any()


def test_objective_is_checked(tiny):
  config, model, params, batch, frozen = tiny
  with pytest.raises(ValueError, match="objective"):
    t2i.loss_fn(params, batch, jax.random.key(0), model=model, cfg=_cfg(**CCC, objective="mse"), frozen=frozen)
  pretrain = xlxmert_pretrain.get_config("tiny")
  pretrain.tasks.ccc.update(dict(objective="regression", feature_regression=1.0))
  with pytest.raises(errors.ConfigError, match="tasks.ccc.feature_regression"):
    config_checks.check_pretraining(pretrain)


# ---------------------------------------------------------------------------------------------------- QA


@pytest.mark.parametrize("loss_kind", ["bce", "softmax"])
def test_qa_loss_and_score_equal_numpy(tiny, calls, loss_kind):
  config, model, params, batch, frozen = tiny
  loss, metrics = qa.loss_fn(params, batch, jax.random.key(0), model=model, cfg=_cfg(loss=loss_kind),
                             frozen=frozen, deterministic=True)
  (call,) = calls
  np.testing.assert_array_equal(call["text_ids"], batch["question_ids"])  # the question replaces the caption
  np.testing.assert_array_equal(call["text_mask"], batch["question_mask"])
  assert "visual_mask" not in call
  logits, target = np.asarray(call["out"], np.float64), np.asarray(batch["answer_target"], np.float64)
  assert logits.shape == target.shape == (8, NUM_ANSWERS)
  valid = np.asarray(batch["question_type"]) >= 0
  if loss_kind == "bce":
    p = 1 / (1 + np.exp(-logits))
    per_question = -(target * np.log(p) + (1 - target) * np.log(1 - p)).sum(-1)
    want = per_question[valid].mean()
  else:
    answered = valid & (target.sum(-1) > 0)
    labels = target[answered] / target[answered].sum(-1, keepdims=True)
    want = -(labels * _log_softmax(logits[answered])).sum(-1).mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  best = logits.argmax(-1)
  np.testing.assert_allclose(float(metrics["score"]), target[np.arange(8), best][valid].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), (best == target.argmax(-1))[valid].mean(), rtol=1e-6)


def test_qa_losses_differ_on_soft_targets():
  """BCE pushes every answer's own sigmoid to its score; the softmax only the scores' ranking: a logit shift moves
  BCE and leaves the softmax loss unchanged."""
  logits = jnp.asarray([[2.0, -1.0, 0.5]])
  target = jnp.asarray([[1.0, 0.0, 0.3]])
  valid = jnp.asarray([True])
  for kind, moves in (("bce", True), ("softmax", False)):
    before = qa.answer_loss(logits, target, valid, loss=kind)
    after = qa.answer_loss(logits + 3.0, target, valid, loss=kind)
    assert (abs(float(after - before)) > 1e-3) == moves, kind
  with pytest.raises(errors.ConfigError, match="tasks.qa.loss"):
    qa.answer_loss(logits, target, valid, loss="hinge")


def test_qa_needs_questions_and_the_answer_head(tiny):
  config, model, params, batch, frozen = tiny
  without = {k: v for k, v in batch.items() if k not in qa.QUESTION_FIELDS}
  with pytest.raises(errors.ConfigError, match="data.questions"):
    qa.loss_fn(params, without, jax.random.key(0), model=model, cfg=_cfg(loss="bce"), frozen=frozen)
  _, bare, bare_params = _model(num_answers=0)
  assert "answer_head" not in bare_params
  with pytest.raises(ValueError, match="model.num_answers"):
    qa.loss_fn(bare_params, batch, jax.random.key(0), model=bare, cfg=_cfg(loss="bce"), frozen=frozen)


def test_answer_head_is_lxmerts():
  config, model, _ = _model()
  boxed = lxmert.abstract_params(model, config)["answer_head"]
  h = config.hidden_size
  shapes = jax.tree.map(lambda x: x.value.shape, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert shapes == {"dense": {"kernel": (h, 2 * h), "bias": (2 * h,)}, "norm": {"scale": (2 * h,), "bias": (2 * h,)},
                    "classifier": {"kernel": (2 * h, NUM_ANSWERS), "bias": (NUM_ANSWERS,)}}
  assert boxed["dense"]["kernel"].names == ("embed", "mlp")
  assert boxed["classifier"]["kernel"].names == ("mlp", "answers")
  assert "answers" in dict(model_config.AXIS_RULES)
  heads = lxmert.init_heads(config, jax.random.key(0))
  assert jax.tree.map(np.shape, heads["answer_head"]) == shapes


# ------------------------------------------------------------------------------------------- the schedule


def test_random_schedule_is_deterministic_per_seed_and_step():
  weights = {"mlm": 2.0, "ccc": 2.0, "itm": 1.0, "qa": 1.0, "i2t": 0.0}
  long = tasks_lib.random_schedule(weights, seed=3, num_steps=30_000)
  assert tasks_lib.random_schedule(weights, seed=3, num_steps=500) == long[:500]  # a resumed run draws the same
  assert tasks_lib.random_schedule(weights, seed=4, num_steps=500) != long[:500]
  counts = {name: long.count(name) / len(long) for name in weights}
  np.testing.assert_allclose([counts[n] for n in weights], [1 / 3, 1 / 3, 1 / 6, 1 / 6, 0.0], atol=0.01)
  steps = [long[:40].count(n) for n in ("mlm", "ccc", "itm", "qa")]
  assert min(steps) > 0 and max(steps) < 40  # not a cycle of runs
  config = xlxmert_pretrain.get_config("tiny")
  cycle = tasks_lib.task_cycle(config.tasks, "random", seed=config.seed, num_steps=100)
  assert cycle == tasks_lib.random_schedule({k: float(v.weight) for k, v in config.tasks.items()}, seed=config.seed,
                                            num_steps=100)
  with pytest.raises(errors.ConfigError, match="task_schedule"):
    tasks_lib.task_cycle(config.tasks, "random")  # no length


def _masked(call, text):
  """(text masked, image masked) of one model call, against the unmasked ``text`` ids."""
  text_masked = bool((np.asarray(call["text_ids"]) != np.asarray(text)).any())
  image_masked = "visual_mask" in call and bool(np.asarray(call["visual_mask"]).any())
  return text_masked, image_masked


def test_each_step_kind_masks_one_modality_or_none(tiny, calls):
  config, model, params, batch, frozen = tiny
  pretrain = xlxmert_pretrain.get_config("tiny")
  cfgs = {name: _cfg(**{k: v for k, v in pretrain.tasks[name].to_dict().items() if k not in ("weight",)})
          for name in ("mlm", "ccc", "itm", "qa")}
  kinds = set(tasks_lib.task_cycle(pretrain.tasks, "random", seed=0, num_steps=50))
  assert kinds == {"mlm", "ccc", "itm", "qa"}
  want = {"mlm": (True, False), "ccc": (False, True), "itm": (False, False), "qa": (False, False)}
  for kind in sorted(kinds):
    calls.clear()
    tasks_lib.get_task(kind)(params, batch, jax.random.key(1), model=model, cfg=cfgs[kind], frozen=frozen)
    (call,) = calls
    text = batch["question_ids"] if kind == "qa" else batch["text_ids"]
    assert _masked(call, text) == want[kind], kind


# ---------------------------------------------------------------------------------------------------- learning

STEPS, FRACTION = 300, 0.2


def _fit(task, cfg, steps=STEPS):
  """(loss before, loss after) ``steps`` Adam updates at lr 3e-3 of one task on one fixed batch (fresh masks each
  step; the reported loss is the deterministic one at a fixed rng)."""
  config, model, params = _model(num_language_layers=1, num_vision_layers=1, num_cross_layers=1)
  batch, frozen = _batch(config)
  loss_fn, tx = tasks_lib.get_task(task), optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, i):
      params, opt_state = carry
      grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.fold_in(jax.random.key(1), i), model=model, cfg=cfg,
                                         frozen=frozen)[0])(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))[0][0]

  evaluate = jax.jit(lambda p: loss_fn(p, batch, jax.random.key(2), model=model, cfg=cfg, frozen=frozen,
                                       deterministic=True)[0])
  return float(evaluate(params)), float(evaluate(train(params)))


@pytest.mark.parametrize("task, cfg", [("qa", _cfg(loss="bce")), ("qa", _cfg(loss="softmax")),
                                       ("mlm", _cfg(mask_rate=0.15))])
def test_overfits_one_batch(task, cfg):
  before, after = _fit(task, cfg)
  print(f"{task} {cfg.get('loss', '')}: loss {before:.3f} -> {after:.3f} in {STEPS} steps")
  assert np.isfinite(after) and after < FRACTION * before, (task, before, after)


# ---------------------------------------------------------------------------------------------------- configs


def test_warmup_linear_schedule():
  cfg = ml_collections.ConfigDict(dict(lr=1e-5, schedule="warmup_linear", warmup_fraction=0.05, b1=0.9, b2=0.999,
                                       eps=1e-6, weight_decay=0.01, clip_norm=1.0))
  _, schedule = optim.make_optimizer(cfg, total_steps=1000)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 25, 50, 525, 1000)], [0, 5e-6, 1e-5, 5e-6, 0],
                             atol=1e-12)


@pytest.mark.parametrize("arg", ["paper", "demo", "tiny", "paper,regression", "demo,regression"])
def test_pretraining_configs(arg):
  config = xlxmert_pretrain.get_config(arg)
  assert config.task_schedule == "random" and config.data.questions
  assert {n for n, t in config.tasks.items() if t.weight > 0} == {"mlm", "ccc", "itm", "qa"}
  assert config.tasks.ccc.mask_schedule == "uniform"
  assert config.tasks.ccc.objective == ("regression" if "regression" in arg else "ccc")
  config_checks.check_pretraining(config)
  if arg == "paper":
    assert (config.batch_size, config.optimizer.lr, config.optimizer.warmup_fraction) == (920, 1e-5, 0.05)
  vqa = xlxmert_vqa.get_config(arg)
  assert {n for n, t in vqa.tasks.items() if t.weight > 0} == {"qa"} and vqa.tasks.qa.loss == "bce"
  assert vqa.optimizer.lr == (5e-4 if arg.startswith("demo") else 5e-5)
  config.data.questions = False
  with pytest.raises(errors.ConfigError, match="data.questions"):
    config_checks.check_pretraining(config)
  with pytest.raises(ValueError, match="xlxmert_pretrain.py:huge"):
    xlxmert_pretrain.get_config("huge")


@pytest.mark.slow  # ~25 s; the schedule's draw is tested alone, each task's loss by its overfit test
def test_trainer_runs_the_random_schedule(tmp_path):
  """The one trainer on X-LXMERT's tiny config (QA off: the fixture's records hold no questions): step s trains
  the task the random schedule drew for s, and the validation loss covers every task on."""
  from bigen_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from bigen_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import write_training_data  # pylint: disable=g-import-not-at-top
  data = write_training_data(str(tmp_path / "data"), splits={"train": 40, "validation": 16})
  config = xlxmert_pretrain.get_config("tiny")
  config.update_from_flattened_dict({
      "data.records_dir": data["records_dir"], "data.vocab_dir": data["vocab_dir"], "data.tokenizer": data["tokenizer"],
      "mesh.num_devices": 1, "log_every": 1, "eval.every": 6, "tasks.qa.weight": 0, "data.questions": False,
      "model.num_answers": 0, "seed": 2})  # seed 2 draws itm, ccc, mlm, itm, ccc, mlm
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  rows = metrics_lib.read_history(workdir)
  trained = {r["step"]: [k.split("/")[0] for k in r if k.endswith("/loss")] for r in rows if "lr" in r}
  drawn = tasks_lib.task_cycle(config.tasks, "random", seed=config.seed, num_steps=6)
  assert trained == {s + 1: [task] for s, task in enumerate(drawn)} and set(drawn) == {"mlm", "ccc", "itm"}
  assert {"validation_loss/mlm/loss", "validation_loss/ccc/gap", "validation_loss/itm/accuracy"} <= set(rows[-1])
