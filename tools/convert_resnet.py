r"""Converts a torchvision ResNet-50 state dict into Flax variables of ``bigen_jax.models.resnet``.

  python tools/convert_resnet.py --torch_weights resnet50-11ad3fa6.pth --out checkpoints/resnet50.npz

Input: a .pth/.bin (``torch.load``, weights only) or .safetensors state dict of ``torchvision.models.resnet50``
(any classifier width; a ``module.`` prefix and ``num_batches_tracked`` are ignored). Any unknown, missing or
mis-shaped tensor (another ResNet depth, another model) stops the conversion with one line that counts them
(with examples) and names the input.
Output: {"params", "batch_stats"} as a ``.npz`` file (keys 'params/layer1/0/conv1/kernel') or else an orbax
checkpoint directory, via ``bigen_jax.convert.io.save_params``; read it back with ``io.load_params`` and pass
it to ``bigen_jax.models.resnet.perceptual_loss`` or ``ResNet50.apply``.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_TORCH_WEIGHTS = flags.DEFINE_string("torch_weights", None, "torchvision resnet50 state dict (.pth, .bin or "
                                     ".safetensors).", required=True)
_OUT = flags.DEFINE_string("out", None, "A .npz file, or an orbax checkpoint directory.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax.convert import io  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import resnet  # pylint: disable=g-import-not-at-top
  state = io.load_state_dict(_TORCH_WEIGHTS.value)
  with io.naming_file(_TORCH_WEIGHTS.value):
    variables = resnet.params_from_torch(state)
  io.save_params(variables, _OUT.value)
  logging.info("converted %d tensors of ResNet-50 (%d classes) -> %s", len(state),
               int(variables["params"]["fc"]["bias"].shape[0]), _OUT.value)


if __name__ == "__main__":
  cli.run(main)
