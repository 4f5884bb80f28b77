r"""Entry point: ``python -m bigen_jax.main --config configs/coco.py --workdir runs/coco``.

Overrides: ``--config.batch_size=8``; variants: ``--config configs/demo.py:tiny``. Multi-host: set
``--config.distributed.num_processes`` and friends, or run on a TPU pod / SLURM where
``jax.distributed.initialize()`` finds its settings itself.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice would precede one-line errors

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and pictures go here.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax import parallel  # pylint: disable=g-import-not-at-top
  from bigen_jax import train  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(_CONFIG.value.get("distributed"))
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
