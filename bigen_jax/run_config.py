"""The run's config, saved as ``workdir/config.json``: evaluation reads it, and a resume checks against it.

A resumed run may change only what does not change what is trained (``MAY_CHANGE``: logging, evaluation,
checkpoint cadence, the devices and processes, since training is sharding-invariant); any other change is a
``ConfigError`` listing the fields, unless ``--config.allow_config_change=True``.

How one process was launched is not part of the run: the saved config starts a single process
(``LAUNCH``); a multi-process evaluation passes its ``--config.distributed.*`` flags as training did.

This file is also a config file: ``--config=bigen_jax/run_config.py:<workdir>`` loads a run's saved config
(``bigen_jax.evaluate`` does so when ``--config`` is not given).
"""

import json
from typing import Any

from etils import epath
import jax
import ml_collections

from bigen_jax import errors
from bigen_jax import fileio

CONFIG_NAME = "config.json"
# Dotted prefixes of the fields a resume may change without complaint.
MAY_CHANGE = ("stop_at_step", "log_every", "eval", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
              "checkpoint.fallback", "peak_flops_per_device", "distributed", "mesh", "axis_rules",
              "data.verify_checksums", "allow_config_change", "profile")
# Fields added after runs were first saved, with the value that does what the code did before they existed (the
# code reads each with that default): a saved config without the field matches a new one that holds this value.
ADDED_FIELDS = {"model.shared_cross_attention": True, "model.image_head_dim": 0, "model.caption_to_cells": False,
                "tasks.i2t.layout": "mask", "tasks.t2i.feature_regression": 0.0, "model.code_bag_head": "",
                "tasks.t2i.code_bag": 0.0, "image_head_codebook_std": 0.0, "loss_weights.reconstruction": 0.0,
                "eval.generation.generator_dir": "", "tasks.scst.weight": 0, "tasks.scst.num_samples": 1,
                "tasks.scst.temperature": 1.0, "tasks.scst.visual_input": "dense", "tasks.scst.layout": "mask",
                "tasks.scst.max_len": -1, "tasks.clip.weight": 0, "tasks.clip.num_steps": 4,
                "tasks.clip.schedule": "linear", "tasks.clip.order": "mask_predict", "tasks.clip.tau": 1.0,
                "tasks.clip.temperature": 0.0, "tasks.clip.choice_temperature": 0.0, "tasks.clip.guidance": 0.0,
                "tasks.clip.hard": False, "tasks.clip.scale": 2.5, "tasks.clip.generator_dir": "",
                "tasks.clip.clip_path": "", "tasks.clip.clip_variant": "", "tasks.clip.prompt": "a photo depicts ",
                "task_order": (), "data.questions": False, "data.answers_file": "", "tasks.t2i.objective": "ccc",
                "model.num_answers": 0, "model.dropout_rng": "threefry"}
# Saved in place of this process's launch settings (process 0's id and coordinator would make an evaluation wait
# for processes that never come).
LAUNCH = {"num_processes": 1, "process_id": 0, "coordinator_address": "", "auto": False}


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as JSON values (tuples become lists), so that a saved and a new config compare equal."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files use (axis rules, evaluator names)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{"model.hidden_size": 32, ...}``: every leaf of ``config`` under its dotted name (JSON values)."""
  out = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, dict) and node:
      for key, value in node.items():
        visit(f"{prefix}{key}.", value)
    else:
      out[prefix[:-1]] = node

  visit("", _plain(config))
  return out


def hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
  """``flatten(config)`` with values TensorBoard's hparams accept (others as their JSON text)."""
  return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(config).items()}


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``workdir/config.json`` atomically (process 0), with the ``LAUNCH`` settings."""
  if jax.process_index() == 0:
    plain = _plain(config)
    if isinstance(plain.get("distributed"), dict):
      plain["distributed"].update({k: v for k, v in LAUNCH.items() if k in plain["distributed"]})
    fileio.write_atomic(fileio.join(workdir, CONFIG_NAME), json.dumps(plain, indent=2, sort_keys=True))


def saved_path(workdir: str) -> str:
  return fileio.join(workdir, CONFIG_NAME)


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in ``workdir``; ``ConfigError`` naming the file when there is none or it is unreadable."""
  path = saved_path(workdir)
  if not epath.Path(path).exists():
    raise errors.ConfigError(f"{path} does not exist: pass the run's --config (the run predates saved configs, "
                             "or --workdir is not a training run's directory)")
  try:
    return ml_collections.ConfigDict(_tuples(fileio.read_json(path)))
  except ValueError as e:
    raise errors.ConfigError(f"{path} is not a config saved by bigen_jax.train: {e}") from e


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A stage-1 ``config`` (``bigen_jax.train``'s: it has ``tasks``) with each ``ADDED_FIELDS`` entry it predates
  set to its value (where the field's parent exists), so that an older run reads as the code ran it and takes the
  newer fields' flags (e.g. evaluators' options). Other trainers' configs are returned as they are."""
  if "tasks" not in config:
    return config
  for name, value in ADDED_FIELDS.items():
    parent, _, leaf = name.rpartition(".")
    node = config
    for part in parent.split(".") if parent else ():
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and leaf not in node:
      node[leaf] = value
  return config


def changed_fields(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """``"name: old -> new"`` for every field that differs and matters to a resume (not in ``MAY_CHANGE``); a field
  the saved config predates counts as its ``ADDED_FIELDS`` value."""
  old, now = flatten(saved), flatten(new)
  added = {k: list(v) if isinstance(v, tuple) else v for k, v in ADDED_FIELDS.items()}  # as JSON holds them
  old = {**{k: v for k, v in added.items() if k not in old and k in now}, **old}
  out = []
  for name in sorted(set(old) | set(now)):
    if any(name == p or name.startswith(p + ".") for p in MAY_CHANGE):
      continue
    if old.get(name, "<absent>") != now.get(name, "<absent>"):
      out.append(f"{name}: {json.dumps(old.get(name, '<absent>'))} -> {json.dumps(now.get(name, '<absent>'))}")
  return out


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ``ConfigError`` when resuming the run in ``workdir`` with ``config`` changes what is trained (see the
  module docstring). A run without a saved config (older code) is resumed as it is."""
  if config.get("allow_config_change", False) or not epath.Path(saved_path(workdir)).exists():
    return
  changed = changed_fields(load(workdir), config)
  if changed:
    raise errors.ConfigError(
        f"resuming --workdir={workdir} with a config that changes what is trained ({'; '.join(changed)}); the run's "
        f"config is {saved_path(workdir)}: pass the same values, or --config.allow_config_change=True to go on "
        "anyway")


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """Config-file entry point, ``--config=bigen_jax/run_config.py:<workdir>``: the saved config of the run, with
  the fields it predates (``with_added_fields``), so that flags can set them."""
  return with_added_fields(load(workdir))
