"""Training metrics: the history file (``History``: ``workdir/metrics.jsonl``), the summary of the steps since the
last log (``summarise``: means per task; a non-finite loss stops the run) and the analytic FLOPs behind the MFU
estimate (``model_flops_per_example``).
"""

import collections
import json

from etils import epath
import jax
import ml_collections
import numpy as np

from bigen_jax import checkpoint
from bigen_jax import fileio
from bigen_jax import tasks as tasks_lib
from bigen_jax.models import flops

HISTORY_NAME = "metrics.jsonl"


def model_flops_per_example(config: ml_collections.ConfigDict, cycle: list[str]) -> float:
  """Training FLOPs of one example averaged over the task cycle (analytic, ``bigen_jax.models.flops``):
  I2T runs the text head at one position, T2I and CCC the image head on every cell, MLM the text head on every
  word."""
  per_task = {"i2t": flops.train_flops(config.model) + 3 * 2 * config.model.hidden_size * (
      config.model.hidden_size + config.model.vocab_size),
              "t2i": flops.train_flops(config.model, image_logits=True),
              "ccc": flops.train_flops(config.model, image_logits=True),
              "mlm": flops.train_flops(config.model, text_logits=True)}

  def one(task):
    return per_task.get(task, flops.train_flops(config.model))
  if cycle == [tasks_lib.JOINT]:
    return float(sum(one(name) for name, cfg in config.tasks.items() if cfg.weight > 0))
  counts = collections.Counter(cycle)  # the "random" schedule's cycle is the whole run
  return float(sum(one(task) * n for task, n in counts.items()) / len(cycle))


class History:
  """Logged metrics in ``workdir/metrics.jsonl``, one JSON line per log (read by the demo's loss-curve plot).

  The whole file is rewritten atomically at each log: object stores (gs://) cannot append, and a reader never
  sees a partial line.
  """

  def __init__(self, workdir: str, start_step: int):
    self.path = fileio.join(workdir, HISTORY_NAME)
    self.lines = []
    if jax.process_index() == 0 and epath.Path(self.path).exists():
      # Drops the lines a killed run wrote after its last checkpoint.
      self.lines = [line for line in epath.Path(self.path).read_text().splitlines()
                    if line and json.loads(line)["step"] <= start_step]
      fileio.write_atomic(self.path, "".join(line + "\n" for line in self.lines))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if jax.process_index() == 0:
      self.lines.append(json.dumps({"step": step, **scalars}))
      fileio.write_atomic(self.path, "".join(line + "\n" for line in self.lines))


def read_history(workdir: str) -> list[dict[str, float]]:
  """The rows ``History`` logged in ``workdir/metrics.jsonl``, in order: {"step": s, <metric>: value, ...}."""
  text = epath.Path(fileio.join(workdir, HISTORY_NAME)).read_text()
  return [json.loads(line) for line in text.splitlines() if line]


def summarise(pending: list[tuple[int, str, dict]], ckpt: checkpoint.Checkpointer) -> dict[str, float]:
  """Means of the metrics since the last log, per task; stops on a non-finite loss, naming the newest
  checkpoint that still verifies."""
  fetched = jax.device_get(pending)
  sums, counts = {}, {}
  for step, task, metrics in fetched:
    if not np.isfinite(metrics["loss"]):
      last_good = ckpt.newest_verified_step()
      where = f"step {last_good} in {ckpt.directory}" if last_good is not None else "none yet"
      raise FloatingPointError(f"non-finite {task} loss ({metrics['loss']}) at step {step + 1}; last good "
                               f"checkpoint: {where}")
    for key, value in metrics.items():
      name = key if key == "lr" or (task == tasks_lib.JOINT and "/" in key) else f"{task}/{key}"
      sums[name] = sums.get(name, 0.0) + float(value)
      counts[name] = counts.get(name, 0) + 1
  return {k: sums[k] / counts[k] for k in sums}
