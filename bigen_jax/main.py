r"""Entry point: ``python -m bigen_jax.main --config configs/coco.py --workdir runs/coco``.

Overrides: ``--config.batch_size=8``; variants: ``--config configs/demo.py:tiny``. A config with a ``stage2`` block
(``configs/coco.py:two_stage``) trains both stages, into ``workdir/stage1`` and ``workdir/stage2``
(``bigen_jax/stages.py``). Multi-host: set
``--config.distributed.num_processes`` and friends, or run on a TPU pod / SLURM where
``jax.distributed.initialize()`` finds its settings itself.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice would precede one-line errors

from bigen_jax import cli  # pylint: disable=g-import-not-at-top


def _train(config, workdir):
  from bigen_jax import stages, train  # pylint: disable=g-import-not-at-top
  if stages.has_stage2(config):
    stages.train_stages(config, workdir)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  cli.run_trainer(_train, config_help="Training configuration file.",
                  workdir_help="Checkpoints, metrics and pictures go here.")
