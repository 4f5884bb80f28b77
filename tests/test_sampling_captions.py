"""I2T decoders: greedy equals a step-by-step Python loop of argmax with the model; beam size 1 equals
greedy; beam search finds the best of all captions of a tiny vocabulary; sampling honours top-k/top-p."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
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


def test_sampling_respects_top_k_and_top_p():
  log_probs = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_k=2)), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_p=0.8)), [[1, 1, 0, 0]])
  np.testing.assert_array_equal(np.isfinite(captions.filter_logits(log_probs, top_p=0.81)), [[1, 1, 1, 0]])
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
