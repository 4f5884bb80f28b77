r"""What the image generator's training time buys: held-out images rebuilt from their true tokens by a
``bigen_jax.train_generator`` run at each of its checkpoints, scored by the generation evaluator's reader
beside the patch preview and the world's drawing of the same tokens.

  python scripts/generator_study.py --workdir demo_out/train --generator_dir demo_out/generator

``--workdir``: a stage-1 run (its saved config names the records, the vocabulary, the recogniser and the scene
decoder). Writes ``GENERATOR_DIR/study.md`` (a row per checkpoint: semantic accuracy, FID in the recogniser's
space, R-precision hard, seconds of training at that step from the run's metrics) and ``study.png`` (real |
preview | scene decoder | GAN at each step, one row per image).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", "demo_out/train", "A stage-1 run directory (its saved config is used).")
_GENERATOR = flags.DEFINE_string("generator_dir", "demo_out/generator", "A bigen_jax.train_generator run.")
_IMAGES = flags.DEFINE_integer("images", 8, "Rows of study.png.")

ROWS = ("semantic/accuracy", "fid_recognizer", "r_precision_hard")


def training_seconds(generator_dir: str) -> dict[int, float]:
  """Step -> wall seconds of training up to it, summed from the run's logged steps/s."""
  from bigen_jax import metrics  # pylint: disable=g-import-not-at-top
  out, total, last = {}, 0.0, 0
  for row in metrics.read_history(generator_dir):
    if "steps_per_sec" in row and row["step"] > last:
      total += (row["step"] - last) / row["steps_per_sec"]
      out[row["step"]], last = total, row["step"]
  return out


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax import checkpoint, experiment, fileio  # pylint: disable=g-import-not-at-top
  from bigen_jax import run_config, train_generator, viz  # pylint: disable=g-import-not-at-top
  from bigen_jax.eval import generation  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import preview  # pylint: disable=g-import-not-at-top

  ctx = experiment.build_context(run_config.get_config(_WORKDIR.value), _WORKDIR.value, training=False)
  ckpt = checkpoint.Checkpointer(fileio.join(_GENERATOR.value, "checkpoints"), save_every=1, async_save=False,
                                 create=False)
  steps = [s for s in ckpt.all_steps() if s > 1]
  ckpt.close()
  seconds = training_seconds(_GENERATOR.value)
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    ev = generation.Evaluator(ctx)
    rows = [("patch preview", "", ev.preview_reference or ev.reference),
            ("scene decoder", "", ev.reference if ev.drawer is not None else None)]
    n, ids = min(_IMAGES.value, len(ev.captions)), ev.data["cluster_ids"]
    columns = {"real": ev.data["images"][:n], "preview": preview.render_preview(ids[:n], ev.table)}
    if ev.drawer is not None:
      columns["scene decoder"] = ev.true_drawings[:n]
    for step in steps:
      ev.set_generator(train_generator.load_generator(_GENERATOR.value, step))
      rows.append((f"GAN, step {step}", f"{seconds.get(step, float('nan')):.0f}", ev.gan_reference))
      columns[f"GAN {step}"] = ev.gan_drawings[:n]
      print(f"[generator_study] step {step}: " + ", ".join(f"{k} {rows[-1][2].get(k, float('nan')):.3f}"
                                                          for k in ROWS), flush=True)
  lines = ["| drawing | training s | " + " | ".join(ROWS) + " |", "|---" * (len(ROWS) + 2) + "|"]
  for name, secs, metrics in rows:
    if metrics is not None:
      lines.append(f"| {name} | {secs} | " + " | ".join(f"{metrics.get(k, float('nan')):.3f}" for k in ROWS) + " |")
  table = "\n".join(lines) + "\n"
  fileio.write_atomic(fileio.join(_GENERATOR.value, "study.md"), table)
  labels = " | ".join(columns)
  sheet = viz.captioned_grid([[v[i] for v in columns.values()] for i in range(n)],
                             [f"{c}  ({labels})" for c in ev.captions[:n]], tile=128, wrap=60)
  viz.save_png(sheet, fileio.join(_GENERATOR.value, "study.png"))
  print(table)


if __name__ == "__main__":
  app.run(main)
