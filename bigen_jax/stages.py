"""Both training stages from one config (METHOD.md §3-4): stage 1, then stage 2 initialised from stage 1's params.

A config with a ``stage2`` block (``configs/coco.py:two_stage``, ``configs/demo.py:two_stage``; the paper's fields
are ``configs/base.py:stage2_fields``) trains

  workdir/stage1   the config without the block (stage 1's cross-entropy tasks),
  workdir/stage2   the config with the block's fields over it and ``init_from`` = workdir/stage1 (SCST, CLIP loss),

each through ``train.train_and_evaluate``: each resumes where it stopped, and a finished stage 1 is not retrained.
Overrides reach either stage: ``--config.total_steps=...`` (stage 1, and stage 2 unless its block sets the field),
``--config.stage2.total_steps=...`` (stage 2).
"""

from typing import Any

import ml_collections

from bigen_jax import errors
from bigen_jax import fileio

STAGE2 = "stage2"  # the config field that holds stage 2's fields
STAGE_DIRS = ("stage1", "stage2")


def has_stage2(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` describes both stages (a non-empty ``stage2`` block)."""
  return bool(config.get(STAGE2))


def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config without its ``stage2`` block: what stage 1 trains and saves."""
  out = ml_collections.ConfigDict(config.to_dict())
  if STAGE2 in out:
    del out[STAGE2]
  return out


def stage2_config(config: ml_collections.ConfigDict, init_from: str) -> ml_collections.ConfigDict:
  """Stage 1's config with the ``stage2`` block's fields over it (nested blocks merged field by field) and
  ``init_from`` = ``init_from``, stage 1's run directory. A block field that stage 1's config lacks is a
  ``ConfigError``: a misspelt field would otherwise train stage 2 as stage 1."""
  out = stage1_config(config)
  overrides = config[STAGE2]

  def check(node: Any, block: Any, prefix: str) -> None:
    for key, value in block.items():
      if key not in node:
        raise errors.ConfigError(f"--config.{STAGE2}.{prefix}{key}: stage 1's config has no field {prefix}{key}")
      if isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
        check(node[key], value, f"{prefix}{key}.")

  check(out, overrides, "")
  out.update(ml_collections.ConfigDict(overrides.to_dict()))
  out.init_from = init_from
  return out


def train_stages(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Trains stage 1 into ``workdir/stage1`` and stage 2 from it into ``workdir/stage2``; returns stage 2's final
  train state."""
  from bigen_jax import train  # pylint: disable=g-import-not-at-top
  first, second = (fileio.join(workdir, name) for name in STAGE_DIRS)
  train.train_and_evaluate(stage1_config(config), first)
  return train.train_and_evaluate(stage2_config(config, first), second)
