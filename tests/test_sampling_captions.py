"""I2T decoders: greedy equals a step-by-step Python loop of argmax with the model; beam size 1 equals
greedy; beam search finds the best of all captions of a tiny vocabulary; sampling draws from the tempered,
top-k and nucleus-filtered distribution of a numpy reference."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
from bigen_jax.tasks import layouts
from bigen_jax.tasks import losses as task_losses
from configs import model as model_config

CLS, SEP, MASK, PAD = 2, 3, 4, 0
TOKENS = captions.Tokens(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD)


def _setup():
  config = model_config.get_config("tiny")
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(3, config.num_cells, config.visual_feat_dim)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(size=(3, config.num_cells, 4)), jnp.float32)
  return config, model, params, feats, boxes


def _reference(config, model, params, feats, boxes):
  """The decoding loop in Python, one example at a time."""
  out = []
  for b in range(feats.shape[0]):
    ids = [CLS] + [PAD] * (config.max_len - 1)
    for l in range(1, config.max_len):
      inputs = np.array(ids)
      inputs[l] = MASK
      mask = (np.arange(config.max_len) <= l).astype(np.int32)
      res = model.apply({"params": params}, jnp.asarray(inputs[None]), jnp.asarray(mask[None]),
                        boxes=boxes[b:b + 1], visual_feats=feats[b:b + 1], text_logits=True)
      logits = np.array(res.text_logits[0, l])
      logits[[CLS, MASK, PAD]] = -np.inf
      word = SEP if l == config.max_len - 1 else int(np.argmax(logits))
      ids[l] = word
      if word == SEP:
        break
    out.append(ids)
  return np.array(out)


def test_greedy_equals_stepwise_argmax():
  config, model, params, feats, boxes = _setup()
  decode = jax.jit(lambda p, f, bx: captions.greedy_captions(
      p, model=model, visual={"visual_feats": f}, boxes=bx, max_len=config.max_len, tokens=TOKENS))
  got = np.asarray(decode(params, feats, boxes))
  np.testing.assert_array_equal(got, _reference(config, model, params, feats, boxes))
  assert (got[:, 0] == CLS).all() and ((got == SEP).sum(1) == 1).all()


def test_beam_size_one_equals_greedy():
  config, model, params, feats, boxes = _setup()
  kw = dict(model=model, visual={"visual_feats": feats}, boxes=boxes, max_len=config.max_len, tokens=TOKENS)
  greedy = jax.jit(lambda p: captions.greedy_captions(p, **kw))(params)
  beams, _ = jax.jit(lambda p: captions.beam_search_captions(p, beam_size=1, **kw))(params)
  np.testing.assert_array_equal(np.asarray(beams[:, 0]), np.asarray(greedy))


def _caption_log_prob(model, params, feats, boxes, ids, tokens):
  """Summed log-probability of a caption under the decoding layout, one position at a time."""
  total = 0.0
  for l in range(1, len(ids)):
    lp = captions.next_word_log_probs(params, jnp.asarray(ids[None]), l, model=model,
                                      visual={"visual_feats": feats}, boxes=boxes, tokens=tokens)
    total += float(lp[0, ids[l]])
    if ids[l] == SEP:
      return total
  raise AssertionError("caption without [SEP]")


def test_beam_search_is_exhaustive_on_a_tiny_vocabulary():
  """Captions of at most 2 words from {5, 6}: 7 in all, so 8 beams keep every one and the best comes first."""
  config, model, params, feats, boxes = _setup()
  tokens = captions.Tokens(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD,
                           banned=(1,) + tuple(range(7, config.vocab_size)))
  beams, scores = captions.beam_search_captions(params, model=model, visual={"visual_feats": feats[:1]},
                                                boxes=boxes[:1], max_len=4, tokens=tokens, beam_size=8)
  every = [[CLS, SEP, PAD, PAD]] + [[CLS, a, SEP, PAD] for a in (5, 6)] + [
      [CLS, a, b, SEP] for a in (5, 6) for b in (5, 6)]
  log_probs = [_caption_log_prob(model, params, feats[:1], boxes[:1], np.array(c), tokens) for c in every]
  order = np.argsort(log_probs)[::-1]
  np.testing.assert_array_equal(np.asarray(beams[0, :7]), np.array(every)[order])
  np.testing.assert_allclose(np.asarray(scores[0, :7]), np.array(log_probs)[order], rtol=1e-5, atol=1e-5)


def _reference_filter(log_probs, temperature, top_k, top_p):
  """The sampling distribution in numpy float64, word by word: softmax(log_probs / T); the top_k most likely
  words renormalised; then the most likely words added one at a time until their mass reaches top_p;
  renormalised. Returns (probabilities [B, V], the smallest gap between a cumulative mass and top_p)."""
  out, gap = [], np.inf
  for row in np.asarray(log_probs, np.float64):
    z = row / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k:
      p[order[top_k:]] = 0.0
      p /= p.sum()
    keep, mass = np.zeros(p.shape, bool), 0.0
    for word in order:
      keep[word] = True
      mass += p[word]
      gap = min(gap, abs(mass - top_p))
      if mass >= top_p:
        break
    p = np.where(keep, p, 0.0)
    out.append(p / p.sum())
  return np.array(out), gap


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 0.9), (2.0, 0, 0.9), (0.5, 6, 0.8), (2.0, 6, 0.8),
                                                     (2.0, 10, 1.0), (1.0, 0, 0.5)])
def test_filter_logits_equals_numpy_reference(temperature, top_k, top_p):
  """Rows of different sharpness, with never-produced words (-inf), filtered inside jit with a traced
  temperature and top_p: the same support and probabilities as the word-by-word reference."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 40)) * np.array([[0.3], [1.0], [2.0], [4.0], [8.0]])
  logits[:, [0, 7]] = -np.inf
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  want, gap = _reference_filter(log_probs, temperature, top_k, top_p)
  assert top_p == 1.0 or gap > 1e-5  # no cumulative mass within float32 rounding (40 words) of top_p
  got = jax.jit(lambda lp, t, p: captions.filter_logits(lp, temperature=t, top_k=top_k, top_p=p))(
      log_probs, temperature, top_p)
  np.testing.assert_array_equal(np.isfinite(got), want > 0)
  np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)), want, rtol=1e-5, atol=1e-7)
  if top_p < 1.0 and not top_k:  # the nucleus of the tempered distribution differs from the untempered one's
    untempered, _ = _reference_filter(log_probs, 1.0, 0, top_p)
    assert temperature == 1.0 or ((untempered > 0) != (want > 0)).any()


