"""Orbax checkpoints of the training state plus the data-iterator position, verified on restore.

A checkpoint at step ``s`` holds two items:
  state  the train-state pytree (params, optimizer state, step, rng key data), sharded arrays written by
         every process, restored directly into the target shardings;
  data   the input pipeline's ``{"epoch", "batch_in_epoch"}`` (JSON; identical on every process because the
         pipeline keeps processes in lock-step).
Saves are asynchronous; ``save(..., force=True)`` is used for the final and the preemption save.

Integrity: once orbax has finalised step ``s``, process 0 writes ``s/sha256.json``, the sha256 and size of
every file of the step. ``restore`` checks the newest step against it before reading. A step that fails the
check or fails to read is reported in one line; with ``fallback`` the step is moved to
``<directory>_rejected/`` and the next newest is tried, otherwise the run stops with a ``CheckpointError``.
A finished step without a record (the process died between orbax's commit and the record) is restored
unverified, with a warning.
"""

import hashlib
import json
import signal
import threading
from typing import Any, Callable

from absl import logging
from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from bigen_jax import errors
from bigen_jax import fileio

RECORD_NAME = "sha256.json"


class CheckpointError(errors.UserError):
  """No checkpoint step that can be restored (each one failed verification or reading)."""


def file_digests(step_dir: str) -> dict[str, dict[str, Any]]:
  """``{relative path: {"sha256", "bytes"}}`` of every file under ``step_dir`` except the record itself."""
  root = epath.Path(step_dir)
  out = {}
  for path in _files_under(root):
    rel = str(path.relative_to(root))
    if rel == RECORD_NAME:
      continue
    digest = hashlib.sha256()
    with path.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
    out[rel] = {"sha256": digest.hexdigest(), "bytes": path.stat().length}
  return out


def _files_under(directory: epath.Path) -> list[epath.Path]:
  """Every file below ``directory``, sorted (epath, so gs:// works; its glob refuses ``**``)."""
  out = []
  for path in sorted(directory.iterdir()):
    out.extend(_files_under(path) if path.is_dir() else [path])
  return out


