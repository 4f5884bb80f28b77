r"""Evaluates a training run's checkpoint with evaluators of the registry; writes JSON and a markdown table.

  python -m bigen_jax.evaluate --workdir demo_out/train
  python -m bigen_jax.evaluate --workdir gs://bucket/runs/coco --step 50000 \
      --evaluators captioning,generation --config.eval.captioning.decoder=beam
  python -m bigen_jax.evaluate --config configs/coco.py --workdir runs/coco

Without ``--config`` the run's saved config (``workdir/config.json``) is read; ``--config.<field>`` overrides apply
on top of it. Only the params are restored (not the optimiser state), and ``init_from`` is never read.
Results go to ``workdir/eval/results_<step>.json`` and ``.md``; evaluators add their own files there
(captions JSON, PNG grids).
"""

import os
import sys
from typing import Sequence

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

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's training configuration (default: the one "
                                          "saved in --workdir).", lock_config=True)
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
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(workdir) / "checkpoints"
  if not epath.Path(workdir).exists():
    raise errors.UserError(f"--workdir={workdir} does not exist")
  if not epath.Path(workdir).is_dir():
    raise errors.UserError(f"--workdir={workdir} is not a directory")
  paths = list(directory.iterdir()) if directory.is_dir() else []
  steps = sorted(int(p.name) for p in paths if p.name.isdigit() and p.is_dir())
  if not steps:
    raise errors.UserError(f"no checkpoints in {directory}: is --workdir={workdir} a training run's directory?")
  if step is not None and step not in steps:
    raise errors.UserError(f"no checkpoint step {step} in {directory}: available steps are {steps}")
  return steps


def evaluate(config: ml_collections.ConfigDict | None, workdir: str, *, step: int | None = None,
             evaluators: list[str] | None = None) -> tuple[dict[str, float], int]:
  """Restores the params of ``step`` (default latest) of the run in ``workdir`` and runs ``evaluators``; returns
  (results, step) and writes them under ``workdir/eval``. ``config`` None: the run's saved config.

  A missing workdir, checkpoint or step raises ``UserError`` before anything is loaded or created.
  """
  return evaluate_runs(config, [workdir], steps=[step], evaluators=evaluators)[0]


# Model fields that change how a model trains, not the params it has or what it computes in evaluation: runs that
# differ only in them (e.g. stage 2 without stage 1's dropout) are evaluated as one model.
TRAINING_ONLY_MODEL_FIELDS = ("model.dropout_rate", "model.attention_dropout_rate", "model.dropout_rng",
                              "model.remat")


def evaluate_runs(config: ml_collections.ConfigDict | None, workdirs: Sequence[str], *,
                  steps: Sequence[int | None] | None = None, evaluators: list[str] | None = None,
                  outputs: Sequence[str] | None = None) -> list[tuple[dict[str, float], int]]:
  """``evaluate`` of each run of ``workdirs`` (``steps``: one per run, None the latest) with one context and one
  set of evaluators, built once for the first run: what does not depend on the params (the evaluation set, the
  real images' and the true tokens' scores, compiled decoders) is computed once, e.g. for stage 1 and stage 2 of a
  run. ``config`` None: the first run's saved config; every run must have its model (``UserError`` otherwise).
  Each run's results and files go to its own ``workdir/eval``, or to ``outputs[i]/eval`` when given (e.g. to leave
  a run that others own untouched)."""
  from bigen_jax import checkpoint, experiment, fileio, run_config, state  # pylint: disable=g-import-not-at-top
  from bigen_jax.eval import registry  # pylint: disable=g-import-not-at-top
  steps = list(steps) if steps is not None else [None] * len(workdirs)
  for workdir, step in zip(workdirs, steps):
    checkpoint_steps(workdir, step)
  ctx = experiment.build_context(run_config.get_config(workdirs[0]) if config is None else config, workdirs[0],
                                 training=False)
  for workdir in workdirs[1:]:
    if os.path.exists(run_config.saved_path(workdir)):
      saved = run_config.get_config(workdir)  # saved resolved, as ctx.config is
      changed = [c for c in run_config.changed_fields(saved, ctx.config)
                 if c.startswith("model.") and c.split(":")[0] not in TRAINING_ONLY_MODEL_FIELDS]
      if changed:
        raise errors.UserError(f"{workdir} trained another model than {workdirs[0]}: {changed[:3]}")
  abstract_params, _ = state.param_layout(ctx)
  out = []
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    built = [registry.create(name, ctx) for name in (evaluators or ctx.config.eval.evaluators)]
    for workdir, step, target in zip(workdirs, steps, outputs or workdirs):
      ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=1, async_save=False,
                                     create=False)
      try:
        params, step = ckpt.restore_params(abstract_params, step)
      finally:
        ckpt.close()
      ctx.workdir = target  # where the evaluators write this run's files
      results = {}
      for evaluator in built:
        results.update(evaluator.run(params, step=step))
      if jax.process_index() == 0:
        fileio.write_json_atomic(fileio.join(target, "eval", f"results_{step}.json"), results)
        fileio.write_atomic(fileio.join(target, "eval", f"results_{step}.md"), markdown_table(results, step))
      out.append((results, step))
  return out


def with_saved_config(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=<bigen_jax/run_config.py>:<workdir>`` added when it has no ``--config``: the
  run's saved config, which ``--config.<field>`` overrides then change."""
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in args):
    return argv
  workdir = None
  for i, arg in enumerate(args):
    name, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == "workdir":
      workdir = value if eq else (args[i + 1] if i + 1 < len(args) else None)
  if not workdir:
    return argv
  saved = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_config.py")
  return [argv[0], f"--config={saved}:{workdir}"] + argv[1:]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bigen_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(_CONFIG.value.get("distributed"))
  results, step = evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value, evaluators=_EVALUATORS.value)
  print(markdown_table(results, step))


if __name__ == "__main__":
  sys.argv = with_saved_config(sys.argv)
  cli.run(main)
