"""Caption -> pixels, as pure functions that compile into one: T2I decodes the caption's visual tokens, the frozen
SPADE generator draws their centroid grid (METHOD.md §6-7).

  decode = token_decoder(ctx, settings)               # (params, batch, rng) -> cluster ids int32 [B, 64]
  draw = generator_drawer(codebook)                    # (gen_variables, ids, rng) -> images [B, S, S, 3] in [-1, 1]
  fn = jax.jit(caption_to_pixels(ctx, settings))      # (params, gen_variables, batch, rng) -> (ids, uint8 images)

``batch``: text_ids, text_mask int32 [B, L] and boxes float32 [B, 64, 4] (the grid's, as the records hold them).
``settings``: the decoder's fields (``DECODER_FIELDS``: order, an image-token decoder of ``sampling.registry``;
num_steps, temperature, schedule, choice_temperature, guidance, readout, as ``image_tokens.parallel_decode`` takes
them).
With guidance the null captions are built from the tokenizer's ids. ``gen_variables``: G's frozen {"params",
"spectral"} (``train_generator.load_generator``). The generation evaluator, export and stage 2's CLIP loss use
these pieces.
"""

from typing import Any, Callable, Mapping

import jax

from bigen_jax.models import spade
from bigen_jax.sampling import registry as decoders
from bigen_jax.tasks import layouts

DECODER_FIELDS = ("order", "num_steps", "temperature", "schedule", "choice_temperature", "guidance", "readout")


def token_decoder(ctx, settings: Mapping[str, Any], flag: str = "--config.eval.generation.order") -> Callable:
  """``(params, batch, rng) -> cluster ids int32 [B, 64]``: T2I decoding of ``batch``'s captions with the decoder
  ``settings`` (``flag`` names the order's config field in errors). ``ctx``: ``experiment.Context`` (model,
  tokenizer, frozen codebook)."""
  decoder = decoders.image_decoder(settings["order"], settings, flag=flag)
  tok = ctx.tokenizer

  def decode(params, batch, rng):
    null = {}
    if settings["guidance"]:
      null_ids, null_mask = layouts.null_captions(batch["text_ids"], cls_id=tok.cls_id, sep_id=tok.sep_id,
                                                  pad_id=tok.pad_id)
      null = {"null_text_ids": null_ids, "null_text_mask": null_mask}
    ids, _ = decoder(params, rng, model=ctx.model, text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                     boxes=batch["boxes"], codebook=ctx.frozen["codebook"], **null)
    return ids

  return decode


def generator_drawer(codebook: jax.Array) -> Callable:
  """``(gen_variables, cluster ids [B, 64], rng) -> float32 images [B, S, S, 3] in [-1, 1]``: the frozen generator
  on the ids' centroid grid (``codebook`` [K, D], the visual vocabulary's)."""
  def draw(gen_variables, ids, rng):
    return spade.decode_image(gen_variables, spade.centroid_grid(codebook, ids), rng)
  return draw


def caption_to_pixels(ctx, settings: Mapping[str, Any]) -> Callable:
  """``(params, gen_variables, batch, rng) -> (cluster ids int32 [B, 64], uint8 images [B, S, S, 3])``: the whole
  text-to-image path, one function to ``jax.jit``. The tokens and the generator's noise take independent keys
  split from ``rng``."""
  decode, draw = token_decoder(ctx, settings), generator_drawer(ctx.frozen["codebook"])

  def fn(params, gen_variables, batch, rng):
    token_rng, noise_rng = jax.random.split(rng)
    ids = decode(params, batch, token_rng)
    return ids, spade.to_uint8(draw(gen_variables, ids, noise_rng))

  return fn
