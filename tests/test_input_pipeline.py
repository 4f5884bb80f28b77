"""Input pipeline: batches, determinism, exact resume, per-process shards, eval padding, errors."""

import json
import os
import threading

import numpy as np
import pytest

from bigen_jax import fileio
from bigen_jax.data import input_pipeline
from bigen_jax.data import records
from bigen_jax.data import vocab


def _it(records_dir, **kw):
  args = dict(records_dir=records_dir, split="train", global_batch_size=8, seed=0, process_index=0,
              process_count=1, shuffle_buffer=64)
  args.update(kw)
  return input_pipeline.create_iterator(**args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batch_fields(records_dir):
  batch = next(_it(records_dir))
  assert batch["text_ids"].shape == (8, 6) and batch["text_ids"].dtype == np.int32
  assert batch["dense"].shape == (8, 64, 8) and batch["dense"].dtype == np.float16
  assert batch["boxes"].shape == (8, 64, 4)
  np.testing.assert_array_equal(batch["text_mask"], (batch["text_ids"] != 0).astype(np.int32))
  np.testing.assert_array_equal(batch["text_ids"][:, 1], 100 + batch["index"])  # caption of its own record
  np.testing.assert_array_equal(batch["image_id"], 1000 + batch["index"])
  np.testing.assert_array_equal(batch["boxes"][0], records.grid_boxes())


def test_epochs_cover_once_and_differ(records_dir):
  it = _it(records_dir)
  assert it.batches_per_epoch == 37 // 8
  epochs = [np.concatenate([b["index"] for b in _take(it, 4)]) for _ in range(3)]
  for e in epochs:
    assert len(set(e)) == 32 and set(e) <= set(range(37))
  assert not np.array_equal(epochs[0], epochs[1])
  streams = [_take(_it(records_dir, seed=s), 4) for s in (0, 0, 1)]
  order = [np.concatenate([b["index"] for b in st]) for st in streams]
  captions = [np.concatenate([b["text_ids"][:, 2] for b in st]) for st in streams]
  np.testing.assert_array_equal(order[0], order[1])  # same seed: same order and captions
  np.testing.assert_array_equal(captions[0], captions[1])
  assert not np.array_equal(order[0], order[2])  # another seed: another order ...
  chosen = [dict(zip(o.tolist(), c.tolist())) for o, c in zip(order, captions)]
  several = [i for i in chosen[0] if i in chosen[2] and i % 3]  # records with 2 or 3 captions in both epochs
  assert len(several) > 10 and any(chosen[0][i] != chosen[2][i] for i in several)  # ... and other captions


def test_caption_sampling_uses_all_captions(records_dir):
  it = _it(records_dir)
  seen = {}
  for b in _take(it, 40):
    for i, c in zip(b["index"], b["text_ids"][:, 2] - 10):
      seen.setdefault(int(i), set()).add(int(c))
  assert all(max(s) < 1 + i % 3 for i, s in seen.items())
  assert any(len(s) == 3 for i, s in seen.items() if i % 3 == 2)


def test_exact_resume_across_epochs(records_dir):
  reference = _take(_it(records_dir), 11)
  it = _it(records_dir)
  _take(it, 6)
  state = it.get_state()
  assert state == {"epoch": 1, "batch_in_epoch": 2}
  resumed = _it(records_dir)
  resumed.set_state(state)
  for want, got in zip(reference[6:], _take(resumed, 5)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


@pytest.mark.parametrize("consumed", [4, 8, 3])  # the end of epoch 0, of epoch 1, and mid-epoch
def test_every_state_resumes(records_dir, consumed):
  """Any position ``get_state`` reports can be restored, epoch ends included (the iterator rolls over
  lazily, so the raw position after an epoch's last batch is one past it)."""
  reference = _take(_it(records_dir), consumed + 3)
  it = _it(records_dir)
  _take(it, consumed)
  resumed = _it(records_dir)
  resumed.set_state(it.get_state())
  for want, got in zip(reference[consumed:], _take(resumed, 3)):
    np.testing.assert_array_equal(want["index"], got["index"])
    np.testing.assert_array_equal(want["text_ids"], got["text_ids"])
  legacy = _it(records_dir)  # the un-normalised end-of-epoch state older checkpoints hold
  legacy.set_state({"epoch": 0, "batch_in_epoch": 4})
  assert legacy.get_state() == {"epoch": 1, "batch_in_epoch": 0}


def test_save_restore_file(tmp_path, records_dir):
  it = _it(records_dir)
  _take(it, 3)
  it.save(tmp_path / "it.json")
  want = next(it)
  other = _it(records_dir)
  other.restore(tmp_path / "it.json")
  np.testing.assert_array_equal(next(other)["index"], want["index"])


@pytest.mark.parametrize("sharding,count", [("global", 2), ("global", 5), ("files", 2), ("files", 3),
                                            ("files", 5)])  # 4 train shards: 5 processes share records
def test_processes_disjoint_and_cover(records_dir, sharding, count):
  kw = dict(global_batch_size=2 * count, process_count=count, sharding=sharding)
  evals = [list(_it(records_dir, process_index=p, train=False, **kw)) for p in range(count)]
  assert len({len(e) for e in evals}) == 1  # lock-step: every process the same number of batches
  seen = [np.concatenate([b["index"][b["valid"]] for b in e]) for e in evals]
  flat = np.concatenate(seen)
  assert sorted(flat) == list(range(37))
  trains = [_it(records_dir, process_index=p, **kw) for p in range(count)]
  assert len({t.batches_per_epoch for t in trains}) == 1
  epoch = [np.concatenate([b["index"] for b in _take(t, t.batches_per_epoch)]) for t in trains]
  assert len(set(np.concatenate(epoch))) == sum(len(e) for e in epoch)  # disjoint within an epoch
  if sharding == "files":  # contiguous ranges of the epoch's stream, one record apart at most
    shares = [t.share for t in trains]
    assert shares[0][0] == 0 and shares[-1][1] == 37 and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_global_and_files_sharding_agree(records_dir, count):
  """What the module docstring promises of the two modes, over six epochs: the same number of full batches
  per process and epoch, no example twice in an epoch, (N // G) * G examples per epoch; with one process the
  same batches. (Seed 1, three processes: epoch 3 once gave one process a 7-record file for a 10-record share.)"""
  kw = dict(global_batch_size=2 * count, process_count=count, seed=1)
  streams = {}
  for sharding in ("global", "files"):
    its = [_it(records_dir, process_index=p, sharding=sharding, **kw) for p in range(count)]
    assert {it.batches_per_epoch for it in its} == {37 // (2 * count)}
    streams[sharding] = [_take(it, 6 * it.batches_per_epoch) for it in its]
    for epoch in range(6):
      part = slice(epoch * its[0].batches_per_epoch, (epoch + 1) * its[0].batches_per_epoch)
      seen = np.concatenate([b["index"] for stream in streams[sharding] for b in stream[part]])
      assert len(seen) == len(set(seen)) == (37 // (2 * count)) * 2 * count, (sharding, epoch)
      for stream in streams[sharding]:
        for b in stream[part]:
          np.testing.assert_array_equal(b["text_ids"][:, 1], 100 + b["index"])  # real rows, no padding
  if count == 1:
    for want, got in zip(streams["global"][0], streams["files"][0]):
      for key in want:
        np.testing.assert_array_equal(want[key], got[key])


def test_next_epoch_fills_in_the_background(records_dir, monkeypatch):
  """Epoch 0 is opened where it is consumed; every later epoch is opened, and its shuffle buffer filled, by the
  background thread before the previous epoch ends. The batches are those of a resumed iterator."""
  opened = []
  build = input_pipeline.BatchIterator._dataset

  def spy(self, epoch, skip_batches, share=None):
    if share is None:
      opened.append((epoch, skip_batches, threading.current_thread().name.startswith("input_next_epoch")))
    return build(self, epoch, skip_batches, share)

  monkeypatch.setattr(input_pipeline.BatchIterator, "_dataset", spy)
  it = _it(records_dir, shuffle_buffer=8)  # the fill starts one batch (8 records) before an epoch's end
  batches = _take(it, 12)
  assert opened[:3] == [(0, 0, False), (1, 0, True), (2, 0, True)]  # epoch 3's fill may still be starting
  resumed = _it(records_dir, shuffle_buffer=8)
  resumed.set_state({"epoch": 2, "batch_in_epoch": 0})
  for want, got in zip(batches[8:], _take(resumed, 4)):
    np.testing.assert_array_equal(want["index"], got["index"])
  manifest = records.read_manifest(records_dir)
  shards = manifest["splits"]["train"]["shards"]
  assert it.shuffle_buffer_bytes == 8 * sum(s["num_bytes"] for s in shards) // 37


def test_finished_epochs_are_read_to_their_end(records_dir, monkeypatch):
  """Each finished epoch's tf.data iterator is read to its end, in a daemon thread of its own (ending or dropping
  one in the training thread stalled training 10-60 s per epoch on 2 busy cores)."""
  ended = []
  build = input_pipeline.BatchIterator._dataset

  class Watched:
    def __init__(self, inner, epoch):
      self.inner, self.epoch = inner, epoch

    def __iter__(self):
      return self

    def __next__(self):
      try:
        return next(self.inner)
      except StopIteration:
        ended.append(self.epoch)
        raise

  def watched(self, epoch, skip_batches, share=None):
    ds = build(self, epoch, skip_batches, share)
    if share is not None:
      return ds
    numpy_iterator = ds.as_numpy_iterator
    monkeypatch.setattr(ds, "as_numpy_iterator", lambda: Watched(numpy_iterator(), epoch), raising=False)
    return ds

  monkeypatch.setattr(input_pipeline.BatchIterator, "_dataset", watched)
  it = _it(records_dir, shuffle_buffer=8)
  per_epoch = it.batches_per_epoch
  _take(it, 2 * per_epoch + 1)
  for thread in threading.enumerate():
    if thread.name == "input_end_epoch":
      assert thread.daemon
      thread.join(timeout=60)
  assert sorted(ended) == [0, 1]


def test_close_releases_and_keeps_the_position(records_dir):
  """close() ends the next-epoch thread and drops the tf.data iterators (the trainer's loop closes its data at the
  end); iterating again continues where it stopped, with the uninterrupted iterator's batches."""
  it, straight = _it(records_dir, shuffle_buffer=8), _it(records_dir, shuffle_buffer=8)
  want = _take(straight, 2 * straight.batches_per_epoch + 2)
  straight.close()
  first = _take(it, it.batches_per_epoch + 1)
  executor = it._executor
  assert executor is not None
  it.close()
  it.close()
  assert it._it is None and it._next_epoch is None and it._executor is None
  with pytest.raises(RuntimeError):  # shut down
    executor.submit(print)
  for w, g in zip(want, first + _take(it, len(want) - len(first))):
    np.testing.assert_array_equal(w["index"], g["index"])


def test_no_autotuning(records_dir):
  """The pipeline's parallelism is fixed: releasing an iterator that tf.data autotuned for minutes waited 20-50 s
  on its tuning thread (make demo's stall after stage 1)."""
  assert _it(records_dir)._dataset(0, 0).options().autotune.enabled is False


@pytest.mark.parametrize("sharding", ["global", "files"])
def test_a_stream_that_runs_dry_raises(records_dir, sharding):
  """A manifest that promises more records than its shards hold: training raises instead of yielding padding
  or short epochs, and evaluation says its share came up short."""
  path = os.path.join(records_dir, records.MANIFEST_NAME)
  with open(path) as f:
    manifest = json.load(f)
  manifest["splits"]["train"]["shards"][1]["num_examples"] += 8
  manifest["splits"]["train"]["num_examples"] += 8
  fileio.write_json_atomic(path, manifest)
  kw = dict(process_count=2, global_batch_size=8, sharding=sharding)
  with pytest.raises(records.DataError, match="ran dry at batch .* of epoch 0"):
    _take(_it(records_dir, process_index=1, **kw), 5)
  with pytest.raises(records.DataError, match="examples, .* expected"):
    list(_it(records_dir, process_index=1, train=False, **kw))


@pytest.mark.parametrize("count", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: 43 s
def test_global_batches_do_not_depend_on_process_count(records_dir, count):
  single = _take(_it(records_dir), 6)
  parts = [_take(_it(records_dir, process_index=p, process_count=count), 6) for p in range(count)]
  for step, want in enumerate(single):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), want[key])


def test_eval_mode_keeps_all_captions_and_pads(records_dir):
  batches = list(_it(records_dir, split="validation", train=False))
  assert len(batches) == 2  # 13 examples, batch 8
  last = batches[-1]
  assert last["valid"].tolist() == [True] * 5 + [False] * 3
  assert last["caption_ids"].shape == (8, 3, 6)
  np.testing.assert_array_equal(np.concatenate([b["index"][b["valid"]] for b in batches]), np.arange(13))
  first = batches[0]
  for row in range(8):
    i = first["index"][row]
    num = 1 + i % 3
    assert [c.decode() for c in first["captions"][row][:num]] == [f"caption {c} of {i}" for c in range(num)]
    assert (first["caption_ids"][row, num:] == 0).all()
    np.testing.assert_array_equal(first["text_ids"][row], first["caption_ids"][row, 0])
  it = _it(records_dir, split="validation", train=False, global_batch_size=16)
  assert next(it)["valid"].sum() == 13
  with pytest.raises(StopIteration):
    next(it)
  it.reset()
  assert next(it)["valid"].sum() == 13


def test_cluster_ids_come_from_the_vocab(tmp_path, records_dir):
  vdir = str(tmp_path / "vocab")
  vocab.build_vocab(records_dir, vdir, k=4, iterations=5, sample_size=500, seed=0)
  ids = vocab.load_vocab(vdir).cluster_ids("train")
  batch = next(_it(records_dir, vocab_dir=vdir))
  np.testing.assert_array_equal(batch["cluster_ids"], ids[batch["index"]])
  assert batch["cluster_ids"].dtype == np.int32


def test_element_spec(records_dir):
  spec = _it(records_dir).element_spec
  assert spec["dense"].shape == (8, 64, 8) and spec["text_ids"].shape == (8, 6)


def test_errors(records_dir):
  with pytest.raises(ValueError, match="not divisible"):
    _it(records_dir, global_batch_size=9, process_count=2)
  with pytest.raises(records.DataError, match="fewer than one batch"):
    _it(records_dir, global_batch_size=64)
  with pytest.raises(records.DataError, match="fewer than one batch"):  # no process may get an empty share
    _it(records_dir, global_batch_size=40, process_count=8, sharding="files")
  with pytest.raises(ValueError, match="data.sharding='hosts'"):
    _it(records_dir, sharding="hosts")
  with pytest.raises(records.DataError, match="no split 'test'"):
    _it(records_dir, split="test")
  with pytest.raises(ValueError, match="outside an epoch"):
    _it(records_dir).set_state({"epoch": 0, "batch_in_epoch": 99})
  with open(f"{records_dir}/train-00002-of-00004.tfrecord", "ab") as f:
    f.write(b"junk")
  with pytest.raises(records.DataError, match="train-00002-of-00004.tfrecord"):
    _it(records_dir)
