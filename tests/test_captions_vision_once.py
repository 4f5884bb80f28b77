"""Caption decoding computes the vision stream once (``captions.encode_vision``) and each step runs the language
and cross-modality layers from it: greedy, sampled, beam and Gibbs captions equal those of the whole model at every
step (the path a ``caption_to_cells`` model takes), token for token, and the step log-probabilities agree to 1e-5,
in both I2T layouts, scanned and unscanned layers, for the two-model ablation, and in SCST's log-probabilities."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigen_jax.models import apply
from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
from bigen_jax.tasks import scst
from configs import model as model_config

CLS, SEP, MASK, PAD = 2, 3, 4, 0
TOKENS = captions.Tokens(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD)


def _setup(scan_layers: bool, **overrides):
  """The tiny model at init std 0.5 (at BERT's 0.02 its next word hardly depends on the image), 3 images."""
  config = model_config.get_config("tiny")
  config.update(dict(init_std=0.5, scan_layers=scan_layers, **overrides))
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(3, config.num_cells, config.visual_feat_dim)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(size=(3, config.num_cells, 4)), jnp.float32)
  kw = dict(model=model, visual={"visual_feats": feats}, boxes=boxes, max_len=config.max_len, tokens=TOKENS)
  return params, kw


DECODERS = {
    "greedy": lambda p, kw, layout: captions.greedy_captions(p, layout=layout, **kw),
    "sample": lambda p, kw, layout: captions.sample_captions(p, jax.random.key(1), temperature=1.5, layout=layout,
                                                             **kw),
    "beam": lambda p, kw, layout: captions.beam_search_captions(p, beam_size=3, layout=layout, **kw),
    # Gibbs reads the whole caption (the MLM layout): no layout argument.
    "gibbs": lambda p, kw, layout: captions.gibbs_captions(p, jax.random.key(2), num_sweeps=2, temperature=1.0,
                                                           **kw),
}


def _both(monkeypatch, name: str, params, kw, layout: str):
  """Decoder ``name``'s output (numpy) with the vision stream computed once, and with the whole model run at
  every step (``captions.encode_vision`` patched to None, the path of a ``caption_to_cells`` model); each traced
  afresh."""
  run = lambda: jax.tree.map(np.asarray, jax.jit(lambda p: DECODERS[name](p, kw, layout))(params))
  once = run()
  with monkeypatch.context() as m:
    m.setattr(captions, "encode_vision", lambda *args, **kwargs: None)
    return once, run()


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])  # scanned: ~12 s each
@pytest.mark.parametrize("layout", ["mask", "causal"])
def test_greedy_and_its_step_log_probs_equal_the_whole_model(monkeypatch, scan_layers, layout):
  params, kw = _setup(scan_layers)
  once, whole = _both(monkeypatch, "greedy", params, kw, layout)
  np.testing.assert_array_equal(once, whole)

  # Every step of those captions: the same distribution from the precomputed vision stream [B, M, H].
  ids, model, visual, boxes = jnp.asarray(once), kw["model"], kw["visual"], kw["boxes"]
  vision = jax.jit(lambda p: captions.encode_vision(p, model=model, visual=visual, boxes=boxes))(params)
  assert vision.shape == (3, boxes.shape[1], params["text_embed"]["word"]["embedding"].shape[1])
  step = jax.jit(lambda p, l, v: captions.next_word_log_probs(p, ids, l, model=model, visual=visual, boxes=boxes,
                                                              tokens=TOKENS, layout=layout, vision=v))
  for l in range(1, ids.shape[1]):
    got = np.asarray(step(params, jnp.asarray(l), vision))
    np.testing.assert_allclose(got, step(params, jnp.asarray(l), None), rtol=1e-5, atol=1e-5,
                               err_msg=f"position {l}")
    if l == 1:  # the image matters, or the check above would pass with any vision stream
      assert np.abs(np.exp(got[0]) - np.exp(got[1])).max() > 1e-3


