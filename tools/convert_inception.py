r"""Converts an Inception-v3 state dict into Flax variables of ``bigen_jax.models.inception``.

  python tools/convert_inception.py --torch_weights pt_inception-2015-12-05-6726825d.pth \
      --variant fid --out checkpoints/fid_inception.npz           # FID (pytorch-fid's weights)
  python tools/convert_inception.py --torch_weights inception_v3_google-0cc3c7bd.pth \
      --variant torchvision --out checkpoints/inception_v3.npz    # reported as fid_torchvision

Input: a .pth state dict (``torch.load``, weights only) in torchvision naming: pytorch-fid's FID Inception
(fc with 1008 outputs) or torchvision's ``inception_v3`` (1000). ``--variant`` says which one is meant; a file
of the other one stops the conversion with one line naming the file (the two networks pool differently, so
the weights would give wrong features); without it the variant is read from the fc width. ``AuxLogits.*`` and
``num_batches_tracked`` are ignored, any other unknown or missing key stops the conversion with one line that
counts them (with examples) and names the input.
Output: {"params", "batch_stats"} as a ``.npz`` file (keys 'params/Mixed_5b/...') or else an orbax checkpoint
directory, via ``bigen_jax.convert.io.save_params``; read it back with ``io.load_params``. Whoever loads it
(``bigen_jax.eval.fid.inception_features_fn``) builds the variant its fc width says.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_TORCH_WEIGHTS = flags.DEFINE_string("torch_weights", None, "Inception-v3 state dict (.pth): pytorch-fid's FID "
                                     "Inception or torchvision's inception_v3.", required=True)
_VARIANT = flags.DEFINE_enum("variant", None, ["fid", "torchvision"], "The network the weights are meant for; a "
                             "file of the other one is refused. Unset: read from the fc width (1008: fid).")
_OUT = flags.DEFINE_string("out", None, "A .npz file, or an orbax checkpoint directory.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax.convert import inception  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import io  # pylint: disable=g-import-not-at-top
  state = io.load_state_dict(_TORCH_WEIGHTS.value)
  with io.naming_file(_TORCH_WEIGHTS.value):
    variables = inception.params_from_torch(state, variant=_VARIANT.value)
  io.save_params(variables, _OUT.value)
  logging.info("converted %d tensors of the %s Inception -> %s", len(state),
               inception.detect_variant(state), _OUT.value)


if __name__ == "__main__":
  cli.run(main)