def verify_step(step_dir: str) -> str | None:
  """None when the files of ``step_dir`` match its record; else why not (one line naming the file).
  Raises ``FileNotFoundError`` when the step has no record."""
  record_path = epath.Path(step_dir) / RECORD_NAME
  if not record_path.exists():
    raise FileNotFoundError(str(record_path))
  try:
    want = json.loads(record_path.read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    return f"its record {RECORD_NAME} is unreadable ({type(e).__name__})"
  have = file_digests(step_dir)
  for rel, meta in want.items():
    if rel not in have:
      return f"{rel} is missing"
    if have[rel]["bytes"] != meta["bytes"]:
      return f"{rel} has {have[rel]['bytes']} bytes, its record says {meta['bytes']} (truncated?)"
    if have[rel]["sha256"] != meta["sha256"]:
      return f"{rel} does not match its sha256 (corrupt)"
  extra = sorted(set(have) - set(want))
  if extra:
    return f"{extra[0]} is not in its record"
  return None


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class Checkpointer:
  """Saves every ``save_every`` steps, keeps the last ``keep`` checkpoints, restores the newest good one."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True,
               fallback: bool = True, create: bool = True):
    """``create`` False: a reader (evaluation) that never creates, moves or writes anything."""
    self.directory = fileio.absolute(directory)  # orbax restores only from absolute paths; a URL stays one
    self.fallback, self.async_save, self.writable = fallback, async_save, create
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=create)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._recorder = None

  def step_dir(self, step: int) -> str:
    return fileio.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, int], *, force: bool = False) -> bool:
    self._join_recorder()
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
      if self.async_save:
        self._recorder = threading.Thread(target=self._record, args=(step, True), daemon=True)
        self._recorder.start()
      else:
        self._record(step, False)
    return saved

  def _record(self, step: int, wait: bool) -> None:
    """Writes the integrity record of ``step`` once orbax has committed it (process 0)."""
    if wait:
      self.manager.wait_until_finished()
    if jax.process_index() != 0 or not epath.Path(self.step_dir(step)).is_dir():
      return
    record = {"step": step, "files": file_digests(self.step_dir(step))}
    fileio.write_atomic(fileio.join(self.step_dir(step), RECORD_NAME), json.dumps(record, indent=1))

  def _join_recorder(self) -> None:
    if self._recorder is not None:
      self._recorder.join()
      self._recorder = None

  def problem(self, step: int) -> str | None:
    """Why ``step`` cannot be trusted (one line), "unrecorded" when it has no record, or None when it verifies."""
    try:
      return verify_step(self.step_dir(step))
    except FileNotFoundError:
      return "unrecorded"

  def newest_verified_step(self) -> int | None:
    """The newest step whose files match their record (what a non-finite loss should point to)."""
    self._join_recorder()
    return next((s for s in reversed(self.all_steps()) if self.problem(s) is None), None)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, int], int]:
    """Restores ``step`` (default: the newest good step) into the shapes/shardings of ``abstract_state``;
    returns (state, data-iterator state, step).

    An explicit ``step`` never falls back. Without one, a step that fails verification or reading is reported
    and, with ``fallback``, the next newest is tried (a writable checkpointer moves the bad step aside first, so
    training can write that step afresh); ``CheckpointError`` when none is left.
    """
    def read(candidate):
      restored = self.manager.restore(candidate, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      return restored["state"], dict(restored["data"])

    (state, data_state), step = self._first_good(step, read)
    return state, data_state, step

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores only ``state.params`` of ``step`` (as ``restore`` chooses it) into the shapes/shardings of
    ``abstract_params``: evaluation never reads the optimiser moments (twice the parameters' size)."""
    fields, step = self.restore_fields({"params": abstract_params}, step)
    return fields["params"], step

  def param_shapes(self, step: int | None = None) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of every param (``state.params``) of ``step`` (default: the newest), from the step's
    metadata: no array is read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    handler = ocp.PyTreeCheckpointHandler()
    try:
      meta = handler.metadata(epath.Path(self.step_dir(step)) / "state")
    finally:
      handler.close()
    tree = getattr(meta, "tree", meta)
    return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(dict(tree["params"])).items()}

  def restore_fields(self, target: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], int]:
    """Restores only the state's subtrees ``target`` names ({field: abstract subtree}, e.g. {"params":
    {"generator": ...}, "spectral": {"generator": ...}}) of ``step`` (as ``restore`` chooses it)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)

    def read(candidate):
      # A PyTree checkpointer of its own: the manager's "state" handler is the standard one, which has no partial
      # restore, and a manager keeps the handler type of its first use.
      with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(epath.Path(self.step_dir(candidate)) / "state", args=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True))

    return self._first_good(step, read)

  def _first_good(self, step: int | None, read: Callable[[int], Any]) -> tuple[Any, int]:
    """``(read(s), s)`` for the newest good step ``s`` (or ``step``); see ``restore``."""
    self._join_recorder()
    candidates = self.all_steps() if step is None else [step]
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for candidate in reversed(candidates):
      why = self.problem(candidate)
      if why == "unrecorded":
        logging.warning("checkpoint step %d in %s has no %s (the run stopped before recording it): restoring "
                        "it unverified", candidate, self.directory, RECORD_NAME)
        why = None
      if why is None:
        try:
          restored = read(candidate)
          logging.info("checkpoint: restored step %d from %s", candidate, self.directory)
          return restored, candidate
        except Exception as e:  # pylint: disable=broad-exception-caught
          why = f"cannot be read ({_one_line(e)})"
      else:
        why = f"fails verification: {why}"
      message = f"checkpoint step {candidate} in {self.directory} {why}"
      failures.append(message)
      if step is not None or not self.fallback:
        hint = "" if step is not None else "; --config.checkpoint.fallback=True restores an older step instead"
        raise CheckpointError(message + hint)
      logging.error("%s: falling back to an older step", message)
      print(f"[checkpoint] {message}: falling back to an older step", flush=True)
      if self.writable:
        self._reject(candidate)
    moved = f" (moved to {self.directory}_rejected)" if self.writable else ""
    raise CheckpointError("no checkpoint can be restored: " + "; ".join(failures) + moved)

  def _reject(self, step: int) -> None:
    """Moves a bad step out of the manager's sight (kept for inspection), so the run can write it afresh."""
    if jax.process_index() == 0:
      rejected = epath.Path(self.directory + "_rejected")
      suffix = 0
      while (rejected / f"{step}{f'.{suffix}' if suffix else ''}").exists():
        suffix += 1
      rejected.mkdir(parents=True, exist_ok=True)
      epath.Path(self.step_dir(step)).rename(rejected / f"{step}{f'.{suffix}' if suffix else ''}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_reject_{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._join_recorder()

  def close(self) -> None:
    self.wait()
    self.manager.close()


class StopSignal:
  """SIGTERM (preemption, ``kill``) as a stop at a step boundary: ``should_stop(step)`` after every step says
  whether to checkpoint and stop there, the same answer on every process.

  One process: a Python handler sets a flag, read at the next step. Several processes (``jax.distributed``):
  JAX's preemption sync service (``jax_enable_preemption_service``, on by default) installs its own SIGTERM
  handler when ``jax.distributed`` starts; a notice on any process reaches every process through the
  coordination service, which sets the sync point to the step after the furthest process's latest step, and
  ``multihost_utils.reached_preemption_sync_point(step)`` (what orbax's ``CheckpointManager.reached_preemption``
  calls) is True at that step on every process. It costs no collective per step: the protocol runs in JAX's
  background threads, one or two steps pass before the stop. No Python handler is installed then (it would
  replace JAX's). With the service disabled, the local flags are all-gathered at every call.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    self.synced = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
    if not self.synced and threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: will checkpoint and stop at the next step", signum)
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step`` (call after every step, with increasing steps)."""
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(step)
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray([local]))
    return bool(np.any(flags))

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
