"""Training tasks, each a pure function
``loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False) -> (loss, metrics)``
(``deterministic``: no dropout, for evaluation).

``cfg`` is the task's config block (``config.tasks.<name>``, special token ids added by the trainer);
``frozen`` holds inputs that never receive gradients (the visual codebook, later the generator and CLIP).
The trainer looks tasks up here by name; a new task (SCST, CLIP loss, pretraining objectives) is a new
module plus one line below, and the training loop does not change. The tasks share their input layouts
(``layouts``) and losses (``losses``); they call the model through ``bigen_jax.models.apply``.
``task_cycle`` is the schedule: which task (or ``JOINT``, all of them) each training step runs.

X-LXMERT's pretraining objectives (METHOD.md §7) are tasks too: ``mlm`` (masks the caption), ``ccc`` (the T2I loss
with its own config block: masks the image), ``itm`` and ``qa`` (mask nothing); the "random" schedule draws one
per step, so that each step masks one modality or none.
"""

from typing import Sequence

import numpy as np

from bigen_jax import errors
from bigen_jax.tasks import clip_loss
from bigen_jax.tasks import i2t
from bigen_jax.tasks import itm
from bigen_jax.tasks import mlm
from bigen_jax.tasks import qa
from bigen_jax.tasks import scst
from bigen_jax.tasks import t2i

TASKS = {"i2t": i2t.loss_fn, "t2i": t2i.loss_fn, "itm": itm.loss_fn, "scst": scst.loss_fn, "clip": clip_loss.loss_fn,
         "mlm": mlm.loss_fn, "ccc": t2i.loss_fn, "qa": qa.loss_fn}
SCHEDULES = ("cycle", "joint", "random")
JOINT = "joint"  # the step kind of the "joint" schedule: the weighted sum of every task's loss


def get_task(name: str):
  if name not in TASKS:
    raise errors.ConfigError(f"unknown task {name!r} in config.tasks: known tasks are {sorted(TASKS)}")
  return TASKS[name]


def random_schedule(weights: dict[str, float], *, seed: int, num_steps: int) -> list[str]:
  """X-LXMERT's schedule: step s runs task t with probability weights[t] / sum(weights), drawn from the ``seed``'s
  Philox stream at position s, so that the task of step s depends on (seed, s) alone: a resumed or longer run
  draws the same tasks."""
  names = [name for name, weight in weights.items() if weight > 0]
  p = np.asarray([weights[name] for name in names], np.float64)
  u = np.random.Generator(np.random.Philox(key=seed)).random(num_steps)
  index = np.minimum(np.searchsorted(np.cumsum(p / p.sum()), u, side="right"), len(names) - 1)
  return [names[i] for i in index]


def task_cycle(task_configs, schedule: str = "cycle", order: Sequence[str] = (), *, seed: int = 0,
               num_steps: int = 0) -> list[str]:
  """The repeating schedule of step kinds (step s runs entry s mod its length). ``schedule`` "cycle" (the paper):
  ``weight`` consecutive steps of each task, in config order, or the steps of ``order`` (``config.task_order``:
  task names, each of a task with weight > 0, e.g. stage 2's ("scst", "clip", "scst", "t2i")) when given; "joint":
  every step is ``JOINT``, the weighted sum of all tasks' losses; "random" (X-LXMERT): ``num_steps`` entries, each
  a task drawn by ``random_schedule`` with ``seed``."""
  for name in task_configs:
    get_task(name)
  if not any(cfg.weight > 0 for cfg in task_configs.values()):
    raise errors.ConfigError("config.tasks gives every task weight 0: nothing to train")
  if schedule == "joint":
    return [JOINT]
  if schedule == "random":
    if num_steps <= 0:
      raise errors.ConfigError(f"--config.task_schedule=random needs the run's length (num_steps={num_steps})")
    return random_schedule({name: float(cfg.weight) for name, cfg in task_configs.items()}, seed=seed,
                           num_steps=num_steps)
  if schedule != "cycle":
    raise errors.ConfigError(f"--config.task_schedule={schedule!r}: expected one of {SCHEDULES}")
  if order:
    off = [name for name in order if name not in task_configs or not task_configs[name].weight > 0]
    if off:
      raise errors.ConfigError(f"--config.task_order={tuple(order)} names {off}, not a task of config.tasks with "
                               "weight > 0")
    return list(order)
  return [name for name, cfg in task_configs.items() for _ in range(int(cfg.weight))]
