"""Training tasks, each a pure function
``loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False) -> (loss, metrics)``
(``deterministic``: no dropout, for evaluation).

``cfg`` is the task's config block (``config.tasks.<name>``, special token ids added by the trainer);
``frozen`` holds inputs that never receive gradients (the visual codebook, later the generator and CLIP).
The trainer looks tasks up here by name; a new task (SCST, CLIP loss, pretraining objectives) is a new
module plus one line below, and the training loop does not change. The tasks share their input layouts
(``layouts``) and losses (``losses``); they call the model through ``bigen_jax.models.apply``.
``task_cycle`` is the schedule: which task (or ``JOINT``, all of them) each training step runs.
"""

from typing import Sequence

from bigen_jax import errors
from bigen_jax.tasks import clip_loss
from bigen_jax.tasks import i2t
from bigen_jax.tasks import itm
from bigen_jax.tasks import scst
from bigen_jax.tasks import t2i

TASKS = {"i2t": i2t.loss_fn, "t2i": t2i.loss_fn, "itm": itm.loss_fn, "scst": scst.loss_fn, "clip": clip_loss.loss_fn}
JOINT = "joint"  # the step kind of the "joint" schedule: the weighted sum of every task's loss


def get_task(name: str):
  if name not in TASKS:
    raise errors.ConfigError(f"unknown task {name!r} in config.tasks: known tasks are {sorted(TASKS)}")
  return TASKS[name]


def task_cycle(task_configs, schedule: str = "cycle", order: Sequence[str] = ()) -> list[str]:
  """The repeating schedule of step kinds. ``schedule`` "cycle" (the paper): ``weight`` consecutive steps of
  each task, in config order, or the steps of ``order`` (``config.task_order``: task names, each of a task with
  weight > 0, e.g. stage 2's ("scst", "clip", "scst", "t2i")) when given; "joint": every step is ``JOINT``, the
  weighted sum of all tasks' losses."""
  for name in task_configs:
    get_task(name)
  if not any(cfg.weight > 0 for cfg in task_configs.values()):
    raise errors.ConfigError("config.tasks gives every task weight 0: nothing to train")
  if schedule == "joint":
    return [JOINT]
  if schedule != "cycle":
    raise errors.ConfigError(f"--config.task_schedule={schedule!r}: expected 'cycle' or 'joint'")
  if order:
    off = [name for name in order if name not in task_configs or not task_configs[name].weight > 0]
    if off:
      raise errors.ConfigError(f"--config.task_order={tuple(order)} names {off}, not a task of config.tasks with "
                               "weight > 0")
    return list(order)
  return [name for name, cfg in task_configs.items() for _ in range(int(cfg.weight))]
