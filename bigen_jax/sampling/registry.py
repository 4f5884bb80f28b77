"""Decoders by name, beside the task registry (``bigen_jax.tasks``) and the evaluator registry
(``bigen_jax.eval.registry``): pure, jittable functions of (params, inputs, rng) with one signature per kind.

  caption decoders (image -> text)  ``fn(params, rng, *, model, visual, boxes, max_len, tokens) -> ids [B, L]``
      greedy  ``captions.greedy_captions`` (``rng`` unused)
      beam    ``captions.beam_search_captions``'s best beam (settings: beam_size, length_penalty)
      sample  ``captions.sample_captions`` (settings: temperature, top_k, top_p)
      gibbs   ``captions.gibbs_captions``, X-LXMERT's (settings: gibbs_sweeps, gibbs_length, gibbs_order,
              gibbs_temperature); it reads the bidirectional MLM text head whatever I2T's ``layout``
  image-token decoders (text -> image)  ``fn(params, rng, *, model, text_ids, text_mask, boxes, codebook,
      null_text_ids=None, null_text_mask=None) -> (ids [B, M], probabilities [B, M])``
      one per order of ``image_tokens.parallel_decode``: mask_predict, easy_first, left_to_right, random, maskgit
      (settings: num_steps, temperature, schedule, choice_temperature, guidance, readout)

``caption_decoder(name, settings)`` / ``image_decoder(name, settings)`` return the decoder with the settings it
uses taken from ``settings`` (a config block such as ``config.eval.captioning``; absent fields keep their
defaults, fields it does not use are ignored). A new decoder is a function and one line in a table below;
evaluators, SCST, the CLIP loss and the API look it up here.
"""

import functools
from typing import Any, Callable, Mapping

from bigen_jax import errors
from bigen_jax.sampling import captions
from bigen_jax.sampling import image_tokens


def _greedy(params, rng, **inputs):
  del rng  # deterministic
  return captions.greedy_captions(params, **inputs)


def _beam(params, rng, *, beam_size: int = 3, length_penalty: float = 0.0, **inputs):
  del rng  # deterministic
  return captions.beam_search_captions(params, beam_size=beam_size, length_penalty=length_penalty, **inputs)[0][:, 0]


def _gibbs(params, rng, *, gibbs_sweeps: int = 4, gibbs_length: int = -1, gibbs_order: str = "left_to_right",
           gibbs_temperature: float = 0.0, layout: str = "mask", **inputs):
  del layout  # I2T's layout: Gibbs sampling reads the MLM head, which sees the whole caption
  return captions.gibbs_captions(params, rng, num_sweeps=gibbs_sweeps, length=gibbs_length, order=gibbs_order,
                                 temperature=gibbs_temperature, **inputs)


# name -> (decoder, the settings it takes)
CAPTION_DECODERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "greedy": (_greedy, ()),
    "beam": (_beam, ("beam_size", "length_penalty")),
    "sample": (captions.sample_captions, ("temperature", "top_k", "top_p")),
    "gibbs": (_gibbs, ("gibbs_sweeps", "gibbs_length", "gibbs_order", "gibbs_temperature")),
}
IMAGE_DECODERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    order: (functools.partial(image_tokens.parallel_decode, order=order),
            ("num_steps", "temperature", "schedule", "choice_temperature", "guidance", "readout"))
    for order in image_tokens.ORDERS
}


def _lookup(table: Mapping[str, tuple[Callable, tuple[str, ...]]], kind: str, name: str,
            settings: Mapping[str, Any] | None, flag: str) -> Callable:
  if name not in table:
    raise errors.ConfigError(f"{flag}={name!r}: unknown {kind} decoder; expected one of {sorted(table)}")
  fn, fields = table[name]
  settings = settings or {}
  return functools.partial(fn, **{k: settings[k] for k in fields if k in settings})


def caption_decoder(name: str, settings: Mapping[str, Any] | None = None, *, flag: str = "decoder") -> Callable:
  """The caption decoder ``name`` (``CAPTION_DECODERS``) with its settings from ``settings``; an unknown name is
  a ``ConfigError`` naming ``flag``."""
  return _lookup(CAPTION_DECODERS, "caption", name, settings, flag)


def image_decoder(name: str, settings: Mapping[str, Any] | None = None, *, flag: str = "order") -> Callable:
  """The image-token decoder ``name`` (``IMAGE_DECODERS``: an order) with its settings from ``settings``; an
  unknown name is a ``ConfigError`` naming ``flag``."""
  return _lookup(IMAGE_DECODERS, "image-token", name, settings, flag)
