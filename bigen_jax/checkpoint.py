"""Orbax checkpoints of the training state plus the data-iterator position, and a SIGTERM/preemption flag.

A checkpoint at step ``s`` holds two items:
  state  the train-state pytree (params, optimizer state, step, rng key data), sharded arrays written by
         every process, restored directly into the target shardings;
  data   the input pipeline's ``{"epoch", "batch_in_epoch"}`` (JSON; identical on every process because the
         pipeline keeps processes in lock-step).
Saves are asynchronous; ``save(..., force=True)`` is used for the final and the preemption save.
"""

import os
import signal
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every ``save_every`` steps, keeps the last ``keep`` checkpoints, restores the latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)  # orbax restores only from absolute paths
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, int], *, force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, int], int]:
    """Restores ``step`` (default: latest) into the shapes/shardings of ``abstract_state``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"], dict(restored["data"]), step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class StopSignal:
  """Set by SIGTERM (preemption, ``kill``); ``should_stop()`` agrees across processes.

  The handler only sets a flag: the training loop saves a checkpoint at the next step boundary and
  exits. With several processes the flag is OR-reduced so every process stops at the same step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: will checkpoint and stop at the next step", signum)
    self._event.set()

  def should_stop(self) -> bool:
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray([local]))
    return bool(np.any(flags))

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
