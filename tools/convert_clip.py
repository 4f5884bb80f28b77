r"""Converts an open_clip CLIP state dict (ViT towers) into params of ``bigen_jax.models.clip``.

  python tools/convert_clip.py --model ViT-B-32 --checkpoint open_clip_pytorch_model.bin --out checkpoints/clip
  python tools/convert_clip.py --model ViT-B-32-quickgelu --checkpoint openai_b32.safetensors --out clip.npz
  python tools/convert_clip.py --model auto --checkpoint model.safetensors --out clip.npz   # config from shapes
  python tools/convert_clip.py --model tiny --random_init --seed 0 --out /tmp/clip_tiny.npz   # tests

Input: a .pth/.bin (``torch.load``, weights only) or .safetensors state dict of ``open_clip.model.CLIP``, or
with ``--random_init`` the randomly initialised open_clip model of ``--model`` (``torch.manual_seed(--seed)``;
open_clip's ``create_model`` for its names, ``open_clip.model.CLIP`` for ``tiny``). ``--model``: ViT-B-32,
ViT-B-16 (optionally -quickgelu: OpenAI's weights were trained with QuickGELU, open_clip's LAION ones with
GELU), vit_b32, vit_b16, tiny, or auto (``convert.clip.config_from_state_dict``: 64-wide heads; add
--quick_gelu for OpenAI's weights). Unknown, missing or mis-shaped tensors stop the conversion with one line
that counts them (with examples) and names the input.
Output: a ``.npz`` file (keys 'visual/conv1/kernel') or else an orbax checkpoint directory, via
``bigen_jax.convert.io.save_params``; read it back with ``io.load_params`` and apply ``clip.build_model``.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_MODEL = flags.DEFINE_string("model", "ViT-B-32", "ViT-B-32, ViT-B-16 (+ -quickgelu), vit_b32, vit_b16, tiny or "
                             "auto (read the config off the checkpoint's shapes).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "open_clip state dict (.pth, .bin or .safetensors).")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Convert open_clip's random init of --model instead.")
_SEED = flags.DEFINE_integer("seed", 0, "torch.manual_seed of --random_init.")
_QUICK_GELU = flags.DEFINE_bool("quick_gelu", None, "Override the config's activation (QuickGELU: OpenAI's).")
_OUT = flags.DEFINE_string("out", None, "A .npz file, or an orbax checkpoint directory.", required=True)


def _random_state_dict(model: str, config) -> dict:
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import clip as convert  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import clip  # pylint: disable=g-import-not-at-top
  torch.manual_seed(_SEED.value)
  if model.removesuffix("-quickgelu") in clip.OPEN_CLIP_NAMES:
    net = open_clip.create_model(model, pretrained=None)
  else:
    net = open_clip.model.CLIP(**convert.open_clip_kwargs(config))
  return net.state_dict()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RANDOM_INIT.value == bool(_CHECKPOINT.value):
    raise app.UsageError("give exactly one of --checkpoint PATH and --random_init")
  if _RANDOM_INIT.value and _MODEL.value == "auto":
    raise app.UsageError("--random_init needs a named --model, not auto")
  from bigen_jax.convert import clip as convert  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import io  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import clip  # pylint: disable=g-import-not-at-top
  overrides = {} if _QUICK_GELU.value is None else {"quick_gelu": _QUICK_GELU.value}
  source = _CHECKPOINT.value or f"random init of {_MODEL.value} (seed {_SEED.value})"
  with io.naming_file(source):
    if _MODEL.value == "auto":
      state = io.load_state_dict(_CHECKPOINT.value)
      config = convert.config_from_state_dict(state, **overrides)
    else:
      try:
        config = clip.clip_config(_MODEL.value, **overrides)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
      state = (_random_state_dict(_MODEL.value, config) if _RANDOM_INIT.value
               else io.load_state_dict(_CHECKPOINT.value))
    params = convert.params_from_torch(state, config)
  io.save_params(params, _OUT.value)
  logging.info("converted %d tensors of %s -> %s; config: %s", len(state), source, _OUT.value,
               ", ".join(f"{k}={v}" for k, v in sorted(config.items())))


if __name__ == "__main__":
  cli.run(main)