@pytest.mark.parametrize("name,layout,scan_layers", [("sample", "causal", True), ("beam", "mask", False),
                                                     ("gibbs", "mask", True)])
def test_other_decoders_equal_the_whole_model(monkeypatch, name, layout, scan_layers):
  params, kw = _setup(scan_layers)
  once, whole = _both(monkeypatch, name, params, kw, layout)
  if name == "beam":
    np.testing.assert_array_equal(once[0], whole[0])
    np.testing.assert_allclose(once[1], whole[1], rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_array_equal(once, whole)


def test_two_model_encodes_with_its_captioner(monkeypatch):
  """The two-model ablation's vision stream is the I2T model's (its T2I half has other weights)."""
  params, kw = _setup(False, two_model=True)
  np.testing.assert_array_equal(*_both(monkeypatch, "greedy", params, kw, "mask"))
  model = kw["model"]
  i2t = apply.encode_vision(model, params, task="i2t", boxes=kw["boxes"], **kw["visual"])
  t2i = apply.encode_vision(model, params, task="t2i", boxes=kw["boxes"], **kw["visual"])
  alone = model.i2t.apply({"params": params["i2t"]}, kw["boxes"], method="encode_vision", **kw["visual"])
  np.testing.assert_array_equal(i2t, alone)
  assert not np.allclose(i2t, t2i)


def test_caption_to_cells_runs_the_whole_model():
  """A model whose cells read the caption has no image-only vision stream: decoding runs it whole each step."""
  params, kw = _setup(False, caption_to_cells=True)
  model = kw["model"]
  assert captions.encode_vision(params, model=model, visual=kw["visual"], boxes=kw["boxes"]) is None
  with pytest.raises(ValueError, match="caption_to_cells"):
    apply.encode_vision(model, params, task="i2t", boxes=kw["boxes"], **kw["visual"])
  got = np.asarray(jax.jit(lambda p: captions.greedy_captions(p, **kw))(params))
  assert got.shape == (3, kw["max_len"]) and (got[:, 0] == CLS).all()


def test_vision_encoder_replaces_the_visual_input():
  params, kw = _setup(False)
  model, ids = kw["model"], jnp.full((3, kw["max_len"]), 7, jnp.int32)
  vision = model.apply({"params": params}, kw["boxes"], method="encode_vision", **kw["visual"])
  whole = model.apply({"params": params}, ids, boxes=kw["boxes"], **kw["visual"])
  reused = model.apply({"params": params}, ids, vision_encoder=vision)
  np.testing.assert_array_equal(whole.vision_encoder, vision)
  np.testing.assert_allclose(reused.language, whole.language, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reused.vision, whole.vision, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="either vision_encoder or the visual input"):
    model.apply({"params": params}, ids, vision_encoder=vision, boxes=kw["boxes"])
  with pytest.raises(ValueError, match="boxes"):
    model.apply({"params": params}, ids, **kw["visual"])


def test_scst_log_probs_and_gradient_equal_the_whole_model(monkeypatch):
  """SCST's mask-layout log-probabilities (one pass per position) read the vision stream computed once: the same
  values and gradient as running the whole model at every position."""
  params, kw = _setup(False)
  ids = jax.jit(lambda p: captions.greedy_captions(p, **kw))(params)
  inputs = dict(model=kw["model"], visual=kw["visual"], boxes=kw["boxes"], tokens=TOKENS, layout="mask")

  def value_and_grad():
    fn = lambda p: scst.sequence_log_probs(p, ids, **inputs).sum()
    return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(fn))(params))

  once = value_and_grad()
  with monkeypatch.context() as m:
    m.setattr(captions, "encode_vision", lambda *args, **kwargs: None)
    whole = value_and_grad()
  np.testing.assert_allclose(once[0], whole[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(once[1]), jax.tree.leaves(whole[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