def test_filter_logits_small_cases():
  log_probs = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_k=2)), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_p=0.79)), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_p=0.81)), [[1, 1, 1, 0]])
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_p=0.1)), [[1, 0, 0, 0]])
  # T = 0.5 squares the probabilities: [0.25, 0.09, 0.0225, 0.0025] / 0.365, so 0.9 is reached by two words.
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, temperature=0.5, top_p=0.9)),
                                [[1, 1, 0, 0]])
  np.testing.assert_allclose(np.exp(captions.filter_logits(log_probs, temperature=0.5, top_p=0.9)),
                             [[0.25 / 0.34, 0.09 / 0.34, 0, 0]], rtol=1e-5)


def test_sample_captions_draws_from_the_filtered_distribution():
  """The first word of 1000 sampled captions per image (max_len 3: one free word, then [SEP]) lies in the
  reference's support and has its frequencies; a sharper model (init std 0.2) makes the nucleus matter."""
  config = model_config.get_config("tiny")
  config.init_std = 0.2
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  _, _, _, feats, boxes = _setup()
  kw = dict(model=model, visual={"visual_feats": feats}, boxes=boxes, tokens=TOKENS)
  start = jnp.full((3, 3), PAD, jnp.int32).at[:, 0].set(CLS)
  log_probs = captions.next_word_log_probs(params, start, 1, **kw)
  draws = 1000
  for temperature, top_k, top_p in ((0.5, 0, 0.9), (2.0, 8, 0.9)):
    want, _ = _reference_filter(log_probs, temperature, top_k, top_p)
    sample = jax.jit(jax.vmap(lambda r: captions.sample_captions(  # noqa: B023
        params, r, max_len=3, temperature=temperature, top_k=top_k, top_p=top_p, **kw)))
    ids = np.asarray(sample(jax.random.split(jax.random.key(0), draws)))  # [draws, 3 images, 3]
    assert ((ids[..., 1] == SEP) | (ids[..., 2] == SEP)).all()
    for b in range(3):
      words = ids[:, b, 1]
      assert (want[b, words] > 0).all(), (temperature, top_k, top_p, b)
      freq = np.bincount(words, minlength=want.shape[1]) / draws
      bound = 4 * np.sqrt(want[b] * (1 - want[b]) / draws) + 2 / draws
      assert (np.abs(freq - want[b]) <= bound).all(), (temperature, top_k, top_p, b)


