"""The stage-1 trainer end to end on a tiny model: metrics, sharding invariance, exact resume after SIGKILL,
checkpoint on SIGTERM, two processes == one process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigen_jax import checkpoint
from bigen_jax import experiment
from bigen_jax import metrics as metrics_lib
from bigen_jax import tasks as tasks_lib
from bigen_jax import train
from bigen_jax.convert import io as convert_io
from bigen_jax.data import input_pipeline
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from bigen_jax.models import lxmert
from configs import demo
from conftest import write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("train_data"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 40, "validation": 16}, dim=8, shard_size=10, max_len=6)
  vocab.build_vocab(records_dir, vocab_dir, k=6, iterations=5, sample_size=1000, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(200)]) + "\n")
  return {"records_dir": records_dir, "vocab_dir": vocab_dir, "tokenizer": vocab_txt}


def _overrides(data, **kw):
  flags = {"data.records_dir": data["records_dir"], "data.vocab_dir": data["vocab_dir"],
           "data.tokenizer": data["tokenizer"], "mesh.num_devices": 1, "log_every": 1, "total_steps": 6,
           "eval.every": 0}
  flags.update(kw)
  return flags


def _config(data, **kw):
  config = demo.get_config("tiny")
  config.update_from_flattened_dict(_overrides(data, **kw))
  return config


def _losses(workdir):
  """{step: loss} of the task trained at that step."""
  out = {}
  for row in metrics_lib.read_history(workdir):
    for key, value in row.items():
      if key.endswith("/loss") and not key.startswith("validation_loss"):
        out[row["step"]] = value
  return out


def _command(data, workdir, **kw):
  args = [sys.executable, "-m", "bigen_jax.main", "--config", os.path.join(ROOT, "configs", "demo.py:tiny"),
          "--workdir", workdir]
  return args + [f"--config.{k}={v}" for k, v in _overrides(data, **kw).items()]


def _wait_for_step(workdir, proc, step, timeout=300):
  path = os.path.join(workdir, metrics_lib.HISTORY_NAME)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and any(r["step"] >= step for r in metrics_lib.read_history(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early:\n{proc.stderr.read().decode()[-3000:]}")
    time.sleep(0.02)
  raise AssertionError("timed out")


def test_train_end_to_end(tmp_path, data, monkeypatch):
  workdir = str(tmp_path / "run")
  closed = []
  close = input_pipeline.BatchIterator.close
  monkeypatch.setattr(input_pipeline.BatchIterator, "close", lambda self: closed.append(self.train) or close(self))
  train.train_and_evaluate(_config(data, **{"eval.every": 3}), workdir)
  assert closed == [True]  # the loop releases its training data at the end (not some later garbage collection)
  rows = metrics_lib.read_history(workdir)
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v) for v in losses.values())
  trained = {r["step"]: [k.split("/")[0] for k in r if k.endswith("/loss")] for r in rows if "lr" in r}
  assert trained[1] == ["i2t"] and trained[2] == ["t2i"]  # strict alternation
  assert any("validation_loss/t2i/accuracy" in r for r in rows)
  assert "steps_per_sec" in rows[0] and rows[0]["lr"] == 0.0  # warm-up starts at 0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  assert not os.path.exists(os.path.join(workdir, "plugins"))  # no profile unless asked


@pytest.mark.slow  # a jax.profiler trace of a tiny run: the default suite keeps under 20 minutes
def test_profile_writes_a_trace(tmp_path, data):
  """config.profile: one jax.profiler trace of steps 2..3 into the workdir, where TensorBoard looks."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(data, **{"total_steps": 4, "profile.start_step": 1, "profile.num_steps": 2}),
                           workdir)
  runs = os.listdir(os.path.join(workdir, "plugins", "profile"))
  assert len(runs) == 1
  assert any(f.endswith(".xplane.pb") for f in os.listdir(os.path.join(workdir, "plugins", "profile", runs[0])))


