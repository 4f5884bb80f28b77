r"""Evaluates a training run's checkpoint with evaluators of the registry; writes JSON and a markdown table.

  python -m bigen_jax.evaluate --config configs/demo.py --workdir demo_out/train
  python -m bigen_jax.evaluate --config configs/coco.py --workdir runs/coco --step 50000 \
      --evaluators captioning,generation --config.eval.captioning.decoder=beam

Results go to ``workdir/eval/results_<step>.json`` and ``.md``; evaluators add their own files there
(captions JSON, PNG grids).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice would precede one-line errors

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top
from bigen_jax import errors  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's training configuration.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints/ inside).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EVALUATORS = flags.DEFINE_list("evaluators", None, "Evaluator names (default: config.eval.evaluators).")


def markdown_table(results: dict[str, float], step: int) -> str:
  """``| metric | value |`` rows, sorted by name."""
  lines = [f"| metric (step {step}) | value |", "|---|---|"]
  lines += [f"| {name} | {value:.4f} |" for name, value in sorted(results.items())]
  return "\n".join(lines) + "\n"


def checkpoint_steps(workdir: str, step: int | None = None) -> list[int]:
  """The steps saved in ``workdir/checkpoints`` (integer-named directories; unfinished ``*.orbax-checkpoint-tmp*``
  ones are not steps), read without creating anything.

  Raises ``UserError`` when the workdir does not exist, holds no checkpoint, or lacks ``step``.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.exists(workdir):
    raise errors.UserError(f"--workdir={workdir} does not exist")
  if not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir} is not a directory")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  steps = sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  if not steps:
    raise errors.UserError(f"no checkpoints in {directory}: is --workdir={workdir} a training run's directory?")
  if step is not None and step not in steps:
    raise errors.UserError(f"no checkpoint step {step} in {directory}: available steps are {steps}")
  return steps


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
             evaluators: list[str] | None = None) -> tuple[dict[str, float], int]:
  """Restores ``step`` (default latest) of the run in ``workdir`` and runs ``evaluators``; returns
  (results, step) and writes them under ``workdir/eval``.

  A missing workdir, checkpoint or step raises ``UserError`` before anything is loaded or created.
  """
  from bigen_jax import checkpoint, optim, train  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
  from bigen_jax.eval import registry  # pylint: disable=g-import-not-at-top
  checkpoint_steps(workdir, step)
  ctx = train.build_context(config, workdir)
  tx, _ = optim.make_optimizer(ctx.config.optimizer, ctx.config.total_steps)
  abstract, _, _ = train.create_state(ctx, tx, ctx.vocab.codebook)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, async_save=False,
                                 create=False)
  try:
    state, _, step = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  names = list(evaluators or ctx.config.eval.evaluators)
  results = {}
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    for name in names:
      results.update(registry.create(name, ctx).run(state.params, step=step))
  if jax.process_index() == 0:
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    records.write_json_atomic(os.path.join(out, f"results_{step}.json"), results)
    with open(os.path.join(out, f"results_{step}.md"), "w") as f:
      f.write(markdown_table(results, step))
  return results, step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(_CONFIG.value.get("distributed"))
  results, step = evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value, evaluators=_EVALUATORS.value)
  print(markdown_table(results, step))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