def test_sampling_is_seeded_and_cold_sampling_is_greedy():
  config, model, params, feats, boxes = _setup()
  kw = dict(model=model, visual={"visual_feats": feats}, boxes=boxes, max_len=config.max_len, tokens=TOKENS)
  sample = jax.jit(lambda p, r, t: captions.sample_captions(p, r, temperature=t, **kw))
  a, b = sample(params, jax.random.key(1), 1.0), sample(params, jax.random.key(2), 1.0)
  assert (np.asarray(a) != np.asarray(b)).any()  # different rngs, different captions
  np.testing.assert_array_equal(np.asarray(sample(params, jax.random.key(1), 1.0)), np.asarray(a))
  cold = sample(params, jax.random.key(3), 1e-4)  # temperature -> 0 is greedy
  np.testing.assert_array_equal(np.asarray(cold), np.asarray(jax.jit(lambda p: captions.greedy_captions(p, **kw))(
      params)))
  for ids in (np.asarray(a), np.asarray(cold)):
    assert (ids[:, 0] == CLS).all() and ((ids == SEP).sum(1) == 1).all()
    assert not np.isin(ids[:, 1:], [CLS, MASK]).any()


def test_causal_layout_trains_what_decoding_reads():
  """One causal pass over whole captions gives, at each word, the log-probabilities that decoding computes from
  the words before it alone: no later word reaches an earlier prediction (not through the cells either), and
  the loss is the mean of those per-word cross-entropies."""
  config, model, params, feats, boxes = _setup()
  rng = np.random.default_rng(1)
  length = config.max_len
  ids = np.full((3, length), PAD, np.int32)
  for b, n in enumerate((length, 6, 3)):  # one caption fills the whole length
    ids[b, :n] = [CLS] + list(rng.integers(5, 30, size=n - 2)) + [SEP]
  text_mask = (ids != PAD).astype(np.int32)
  layout = layouts.i2t_causal_inputs(text_ids=ids, text_mask=text_mask, pad_id=PAD)
  out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(text_mask), boxes=boxes, visual_feats=feats,
                    text_attention=layout.text_attention, vision_text_mask=layout.vision_text_mask,
                    text_logits=True)
  one_pass = np.asarray(jax.nn.log_softmax(out.text_logits, axis=-1))
  losses = []
  for b in range(3):
    for l in range(1, int(text_mask[b].sum())):
      prefix = np.where(np.arange(length) < l, ids[b], PAD)[None]
      step = captions.next_word_log_probs(params, jnp.asarray(prefix), jnp.asarray(l), model=model,
                                          visual={"visual_feats": feats[b:b + 1]}, boxes=boxes[b:b + 1],
                                          tokens=TOKENS, layout="causal")
      words = ~np.isin(np.arange(one_pass.shape[-1]), (CLS, MASK, PAD))  # the words a decoder may produce
      if l < length - 1:
        expected = one_pass[b, l - 1] - np.log(np.exp(one_pass[b, l - 1][words]).sum())
        np.testing.assert_allclose(np.asarray(step[0])[words], expected[words], atol=2e-5)
      losses.append(-one_pass[b, l - 1, ids[b, l]])
  assert layout.weights.sum() == len(losses)
  loss, _ = task_losses.cross_entropy(out.text_logits, layout.targets, layout.weights, label_smoothing=0.0)
  np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
