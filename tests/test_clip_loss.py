"""Stage 2's CLIP loss (text -> image): gradients reach the transformer and nothing frozen; the hard, noise-free
loss is the CLIP cosine of the image ``parallel_decode``'s ids draw; a few Adam steps on one batch raise the cosine;
Gumbel-softmax and the decoder's intermediate state on their own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bigen_jax.models import clip
from bigen_jax.models import lxmert
from bigen_jax.models import spade
from bigen_jax.sampling import image_tokens
from bigen_jax.tasks import clip_loss
from bigen_jax.tasks import layouts
from configs import model as model_config

PAD, CLS, SEP, MASK = 0, 2, 3, 4
BATCH, RECORDS, CAPTIONS, CLIP_LEN = 3, 5, 3, 12
CLIP_CONFIG = clip.clip_config("tiny", image_size=24, vocab_size=500, context_length=CLIP_LEN)  # 32 px -> 24 px


def _cfg(**overrides):
  fields = dict(weight=1, num_steps=4, schedule="linear", order="mask_predict", tau=1.0, hard=False, scale=2.5,
                clip_model=CLIP_CONFIG.to_dict(), mask_id=MASK, pad_id=PAD, cls_id=CLS, sep_id=SEP)
  return ml_collections.FrozenConfigDict({**fields, **overrides})


@pytest.fixture(scope="module")
def setup():
  """The tiny model (64 cells, 12 clusters) and its params, a batch of 3 captions, and the frozen inputs: a random
  codebook [12, 16], a random 32 px generator, a random tiny CLIP and CLIP ids [5 records, 3 captions, 12]."""
  config = model_config.get_config("tiny")
  config.num_cells = 64
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  words = rng.integers(5, config.vocab_size, (BATCH, config.max_len))
  length = np.arange(config.max_len)[None] <= np.array([[3], [5], [7]])
  text_ids = np.where(np.arange(config.max_len) == 0, CLS, np.where(length, words, PAD))
  batch = dict(text_ids=jnp.asarray(text_ids, jnp.int32), text_mask=jnp.asarray(length, jnp.int32),
               boxes=jnp.asarray(rng.uniform(size=(BATCH, 64, 4)), jnp.float32),
               index=jnp.asarray([2, 2, 1], jnp.int32), caption_index=jnp.asarray([2, 1, 2], jnp.int32))
  generator = nn.unbox(spade.init_generator(spade.spade_config("tiny", feature_dim=config.visual_feat_dim),
                                            jax.random.key(1)))
  clip_params = nn.unbox(clip.init_params(clip.build_model(CLIP_CONFIG), jax.random.key(2)))
  visual = clip_params["visual"]  # at init these two swamp the class token: every image would embed alike
  visual["class_embedding"], visual["positional_embedding"] = (jnp.zeros_like(visual[k]) for k in
                                                               ("class_embedding", "positional_embedding"))
  frozen = {"codebook": jnp.asarray(rng.normal(size=(config.num_clusters, config.visual_feat_dim)), jnp.float32),
            "generator": generator, "clip": clip_params,
            "clip_text": jnp.asarray(rng.integers(1, CLIP_CONFIG.vocab_size, (RECORDS, CAPTIONS, CLIP_LEN)),
                                     jnp.int32)}
  return model, params, batch, frozen


def _objective(model, batch, cfg, frozen):
  """(params, generator, clip params, codebook, rng) -> (loss, metrics), every frozen input an argument."""
  def objective(params, generator, clip_params, codebook, rng):
    inputs = {**frozen, "generator": generator, "clip": clip_params, "codebook": codebook}
    return clip_loss.loss_fn(params, batch, rng, model=model, cfg=cfg, frozen=inputs)
  return objective


def test_gradients_reach_the_transformer_only(setup):
  model, params, batch, frozen = setup
  grad_fn = jax.jit(jax.grad(_objective(model, batch, _cfg(), frozen), argnums=(0, 1, 2, 3), has_aux=True))
  (g_params, g_generator, g_clip, g_codebook), metrics = grad_fn(
      params, frozen["generator"], frozen["clip"], frozen["codebook"], jax.random.key(3))
  assert float(metrics["relaxed_cells"]) == 16  # 64 -> 48 -> 32 -> 16: the last pass decides 16 cells
  assert float(metrics["cos"]) > 0 and 0 < float(metrics["entropy"]) < np.log(12)
  np.testing.assert_allclose(float(metrics["loss"]), -2.5 * float(metrics["clip_score"]), rtol=1e-6)
  leaves = jax.tree.leaves(g_params)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  for frozen_grads in (g_generator, g_clip, g_codebook):
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(frozen_grads))


@pytest.mark.parametrize("num_steps,guidance", [(1, 0.0), (4, 0.0),
                                                pytest.param(4, 3.0, marks=pytest.mark.slow)])  # ~18 s: guided
def test_hard_noise_free_loss_scores_the_decoded_image(setup, num_steps, guidance):
  """hard and deterministic: the relaxed grid is the one-hot grid of ``parallel_decode``'s ids (classifier-free
  guided with ``guidance``), so the loss is recomputed by hand from the decoder, the generator and CLIP with the
  task's keys; with CLIP's text projection negated every cosine is negative and relu(100 cos) leaves a zero loss."""
  model, params, batch, frozen = setup
  cfg = _cfg(hard=True, num_steps=num_steps, guidance=guidance)
  null_ids, null_mask = layouts.null_captions(batch["text_ids"], cls_id=CLS, sep_id=SEP, pad_id=PAD)
  rng = jax.random.key(4)
  loss_fn = jax.jit(lambda p, c, r: clip_loss.loss_fn(p, batch, r, model=model, cfg=cfg,
                                                      frozen={**frozen, "clip": c}, deterministic=True))

  @jax.jit
  def by_hand(params, clip_params, rng):
    decode_rng, _, noise_rng = jax.random.split(rng, 3)
    ids, _ = image_tokens.parallel_decode(params, decode_rng, model=model, text_ids=batch["text_ids"],
                                          text_mask=batch["text_mask"], boxes=batch["boxes"],
                                          codebook=frozen["codebook"], num_steps=num_steps, guidance=guidance,
                                          null_text_ids=null_ids, null_text_mask=null_mask)
    images = spade.decode_image(frozen["generator"], spade.centroid_grid(frozen["codebook"], ids), noise_rng)
    pixels = clip.preprocess(images, image_size=24, value_range=(-1.0, 1.0))
    texts = frozen["clip_text"][np.array([2, 2, 1]), np.array([2, 1, 2])]
    return clip.frozen_similarity(clip_params, pixels, texts, model=clip.build_model(CLIP_CONFIG))

  negated = {**frozen["clip"], "text_projection": -frozen["clip"]["text_projection"]}
  for sign, clip_params in ((1, frozen["clip"]), (-1, negated)):
    loss, metrics = loss_fn(params, clip_params, rng)
    cos = np.asarray(by_hand(params, clip_params, rng))
    assert (np.sign(cos) == sign).all()
    np.testing.assert_allclose(float(metrics["cos"]), cos.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), -2.5 * np.maximum(100 * cos, 0).mean(), rtol=1e-5)
    assert float(metrics["relaxed_cells"]) == 64 // num_steps and 0 < float(metrics["entropy"]) < np.log(12)
  if guidance:  # guidance changes the decoded grid: the check above would not pass with the unguided one
    decode = lambda w: image_tokens.parallel_decode(
        params, jax.random.split(rng, 3)[0], model=model, text_ids=batch["text_ids"], text_mask=batch["text_mask"],
        boxes=batch["boxes"], codebook=frozen["codebook"], num_steps=num_steps, guidance=w, null_text_ids=null_ids,
        null_text_mask=null_mask)[0]
    assert (np.asarray(decode(guidance)) != np.asarray(decode(0.0))).any()


def test_adam_steps_on_one_batch_raise_the_cosine(setup):
  """One decoding pass, one Gumbel draw: the loss is then a smooth function of the params. (With more passes the
  near-uniform logits of a fresh model flip the earlier passes' argmax choices at every step, jumps that the
  gradient does not see and that swamp its effect on one batch.)"""
  model, params, batch, frozen = setup
  optimizer = optax.adam(1e-3)
  cfg = _cfg(num_steps=1)
  objective = lambda p, r: clip_loss.loss_fn(p, batch, r, model=model, cfg=cfg, frozen=frozen)

  @jax.jit
  def step(params, opt_state, rng):
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state, cosines = optimizer.init(params), []
  for _ in range(40):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(5))
    cosines.append(float(metrics["cos"]))
  assert cosines[-1] > cosines[0] + 0.05, cosines  # measured: 0.194 -> 0.299


def test_gumbel_softmax():
  logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]]))
  rngs = jax.random.split(jax.random.key(0), 20_000)
  draw = jax.vmap(lambda r: clip_loss.gumbel_softmax(logits, r, tau=1.0, hard=True))
  hard = np.asarray(draw(rngs))
  assert set(np.unique(hard)) == {0.0, 1.0} and (hard.sum(-1) == 1).all()
  np.testing.assert_allclose(hard.mean(0)[0], [0.6, 0.3, 0.1], atol=0.015)  # argmax(logits + g) ~ softmax(logits)
  np.testing.assert_allclose(clip_loss.gumbel_softmax(logits, None, tau=0.5, hard=False),
                             jax.nn.softmax(2 * logits), rtol=1e-6)
  weights = jnp.asarray([[1.0, -2.0, 0.5]])
  soft_grad, hard_grad = (jax.grad(lambda x, h=h: jnp.sum(weights * clip_loss.gumbel_softmax(
      x, jax.random.key(1), tau=0.7, hard=h)))(logits) for h in (False, True))
  np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-6)  # straight-through: the soft gradient
  assert np.abs(np.asarray(soft_grad)).sum() > 0


def test_relaxed_one_hot_keeps_decided_cells():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
  ids, masked = jnp.asarray([[1, 2, 3, 4], [0, 0, 1, 1]]), jnp.asarray([[True, False, False, True]] * 2)
  probs = np.asarray(clip_loss.relaxed_one_hot(logits, ids, masked, jax.random.key(1), tau=1.0, hard=False))
  expected = clip_loss.gumbel_softmax(logits, jax.random.key(1), tau=1.0, hard=False)
  np.testing.assert_allclose(probs[:, [0, 3]], np.asarray(expected)[:, [0, 3]])
  np.testing.assert_array_equal(probs[:, [1, 2]], np.eye(5)[np.asarray(ids)[:, [1, 2]]])


def test_decode_passes(setup):
  model, params, batch, frozen = setup
  inputs = dict(model=model, text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"],
                codebook=frozen["codebook"], num_steps=4)
  rng = jax.random.key(0)
  passes = jax.jit(lambda p, n: image_tokens.decode_passes(p, rng, passes=n, **inputs), static_argnums=1)
  ids, confidence = jax.jit(lambda p: image_tokens.parallel_decode(p, rng, **inputs))(params)
  all_ids, none_masked, all_confidence = passes(params, 4)
  np.testing.assert_array_equal(all_ids, ids)
  np.testing.assert_array_equal(all_confidence, confidence)
  assert not np.asarray(none_masked).any()
  _, masked, _ = passes(params, 2)
  np.testing.assert_array_equal(np.asarray(masked).sum(-1), [32] * BATCH)
  for bad in (0, 5):
    with pytest.raises(ValueError, match=f"passes={bad}"):
      image_tokens.decode_passes(params, rng, passes=bad, **inputs)


def test_missing_frozen_input_names_the_flag(setup):
  model, params, batch, frozen = setup
  with pytest.raises(ValueError, match=r"frozen\['generator'\].*tasks.clip.weight > 0"):
    clip_loss.loss_fn(params, batch, jax.random.key(0), model=model, cfg=_cfg(),
                      frozen={k: v for k, v in frozen.items() if k != "generator"})
