"""Config checks run before any compute and name the flag."""

import os

import pytest

from bigen_jax import config_checks
from bigen_jax import errors
from bigen_jax import train
from configs import demo


def _config(**kw):
  config = demo.get_config("tiny")
  config.update_from_flattened_dict(kw)
  return config


@pytest.mark.parametrize("flags, devices, message", [
    ({"total_steps": -5}, 1, r"--config.total_steps=-5: must be a positive integer"),
    ({"total_steps": 0}, 1, r"--config.total_steps=0"),
    ({"checkpoint.every": 0}, 1, r"--config.checkpoint.every=0"),
    ({"stop_at_step": -1}, 1, r"--config.stop_at_step=-1"),
    ({"batch_size": 7}, 2, r"--config.batch_size=7: must be a positive multiple of the 2 data-parallel devices"),
    ({"batch_size": 12, "mesh.data": 2, "mesh.fsdp": 4}, 8, r"--config.batch_size=12: .* 8 data-parallel"),
    ({"mesh.data": 3}, 2, r"--config.mesh .*needs 3 devices, have 2"),
    ({"mesh.num_devices": 4}, 2, r"--config.mesh.num_devices=4: there are 2 devices"),
    ({"eval.every": 2, "eval.batch_size": 3}, 2, r"--config.eval.batch_size=3"),
    ({"eval.every": 2, "eval.evaluators": ("captioning",), "eval.captioning.batch_size": 0}, 2,
     r"--config.eval.captioning.batch_size=0: must be a positive integer \(images per data-parallel device"),
    ({"tasks.t2i.weight": -1}, 1, r"--config.tasks.t2i.weight=-1"),
    ({"profile.num_steps": -1}, 1, r"--config.profile.num_steps=-1"),
    ({"profile.num_steps": 2, "profile.start_step": 0}, 1, r"--config.profile.start_step=0: must be >= 1"),
])
def test_bad_configs_name_their_flag(flags, devices, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check_config(_config(**flags), num_devices=devices, process_count=1)


def test_good_configs_pass():
  assert config_checks.check_config(_config(), num_devices=1, process_count=1) == (1, 1, 1)
  assert config_checks.check_config(_config(**{"mesh.fsdp": 2, "mesh.tensor": 2}), num_devices=8,
                                    process_count=2) == (2, 2, 2)
  per_device = {"eval.every": 2, "eval.evaluators": ("captioning", "generation"), "eval.captioning.batch_size": 5,
                "eval.generation.batch_size": 3}  # per device: any positive size runs on any mesh
  assert config_checks.check_config(_config(**per_device), num_devices=2, process_count=1) == (2, 1, 1)
  with pytest.raises(errors.ConfigError, match="of the 3 processes"):
    config_checks.check_config(_config(batch_size=8), num_devices=1, process_count=3)


def test_trainer_checks_before_anything_is_written(tmp_path):
  workdir = str(tmp_path / "never")
  with pytest.raises(errors.ConfigError, match="--config.total_steps=-5"):
    train.train_and_evaluate(_config(total_steps=-5), workdir)
  assert not os.path.exists(workdir)