def test_joint_schedule_sums_the_tasks(tmp_path, data):
  """task_schedule=joint: every step trains I2T, T2I and ITM together; the joint loss is the weighted sum."""
  workdir = str(tmp_path / "joint")
  config = _config(data, **{"task_schedule": "joint", "tasks.itm.weight": 1, "tasks.t2i.weight": 2,
                            "total_steps": 2})
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2
  for row in (r for r in metrics_lib.read_history(workdir) if "lr" in r):
    assert {"i2t/loss", "t2i/loss", "itm/loss", "joint/loss"} <= set(row)
    want = row["i2t/loss"] + 2 * row["t2i/loss"] + row["itm/loss"]
    assert abs(row["joint/loss"] - want) < 1e-4 * abs(want)
  with pytest.raises(ValueError, match="task_schedule"):
    tasks_lib.task_cycle(config.tasks, "sometimes")


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory, data):
  """{step: loss} of the tiny config on one device: the reference of the parallel runs."""
  workdir = str(tmp_path_factory.mktemp("single"))
  train.train_and_evaluate(_config(data), workdir)
  return _losses(workdir)


@pytest.mark.slow  # tests/test_coco_path.py checks an 8-device fsdp mesh against one device in the default suite
def test_eight_devices_give_the_losses_of_one(tmp_path, data, single_losses):
  eight = str(tmp_path / "eight")
  train.train_and_evaluate(_config(data, **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2,
                                            "mesh.tensor": 2}), eight)
  a, b = single_losses, _losses(eight)
  assert a.keys() == b.keys()
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0, atol=1e-5)


