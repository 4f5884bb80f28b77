"""Training tasks, each a pure function
``loss_fn(params, batch, rng, *, model, cfg, frozen, deterministic=False) -> (loss, metrics)``
(``deterministic``: no dropout, for evaluation).

``cfg`` is the task's config block (``config.tasks.<name>``, special token ids added by the trainer);
``frozen`` holds inputs that never receive gradients (the visual codebook, later the generator and CLIP).
The trainer looks tasks up here by name; a new task (SCST, CLIP loss, pretraining objectives) is a new
module plus one line below, and the training loop does not change. The tasks share their input layouts
(``layouts``) and losses (``losses``); they call the model through ``bigen_jax.models.apply``.
"""

from bigen_jax import errors
from bigen_jax.tasks import i2t
from bigen_jax.tasks import itm
from bigen_jax.tasks import t2i

TASKS = {"i2t": i2t.loss_fn, "t2i": t2i.loss_fn, "itm": itm.loss_fn}


def get_task(name: str):
  if name not in TASKS:
    raise errors.ConfigError(f"unknown task {name!r} in config.tasks: known tasks are {sorted(TASKS)}")
  return TASKS[name]
