"""The model learns: each task's loss on one fixed batch of 8 random examples falls, with Adam, to a small
fraction of where it starts (``configs/model.py:tiny`` with one layer of each kind, no dropout, no label
smoothing). T2I sits near the marginal of the clusters for ~300 steps before it memorises the cells of each
caption, hence 500 steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bigen_jax.data import records
from bigen_jax.models import lxmert
from bigen_jax.tasks import i2t
from bigen_jax.tasks import t2i
from configs import model as model_configs

PAD, CLS, SEP, MASK = 0, 2, 3, 4
BATCH, STEPS, LR = 8, 500, 3e-3
FRACTION = 0.2  # the loss after STEPS updates is below FRACTION x the loss at initialisation


def _model_config():
  config = model_configs.get_config("tiny")
  config.update(dict(dropout_rate=0.0, attention_dropout_rate=0.0, num_language_layers=1, num_vision_layers=1,
                     num_cross_layers=1))
  return config


def _batch(config, seed=0):
  """One random batch: captions [CLS] w.. [SEP] of 3..L-2 words, cluster ids [B, 16], dense = centroid +
  noise [B, 16, D], the 4x4 grid boxes; and the codebook [K, D]."""
  rng = np.random.default_rng(seed)
  b, length, cells = BATCH, config.max_len, config.num_cells
  codebook = rng.normal(size=(config.num_clusters, config.visual_feat_dim)).astype(np.float32)
  words = rng.integers(MASK + 1, config.vocab_size, (b, length))
  num_words = rng.integers(3, length - 1, b)
  index = np.arange(length)[None]
  text_ids = np.where(index == 0, CLS, np.where(index <= num_words[:, None], words,
                                                 np.where(index == num_words[:, None] + 1, SEP, PAD)))
  cluster_ids = rng.integers(0, config.num_clusters, (b, cells))
  dense = codebook[cluster_ids] + 0.1 * rng.normal(size=(b, cells, config.visual_feat_dim))
  boxes = np.broadcast_to(records.grid_boxes(int(np.sqrt(cells))), (b, cells, 4))
  batch = {"text_ids": text_ids.astype(np.int32), "text_mask": (text_ids != PAD).astype(np.int32),
           "dense": dense.astype(np.float32), "cluster_ids": cluster_ids.astype(np.int32),
           "boxes": boxes.astype(np.float32)}
  return jax.tree.map(jnp.asarray, batch), jnp.asarray(codebook)


def _task_cfg(**kw):
  return ml_collections.FrozenConfigDict(dict(
      mask_id=MASK, pad_id=PAD, cls_id=CLS, sep_id=SEP, label_smoothing=0.0, mask_schedule="count",
      min_masked=6, max_masked=64, caption_dropout=0.0, **kw))


def _fit(loss_fn, cfg, *, steps=STEPS):
  """(loss before, loss after) ``steps`` Adam updates on one batch; each step draws fresh masks, the
  reported loss is the deterministic one at a fixed rng."""
  config = _model_config()
  model = lxmert.build_model(config)
  params = jax.jit(lambda key: nn.unbox(lxmert.init_params(model, config, key)))(jax.random.key(0))
  batch, codebook = _batch(config)
  frozen = {"codebook": codebook}
  tx = optax.adam(LR)

  def objective(params, rng):
    return loss_fn(params, batch, rng, model=model, cfg=cfg, frozen=frozen)[0]

  @jax.jit
  def train(params):
    def step(carry, i):
      params, opt_state = carry
      grads = jax.grad(objective)(params, jax.random.fold_in(jax.random.key(1), i))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return params

  @jax.jit
  def evaluate(params):
    return loss_fn(params, batch, jax.random.key(2), model=model, cfg=cfg, frozen=frozen, deterministic=True)[0]

  return float(evaluate(params)), float(evaluate(train(params)))


@pytest.mark.parametrize("task, loss_fn, cfg", [
    ("i2t", i2t.loss_fn, _task_cfg(visual_input="dense")),
    ("i2t_causal", i2t.loss_fn, _task_cfg(visual_input="dense", layout="causal")),
    ("t2i", t2i.loss_fn, _task_cfg(visual_input="discrete")),
])
def test_overfits_one_batch(task, loss_fn, cfg):
  before, after = _fit(loss_fn, cfg)
  print(f"{task}: loss {before:.3f} -> {after:.3f} in {STEPS} steps")
  assert np.isfinite(after)
  assert after < FRACTION * before, (task, before, after)
