"""SCST (stage 2, image -> text): its gradient is the REINFORCE estimate against the greedy baseline computed by
hand; its in-graph reward is CIDEr-D as pycocoevalcap computes it on the decoded captions; the trainer runs it
with every caption of each image as references; configs that cannot run it stop with the flag."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from bigen_jax import config_checks
from bigen_jax import errors
from bigen_jax import experiment
from bigen_jax import metrics as metrics_lib
from bigen_jax import train
from bigen_jax.data import input_pipeline
from bigen_jax.data import records
from bigen_jax.data import tokenizer as tokenizer_lib
from bigen_jax.eval import cider
from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
from bigen_jax.tasks import scst
from configs import demo
from configs import model as model_config
from conftest import write_training_data

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
CFG = ml_collections.FrozenConfigDict(dict(
    weight=1, num_samples=2, temperature=1.0, visual_input="dense", layout="mask", max_len=-1, pad_id=PAD,
    unk_id=UNK, cls_id=CLS, sep_id=SEP, mask_id=MASK))


def _caption(rng, length, *, vocab, max_len):
  """ids [max_len]: [CLS], ``length`` random words, [SEP], [PAD].."""
  row = np.full(max_len, PAD, np.int32)
  row[0], row[1:length + 1], row[length + 1] = CLS, rng.integers(5, vocab, length), SEP
  return row


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
  """A tiny model, a batch of 3 images, the captions the task draws for them (2 samples each, greedy), references
  built to share words with them (image 0 has 2 references, the others 3), a training corpus of 8 images and
  the task's loss, metrics and gradient."""
  config = model_config.get_config("tiny")
  config.update(dict(num_language_layers=1, num_vision_layers=1, num_cross_layers=1))
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  n, length = 3, 6
  batch = {"dense": jnp.asarray(rng.normal(size=(n, config.num_cells, config.visual_feat_dim)), jnp.float32),
           "boxes": jnp.asarray(rng.uniform(size=(n, config.num_cells, 4)), jnp.float32),
           "caption_ids": jnp.zeros((n, 3, length), jnp.int32)}
  key = jax.random.key(1)
  samples, greedy = jax.jit(lambda p, b: scst.rollouts(p, b, key, model=model, cfg=CFG, frozen={}))(params, batch)
  samples, greedy = np.asarray(samples), np.asarray(greedy)
  refs = np.full((n, 3, length), PAD, np.int32)
  for i in range(n):
    refs[i, 0] = samples[2 * i]  # the first sample is a reference: a high reward
    refs[i, 1] = _caption(rng, 3, vocab=config.vocab_size, max_len=length)
    refs[i, 1, 1:3] = greedy[i, 1:3]  # shares the greedy caption's first two words
    if i == 1:
      refs[i, 2] = greedy[i]  # the greedy caption is a reference: a high baseline
    elif i == 2:
      refs[i, 2] = _caption(rng, 4, vocab=config.vocab_size, max_len=length)
  others = [np.stack([_caption(rng, rng.integers(2, 5), vocab=config.vocab_size, max_len=length)
                      for _ in range(1 + j % 3)]) for j in range(5)]
  corpus = [r[r[:, 0] != PAD] for r in refs] + others
  batch["caption_ids"] = jnp.asarray(refs)
  frozen = {"cider": scst.reference_table(corpus, pad_id=PAD, sep_id=SEP)}
  objective = lambda p: scst.loss_fn(p, batch, key, model=model, cfg=CFG, frozen=frozen)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  vocab_txt = str(tmp_path_factory.mktemp("scst") / "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer_lib.SPECIAL_TOKENS) + [f"w{i}" for i in range(config.vocab_size - 5)]) + "\n")
  return dict(model=model, params=params, batch=batch, samples=samples, greedy=greedy, refs=refs, corpus=corpus,
              frozen=frozen, loss=loss, metrics=metrics, grads=grads, tok=tokenizer_lib.load_tokenizer(vocab_txt))


def _strings(tok, ids):
  """Decoded captions of ids [N, L]; rows starting with [PAD] (absent references) left out."""
  ids = np.asarray(ids)
  return tok.decode(ids[ids[:, 0] != PAD])


def _cider_d(tok, candidates, refs, corpus):
  """The project's CIDEr-D (equal to pycocoevalcap's, tests/test_cider.py) of decoded strings, document
  frequencies from the decoded corpus."""
  df = cider.document_frequencies([_strings(tok, doc) for doc in corpus])
  gts = {i: _strings(tok, r) for i, r in enumerate(refs)}
  res = {i: [c] for i, c in enumerate(tok.decode(candidates))}
  return cider.CiderD(df=df).compute_score(gts, res)[1]


def _hand_log_probs(params, model, batch, samples):
  """Sum over each sample's words and its [SEP] of log p(word | words before, image), one position at a time
  with the model's own text logits (the mask layout: [MASK] at l, later words hidden)."""
  n, length = samples.shape
  feats, boxes = (jnp.repeat(batch[k], 2, axis=0) for k in ("dense", "boxes"))
  sep_at = np.argmax(samples == SEP, axis=1)
  total = jnp.zeros(n)
  for l in range(1, length - 1):  # at the last position only [SEP] is allowed: log p = 0
    inputs = jnp.asarray(samples).at[:, l].set(MASK)
    mask = jnp.broadcast_to((jnp.arange(length) <= l).astype(jnp.int32), (n, length))
    out = model.apply({"params": params}, inputs, mask, boxes=boxes, visual_feats=feats, text_logits=True)
    log_probs = jax.nn.log_softmax(out.text_logits[:, l].at[:, [PAD, UNK, CLS, MASK]].set(-jnp.inf))
    scored = l <= sep_at
    word = log_probs[jnp.arange(n), np.where(scored, samples[:, l], SEP)]
    total = total + jnp.where(scored, word, 0.0)
  return total


def test_gradient_is_the_reinforce_estimate_against_the_greedy_baseline(drawn):
  d = drawn
  reward_sample = _cider_d(d["tok"], d["samples"], np.repeat(d["refs"], 2, axis=0), d["corpus"])
  reward_greedy = _cider_d(d["tok"], d["greedy"], d["refs"], d["corpus"])
  advantage = reward_sample - np.repeat(reward_greedy, 2)
  assert (advantage > 0.5).any() and (advantage < -0.5).any()  # a gradient that is not 0, pulled both ways

  def hand_loss(params):
    return -jnp.mean(jnp.asarray(advantage, jnp.float32) * _hand_log_probs(params, d["model"], d["batch"],
                                                                           d["samples"]))

  want_loss, want = jax.jit(jax.value_and_grad(hand_loss))(d["params"])
  np.testing.assert_allclose(d["loss"], want_loss, rtol=1e-5)
  got_leaves, want_leaves = jax.tree.leaves(d["grads"]), jax.tree.leaves(want)
  assert jax.tree.structure(d["grads"]) == jax.tree.structure(want)
  assert sum(float(jnp.abs(g).sum()) for g in want_leaves) > 0
  for got, ref in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_causal_log_probs_in_one_pass_equal_the_decoders_one_position_at_a_time(drawn):
  """The causal layout's single teacher-forced pass gives each sampled word the log-probability the decoder drew
  it with (``captions.next_word_log_probs``, one pass per position), at temperature 0.7 (the sampler's filter)."""
  d = drawn
  tokens, temperature = scst.decode_tokens(CFG), 0.7
  ids = jnp.asarray(d["samples"])
  visual, boxes = {"visual_feats": jnp.repeat(d["batch"]["dense"], 2, axis=0)}, jnp.repeat(d["batch"]["boxes"], 2,
                                                                                          axis=0)
  run = lambda layout: jax.jit(lambda p: scst.sequence_log_probs(
      p, ids, model=d["model"], visual=visual, boxes=boxes, tokens=tokens, layout=layout,
      temperature=temperature))(d["params"])
  scored = scst.scored_positions(ids, SEP)
  by_position = jnp.zeros(ids.shape[0])
  for l in range(1, ids.shape[1]):
    log_probs = captions.filter_logits(captions.next_word_log_probs(
        d["params"], ids, l, model=d["model"], visual=visual, boxes=boxes, tokens=tokens, layout="causal"),
        temperature=temperature)
    word = log_probs[jnp.arange(ids.shape[0]), jnp.where(scored[:, l], ids[:, l], SEP)]
    by_position = by_position + jnp.where(scored[:, l], word, 0.0)
  np.testing.assert_allclose(run("causal"), by_position, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(run("causal")) - np.asarray(run("mask"))).max() > 0.1  # the layouts differ


def test_reward_is_pycocoevalcap_cider_d_of_the_decoded_captions(drawn):
  d = drawn
  tok, refs = d["tok"], d["refs"]
  reward = jax.jit(lambda c, r, t: scst.rewards(c, r, t, pad_id=PAD, sep_id=SEP))
  got_sample = reward(d["samples"], np.repeat(refs, 2, axis=0), d["frozen"]["cider"])
  want_sample = _cider_d(tok, d["samples"], np.repeat(refs, 2, axis=0), d["corpus"])
  got_greedy = reward(d["greedy"], refs, d["frozen"]["cider"])
  want_greedy = _cider_d(tok, d["greedy"], refs, d["corpus"])
  np.testing.assert_allclose(got_sample, want_sample, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_greedy, want_greedy, rtol=1e-5, atol=1e-5)
  assert want_sample.max() > 1.0 and len(set(np.round(want_sample, 3))) > 3  # a range of rewards, not all 0
  metrics = d["metrics"]
  np.testing.assert_allclose(metrics["reward_sample"], want_sample.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["reward_greedy"], want_greedy.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["advantage"], (want_sample - np.repeat(want_greedy, 2)).mean(), atol=1e-5)
  # pycocoevalcap itself, its document frequencies from the scored references: the table of the batch alone
  gts = {i: _strings(tok, r) for i, r in enumerate(refs)}
  want, _ = Cider().compute_score(gts, {i: [c] for i, c in enumerate(tok.decode(d["greedy"]))})
  own = reward(d["greedy"], refs, scst.reference_table([r[r[:, 0] != PAD] for r in refs], pad_id=PAD, sep_id=SEP))
  np.testing.assert_allclose(float(np.mean(own)), want, rtol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_training_data(str(tmp_path_factory.mktemp("scst_data")), splits={"train": 16, "validation": 8})


def _config(data, **overrides):
  config = demo.get_config("tiny")
  config.update_from_flattened_dict({
      "data.records_dir": data["records_dir"], "data.vocab_dir": data["vocab_dir"],
      "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1, "log_every": 1, "total_steps": 2,
      "eval.every": 0, "tasks.i2t.weight": 0, "tasks.t2i.weight": 0, "tasks.scst.weight": 1, **overrides})
  return config


def test_trainer_runs_scst_with_every_caption(tmp_path, data):
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(_config(data), workdir)
  assert int(state.step) == 2
  rows = [r for r in metrics_lib.read_history(workdir) if "lr" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    for name in ("loss", "reward_sample", "reward_greedy", "advantage"):
      assert np.isfinite(row[f"scst/{name}"]), (name, row)
  # what the trainer fed it: every caption of each training image, the table of the training split's captions
  it = input_pipeline.create_iterator(records_dir=data["records_dir"], split="train", global_batch_size=8,
                                      process_index=0, process_count=1, shuffle_buffer=16, with_all_captions=True)
  batch = next(it)
  assert batch["caption_ids"].shape == (8, 3, 6)
  for row, index in zip(batch["caption_ids"], batch["index"]):
    num = 1 + index % 3
    np.testing.assert_array_equal(row[:num, 1], 100 + index)
    np.testing.assert_array_equal(row[:num, 2], 10 + np.arange(num))
    assert (row[num:] == PAD).all()
  assert any((t == row).all(-1).any() for t, row in zip(batch["text_ids"], batch["caption_ids"]))
  assert "caption_ids" not in next(input_pipeline.create_iterator(
      records_dir=data["records_dir"], split="train", global_batch_size=8, process_index=0, process_count=1))
  ids = records.read_caption_ids(data["records_dir"], "train")
  assert [len(x) for x in ids] == [1 + i % 3 for i in range(16)]


def test_configs_that_cannot_run_scst_name_the_flag(tmp_path, data):
  for flag, value in (("tasks.scst.num_samples", 0), ("tasks.scst.temperature", 0.0),
                      ("tasks.scst.layout", "causal"), ("tasks.scst.max_len", 1)):
    with pytest.raises(errors.ConfigError, match=f"--config.{flag}="):
      config_checks.check_config(_config(data, **{flag: value}))
  config_checks.check_config(_config(data, **{"tasks.scst.layout": "causal", "tasks.i2t.layout": "causal"}))
  with pytest.raises(errors.ConfigError, match="--config.tasks.scst.max_len=7"):
    experiment.build_context(_config(data, **{"tasks.scst.max_len": 7}), str(tmp_path / "a"))
  copy = str(tmp_path / "records")
  shutil.copytree(data["records_dir"], copy)
  path = os.path.join(copy, records.MANIFEST_NAME)
  with open(path) as f:
    manifest = json.load(f)
  del manifest["max_captions"]
  with open(path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(errors.ConfigError, match="--config.tasks.scst.weight=1 needs .* max_captions"):
    experiment.build_context(_config({**data, "records_dir": copy}), str(tmp_path / "b"))
  # evaluation reads neither the SCST table (none can be built from these records) nor the CLIP loss's inputs
  clip_on = {"tasks.clip.weight": 1, "tasks.clip.generator_dir": "/no/gan", "tasks.clip.clip_path": "/no/clip"}
  assert not {"cider", "generator", "clip"} & set(experiment.build_context(
      _config({**data, "records_dir": copy}, **clip_on), str(tmp_path / "e"), training=False).frozen)
  with pytest.raises(errors.UserError, match="/no/gan"):
    experiment.build_context(_config(data, **clip_on), str(tmp_path / "f"))
  assert "cider" not in experiment.build_context(
      _config({**data, "records_dir": copy}, **{"tasks.scst.weight": 0, "tasks.i2t.weight": 1}),
      str(tmp_path / "c")).frozen
