"""Greedy I2T decoding equals a step-by-step Python loop of argmax with the model."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
from configs import model as model_config

CLS, SEP, MASK, PAD = 2, 3, 4, 0


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
      p, model=model, visual={"visual_feats": f}, boxes=bx, max_len=config.max_len, cls_id=CLS, sep_id=SEP,
      mask_id=MASK, pad_id=PAD))
  got = np.asarray(decode(params, feats, boxes))
  np.testing.assert_array_equal(got, _reference(config, model, params, feats, boxes))
  assert (got[:, 0] == CLS).all() and ((got == SEP).sum(1) == 1).all()