def test_sigkill_resume_is_exact_and_sigterm_checkpoints(tmp_path, data):
  """Checkpoints every 5 steps = every epoch end (40 examples, batches of 8): the kill lands after the
  verified checkpoint of step 10, which the resume must be able to continue from."""
  settings = {"total_steps": 40, "checkpoint.every": 5, "checkpoint.async_save": True}
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(_config(data, **settings), reference)
  want = _losses(reference)

  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_command(data, workdir, **settings), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  _wait_for_step(workdir, proc, 11)
  record = os.path.join(workdir, "checkpoints", "10", checkpoint.RECORD_NAME)
  while not os.path.exists(record):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    time.sleep(0.02)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  killed_at = max(r["step"] for r in metrics_lib.read_history(workdir))
  assert killed_at < 40

  proc = subprocess.Popen(_command(data, workdir, **settings), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  _wait_for_step(workdir, proc, killed_at + 3)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-3000:]
  got = _losses(workdir)
  stopped_at = max(got)
  assert stopped_at < 40
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))  # written on SIGTERM
  assert sorted(got) == list(range(1, stopped_at + 1))
  for step in got:
    assert got[step] == want[step], step  # bit-exact on CPU, before and after the resume


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # 100 s; test_sigterm_to_one_of_two_processes_stops_both_at_one_step runs two processes by default
def test_two_processes_give_the_losses_of_one(tmp_path, data, single_losses):
  workdir = str(tmp_path / "multi")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_backend_optimization_level=0")
  procs = [subprocess.Popen(
      _command(data, workdir, **{"mesh.num_devices": 0, "distributed.num_processes": 2,
                                 "distributed.process_id": i, "distributed.cpu_collectives": "gloo",
                                 "distributed.coordinator_address": f"127.0.0.1:{port}"}),
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
  a, b = single_losses, _losses(workdir)
  assert a.keys() == b.keys()
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=0, atol=1e-5)


@pytest.mark.slow  # ~35 s: two processes; the one-process SIGTERM and SIGKILL resume test stays
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, data):
  """SIGTERM to process 1 only: through JAX's preemption sync both processes checkpoint the same step and exit 0,
  long before the end and with no metrics logged (log_every > total_steps: nothing else syncs the hosts)."""
  workdir = str(tmp_path / "multi")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_backend_optimization_level=0")
  settings = {"mesh.num_devices": 0, "distributed.num_processes": 2, "distributed.cpu_collectives": "gloo",
              "distributed.coordinator_address": f"127.0.0.1:{port}", "total_steps": 3000, "log_every": 5000,
              "checkpoint.every": 5, "checkpoint.keep": 1}
  procs = [subprocess.Popen(_command(data, workdir, **settings, **{"distributed.process_id": i}), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
  try:
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "5")):
      assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read().decode()[-3000:]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    logs = []
    for p in procs:
      _, err = p.communicate(timeout=300)
      logs.append(err.decode())
      assert p.returncode == 0, logs[-1][-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  stops = [re.findall(r"stopped by signal at step (\d+)", log) for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  stopped = int(stops[0][0])
  assert 5 < stopped < 3000
  assert stopped in [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]


def test_non_finite_loss_names_the_newest_verified_checkpoint(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint.Checkpointer(directory, save_every=1, async_save=False)
  pending = [(0, "i2t", {"loss": np.float32(2.0)}), (1, "t2i", {"loss": np.float32(np.nan)})]
  with pytest.raises(FloatingPointError, match=r"at step 2; last good checkpoint: none yet"):
    metrics_lib.summarise(pending, ckpt)
  for step in (1, 2):
    ckpt.save(step, {"w": np.full(256, step, np.float32)}, {"epoch": 0, "batch_in_epoch": step})
  with open(os.path.join(directory, "2", "state", "_METADATA"), "ab") as f:
    f.write(b" ")  # the newest step no longer matches its record
  with pytest.raises(FloatingPointError, match=r"non-finite t2i loss \(nan\) at step 2; last good checkpoint: "
                                               rf"step 1 in {directory}"):
    metrics_lib.summarise(pending, ckpt)
  assert metrics_lib.summarise(pending[:1], ckpt) == {"i2t/loss": 2.0}
  ckpt.close()


def test_resume_at_an_epoch_end_and_after_a_fallback_is_exact(tmp_path, data, capsys):
  """40 examples in batches of 8: a job slice ending at step 5 ends epoch 0. A corrupt newest checkpoint
  (10) is moved aside and the run continues from 5 with the losses of the run that wrote it."""
  settings = {"total_steps": 12, "checkpoint.every": 5}
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(_config(data, **settings), reference)
  want = _losses(reference)

  sliced = str(tmp_path / "sliced")
  train.train_and_evaluate(_config(data, stop_at_step=5, **settings), sliced)
  with open(os.path.join(sliced, "checkpoints", "5", "data", "metadata")) as f:
    assert json.load(f) == {"epoch": 1, "batch_in_epoch": 0}
  train.train_and_evaluate(_config(data, **settings), sliced)
  assert _losses(sliced) == want

  corrupt = str(tmp_path / "corrupt")
  train.train_and_evaluate(_config(data, stop_at_step=10, **settings), corrupt)
  state_dir = os.path.join(corrupt, "checkpoints", "10", "state")
  victim = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\x00" * 64)
  train.train_and_evaluate(_config(data, **settings), corrupt)
  assert "checkpoint step 10" in capsys.readouterr().out
  assert _losses(corrupt) == want
  assert sorted(int(s) for s in os.listdir(os.path.join(corrupt, "checkpoints")) if s.isdigit()) == [5, 10, 12]


def test_init_from_converted_params(tmp_path, data):
  config = _config(data, total_steps=1)
  resolved = experiment.resolve_config(config)[0]
  model = lxmert.build_model(resolved.model)
  params = jax.device_get(nn.unbox(jax.jit(lambda: lxmert.init_params(model, resolved.model,
                                                                    jax.random.key(42)))()))
  path = str(tmp_path / "init.npz")
  convert_io.save_params(params, path)
  config.init_from = path
  # One step at the warm-up's first learning rate, 0 (a configured lr must be positive): it changes nothing, so the
  # state holds the loaded params.
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.weight_decay = 0.0
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)
  params["text_embed"]["word"]["embedding"] = params["text_embed"]["word"]["embedding"][:-1]
  convert_io.save_params(params, path)
  with pytest.raises(ValueError, match="shape mismatch"):
    train.train_and_evaluate(config, str(tmp_path / "run2"))
