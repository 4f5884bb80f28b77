"""X-LXMERT's Gibbs captioning (``captions.gibbs_captions``): at temperature 0 it equals a Python loop of argmax
over the same model calls, each sweep visits every slot once, a seed fixes the sample, captions end at [SEP], and
the registry's "gibbs" decoder runs it with the captioning evaluator's arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
from bigen_jax.sampling import registry
from configs import model as model_config

CLS, SEP, MASK, PAD = 2, 3, 4, 0
TOKENS = captions.Tokens(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD)


@pytest.fixture(scope="module")
def setup():
  """The tiny model at init std 1 (at BERT's 0.02 its argmax word ignores the context), 3 images."""
  config = model_config.get_config("tiny")
  config.init_std = 1.0
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(3, config.num_cells, config.visual_feat_dim)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(size=(3, config.num_cells, 4)), jnp.float32)
  return config, model, params, feats, boxes


def _decode(setup, rng, **kw):
  config, model, params, feats, boxes = setup
  fn = jax.jit(lambda p, key: captions.gibbs_captions(p, key, model=model, visual={"visual_feats": feats},
                                                      boxes=boxes, max_len=config.max_len, tokens=TOKENS, **kw))
  return np.asarray(fn(params, rng))


def _reference(setup, visits, length):
  """Gibbs sampling at temperature 0 in Python: one model call per visited slot, one image at a time."""
  config, model, params, feats, boxes = setup
  out = []
  for b in range(feats.shape[0]):
    ids = np.full(config.max_len, PAD)
    ids[0], ids[1:length + 1], ids[length + 1] = CLS, MASK, SEP
    mask = (np.arange(config.max_len) <= length + 1).astype(np.int32)
    for l in visits[b]:
      inputs = ids.copy()
      inputs[l] = MASK
      res = model.apply({"params": params}, jnp.asarray(inputs[None]), jnp.asarray(mask[None]),
                        boxes=boxes[b:b + 1], visual_feats=feats[b:b + 1], text_logits=True)
      logits = np.array(res.text_logits[0, l])
      logits[[CLS, MASK, PAD]] = -np.inf
      ids[l] = int(np.argmax(logits))
    first_sep = int(np.argmax(ids == SEP))
    ids[first_sep + 1:] = PAD
    out.append(ids)
  return np.array(out)


@pytest.mark.parametrize("order", ["left_to_right", pytest.param("random", marks=pytest.mark.slow)])  # 45 s
def test_argmax_equals_a_python_loop(setup, order):
  config = setup[0]
  length, sweeps, rng = config.max_len - 3, 2, jax.random.key(3)
  got = _decode(setup, rng, num_sweeps=sweeps, length=length, order=order)
  visits = np.asarray(captions.gibbs_visits(jax.random.split(rng)[0], batch=3, length=length, num_sweeps=sweeps,
                                            order=order))
  np.testing.assert_array_equal(got, _reference(setup, visits, length))
  assert (got[:, 0] == CLS).all() and ((got == SEP).sum(1) == 1).all()
  assert not np.isin(got[:, 1:], [CLS, MASK]).any()


def test_each_sweep_visits_every_slot_once():
  visits = np.asarray(captions.gibbs_visits(jax.random.key(0), batch=4, length=5, num_sweeps=3, order="random"))
  assert visits.shape == (4, 15)
  for sweep in visits.reshape(4, 3, 5).reshape(12, 5):
    assert sorted(sweep) == [1, 2, 3, 4, 5]
  assert len({tuple(s) for s in visits.reshape(12, 5)}) > 1  # orders differ between images and sweeps
  ltr = np.asarray(captions.gibbs_visits(jax.random.key(0), batch=2, length=3, num_sweeps=2, order="left_to_right"))
  np.testing.assert_array_equal(ltr, [[1, 2, 3, 1, 2, 3]] * 2)
  with pytest.raises(ValueError, match="gibbs_order"):
    captions.gibbs_visits(jax.random.key(0), batch=1, length=3, num_sweeps=1, order="spiral")


def test_a_seed_fixes_the_sample(setup):
  kw = dict(num_sweeps=2, order="random", temperature=1.0)
  first, again = _decode(setup, jax.random.key(5), **kw), _decode(setup, jax.random.key(5), **kw)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, _decode(setup, jax.random.key(6), **kw))


def test_captions_end_at_their_first_sep():
  ids = jnp.asarray([[CLS, 7, SEP, 9, SEP, PAD], [CLS, 7, 8, 9, 10, SEP]])
  np.testing.assert_array_equal(captions.end_at_sep(ids, TOKENS),
                                [[CLS, 7, SEP, PAD, PAD, PAD], [CLS, 7, 8, 9, 10, SEP]])


def test_length_is_checked(setup):
  with pytest.raises(ValueError, match="gibbs_length"):
    _decode(setup, jax.random.key(0), length=setup[0].max_len - 1)


def test_registry_runs_gibbs_with_the_evaluators_arguments(setup):
  config, model, params, feats, boxes = setup
  decoder = registry.caption_decoder("gibbs", {"gibbs_sweeps": 2, "gibbs_length": 4, "gibbs_order": "random",
                                               "beam_size": 3})
  got = decoder(params, jax.random.key(1), model=model, visual={"visual_feats": feats}, boxes=boxes,
                max_len=config.max_len, tokens=TOKENS, layout="causal")
  want = captions.gibbs_captions(params, jax.random.key(1), model=model, visual={"visual_feats": feats},
                                 boxes=boxes, max_len=config.max_len, tokens=TOKENS, num_sweeps=2, length=4,
                                 order="random")
  np.testing.assert_array_equal(got, want)
