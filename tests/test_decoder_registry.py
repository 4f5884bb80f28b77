"""The decoder registry (``sampling.registry``): every decoder by name with the settings it uses from a config
block, unknown names a ConfigError naming the flag, and a registered decoder is the function it names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigen_jax import errors
from bigen_jax.models import lxmert
from bigen_jax.sampling import captions
from bigen_jax.sampling import image_tokens
from bigen_jax.sampling import registry
from configs import model as model_config

TOKENS = captions.Tokens(cls_id=2, sep_id=3, mask_id=4, pad_id=0)


def test_settings_come_from_the_config_block():
  cfg = ml_collections.ConfigDict(dict(decoder="beam", beam_size=5, num_examples=0, spice=True))
  assert registry.caption_decoder("beam", cfg).keywords == {"beam_size": 5}
  assert registry.caption_decoder("greedy", cfg).keywords == {}
  assert registry.caption_decoder("sample", {"top_p": 0.9, "beam_size": 5}).keywords == {"top_p": 0.9}
  settings = dict(order="maskgit", num_steps=8, temperature=1.0, schedule="cosine", choice_temperature=4.5,
                  guidance=0.0, batch_size=64)
  decoder = registry.image_decoder("maskgit", settings)
  assert decoder.func is image_tokens.parallel_decode
  assert decoder.keywords == {k: v for k, v in settings.items() if k != "batch_size"}
  assert sorted(registry.IMAGE_DECODERS) == sorted(image_tokens.ORDERS)


def test_unknown_decoders_name_the_flag():
  with pytest.raises(errors.ConfigError, match="--config.eval.captioning.decoder='nucleus'.*greedy"):
    registry.caption_decoder("nucleus", flag="--config.eval.captioning.decoder")
  with pytest.raises(errors.ConfigError, match="order='zigzag'.*mask_predict"):
    registry.image_decoder("zigzag")


def test_a_registered_caption_decoder_is_the_function_it_names():
  config = model_config.get_config("tiny")
  model = lxmert.build_model(config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config, jax.random.key(0)))())
  rng = np.random.default_rng(0)
  inputs = dict(model=model, boxes=jnp.asarray(rng.uniform(size=(2, config.num_cells, 4)), jnp.float32),
                visual={"visual_feats": jnp.asarray(rng.normal(size=(2, config.num_cells, config.visual_feat_dim)),
                                                    jnp.float32)},
                max_len=config.max_len, tokens=TOKENS)
  beam = registry.caption_decoder("beam", {"beam_size": 2})(params, jax.random.key(1), **inputs)
  np.testing.assert_array_equal(beam, captions.beam_search_captions(params, beam_size=2, **inputs)[0][:, 0])


def test_generation_readout_is_a_decoder_field():
  """``eval.generation.readout`` reaches every decoder (variants may override it); an unknown one names the flag,
  and a config saved before the field decodes with the classifier."""
  from bigen_jax.eval import generation  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  cfg = base.get_config("tiny").eval.generation
  cfg.readout = "nearest_centroid"
  cfg.variants = {"guidance": {"guidance": 4.0}, "classifier": {"readout": "classifier"}}
  settings = generation.decoder_settings(cfg)
  assert {name: s["readout"] for name, s in settings.items()} == {
      "": "nearest_centroid", "guidance": "nearest_centroid", "classifier": "classifier"}
  assert registry.image_decoder("mask_predict", settings[""]).keywords["readout"] == "nearest_centroid"
  cfg.readout = "centroid"
  with pytest.raises(errors.ConfigError, match="--config.eval.generation.readout='centroid'"):
    generation.decoder_settings(cfg)
  del cfg["readout"]
  assert generation.decoder_settings(cfg)[""]["readout"] == "classifier"
