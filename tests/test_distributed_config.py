"""``parallel.initialize_distributed``: what ``config.distributed`` passes to ``jax.distributed.initialize`` (the
call itself is replaced: a real one needs several processes, covered by the multi-process training tests)."""

import pytest

from bigen_jax import errors
from bigen_jax import parallel
from configs import base


def _calls(monkeypatch, **fields):
  calls = []
  monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  cfg = base.get_config("tiny").distributed
  cfg.update(fields)
  parallel.initialize_distributed(cfg)
  return calls


def test_one_process_starts_nothing(monkeypatch):
  assert not _calls(monkeypatch)
  assert not _calls(monkeypatch, local_device_ids="0,1")


def test_local_device_ids_are_parsed_for_explicit_and_automatic_starts(monkeypatch):
  explicit = _calls(monkeypatch, num_processes=2, process_id=1, coordinator_address="10.0.0.1:1234",
                    local_device_ids="2,3")
  assert explicit == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                           local_device_ids=[2, 3])]
  assert _calls(monkeypatch, auto=True, local_device_ids="0") == [dict(local_device_ids=[0])]
  assert _calls(monkeypatch, auto=True) == [dict(local_device_ids=None)]


def test_bad_local_device_ids_name_the_flag(monkeypatch):
  with pytest.raises(errors.ConfigError, match="local_device_ids"):
    _calls(monkeypatch, num_processes=2, local_device_ids="gpu0")

