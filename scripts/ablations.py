r"""The paper's Table 1 on the captioned-scenes world: trains and evaluates every row of ``configs/ablations.py``
and writes the table with the paper's figures beside it.

  python scripts/ablations.py --demo_out demo_out --out ablations                # every row, validation split
  python scripts/ablations.py --demo_out demo_out --out ablations --split test   # final figures, same runs

Needs a finished ``make demo`` in ``--demo_out`` (records, vocabularies, scene recogniser, demo CLIP and
generator, scenes detector). Each row trains ``configs/demo.py:two_stage`` with its one change
(``bigen_jax.stages``: OUT/<run>/stage1 and stage2). Rows whose stage 1 is the same config share that run (full,
no_sequence_level and no_clip_loss train one stage 1, make demo's own when it is that config). Resumable row by
row: a row's evaluation is kept in OUT/<row>/results_<split>.json and read back, an interrupted training resumes
from its checkpoint. Every row is evaluated the same way (captioning; generation by the paper's argmax
mask-predict-4 and by the demo's guided sampling, drawn by the scene decoder, the patch preview and the frozen
GAN). The table, rewritten after each row: OUT/ablations_<split>.{md,json}. Progress: each row's start, minutes
and the estimated time left. Run time (2 shared cores): 68 min for the six rows, 9 min a row with its own stage 1
when alone.
"""

import glob
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from bigen_jax import paper  # pylint: disable=g-import-not-at-top
from configs import ablations  # pylint: disable=g-import-not-at-top

_DEMO_OUT = flags.DEFINE_string("demo_out", "demo_out", "A finished make demo's output directory.")
_OUT = flags.DEFINE_string("out", "ablations", "Where the rows' runs and the table go.")
_ROWS = flags.DEFINE_list("rows", list(ablations.ROWS), "Rows of configs/ablations.py, in order.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "The split every row is evaluated on.")
_STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", 0, "Stage-1 steps of every row (0: the config's).")
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", 0, "Stage-2 steps of every row (0: the config's).")

# (column, result key, the paper's figure of each row or "" where Table 1 gives none). Paper: COCO, Table 1 (CIDEr-D
# x100, CLIPScore x100, FID with Inception); ours: the demo world (CIDEr-D x1, CLIPScore with the demo CLIP, FID with
# the scene recogniser's features).
COLUMNS = (("CIDEr-D", "captioning/CIDEr-D"), ("BLEU-4", "captioning/BLEU-4"),
           ("captions true", "captioning/semantic/accuracy"), ("CLIP-S", "captioning/clip_s"),
           ("CLIPScore", "generation/clip_score"), ("GAN CLIPScore", "generation/gan/clip_score"),
           ("FID (recogniser)", "generation/fid_recognizer"), ("semantic acc.", "generation/semantic/accuracy"),
           ("guided CLIPScore", "generation/guidance/clip_score"),
           ("guided GAN CLIPScore", "generation/guidance/gan/clip_score"),
           ("guided FID", "generation/guidance/fid_recognizer"),
           ("guided semantic acc.", "generation/guidance/semantic/accuracy"),
           ("guided R-prec. hard", "generation/guidance/r_precision_hard"))
PAPER = paper.TABLE1


def row_config(row: str, demo_out: str):
  """The row's two-stage (or stage-1) config on the demo's files; evaluation by the main decoder only."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = ablations.get_config(row)
  detectors = sorted(glob.glob(os.path.join(demo_out, "scenes_detector", "*.pt")))  # the weights beside its heads
  demo.with_paths(config, demo_out, detectors[-1] if detectors else "")
  config.eval.generation.variants = {"guidance": dict(config.eval.generation.variants["guidance"])}
  if _STAGE1_STEPS.value:
    config.total_steps = _STAGE1_STEPS.value
  if "stage2" in config and _STAGE2_STEPS.value:
    config.stage2.total_steps = _STAGE2_STEPS.value
  return config


def run_dirs(rows: list[str], demo_out: str, out: str) -> dict[str, tuple[str, str]]:
  """row -> (its stage-1 run directory, the run it is evaluated from). Rows with equal stage-1 configs share the
  first such row's stage 1, or make demo's own stage 1 (``demo_out/train``) when their config is the one it
  trained."""
  from bigen_jax import experiment, run_config, stages  # pylint: disable=g-import-not-at-top
  demo_run = os.path.join(demo_out, "train")
  owners, dirs = {}, {}
  for row in rows:
    config = row_config(row, demo_out)
    first_config = stages.stage1_config(config)
    key = json.dumps(first_config.to_dict(), sort_keys=True, default=str)
    if key not in owners:
      same = (os.path.exists(run_config.saved_path(demo_run)) and not run_config.changed_fields(
          run_config.load(demo_run), experiment.resolve_config(first_config)[0]))
      owners[key] = demo_run if same else os.path.join(out, row, "stage1")
    dirs[row] = (owners[key], os.path.join(out, row, "stage2") if stages.has_stage2(config) else owners[key])
  return dirs


def write_table(path: str, rows: list[dict]) -> None:
  from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_json_atomic(path + ".json", rows)
  lines = ["| row | minutes | " + " | ".join(c for c, _ in COLUMNS) + " | paper (COCO, Table 1) |",
           "|---" * (len(COLUMNS) + 3) + "|"]
  for r in rows:
    cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for _, k in COLUMNS]
    lines.append(f"| {r['row']} | {r['minutes']:.1f} | " + " | ".join(cells) + f" | {PAPER[r['row']]} |")
  with open(path + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from bigen_jax import evaluate, fileio, stages, train  # pylint: disable=g-import-not-at-top
  demo_out, out = os.path.abspath(_DEMO_OUT.value), os.path.abspath(_OUT.value)
  for row in _ROWS.value:
    if row not in ablations.ROWS:
      raise app.UsageError(f"--rows: unknown row {row!r}; known: {ablations.ROWS}")
  dirs = run_dirs(_ROWS.value, demo_out, out)
  table, rows, start, trained = os.path.join(out, f"ablations_{_SPLIT.value}"), [], time.time(), 0
  for i, row in enumerate(_ROWS.value):
    done = os.path.join(out, row, f"results_{_SPLIT.value}.json")
    if os.path.exists(done):
      with open(done) as f:
        rows.append(json.load(f))
      continue
    left = len(_ROWS.value) - i
    eta = f", about {(time.time() - start) / trained * left / 60:.0f} min left" if trained else ""
    print(f"[ablations] row {i + 1}/{len(_ROWS.value)} {row}{eta}", flush=True)
    t = time.time()
    config, (first, final) = row_config(row, demo_out), dirs[row]
    trained_config = stages.stage1_config(config)
    train.train_and_evaluate(trained_config, first)
    if stages.has_stage2(config):
      trained_config = stages.stage2_config(config, first)
      train.train_and_evaluate(trained_config, final)
    trained_config.data.eval_split = _SPLIT.value  # evaluation only: the runs' saved configs keep theirs
    (results, step), = evaluate.evaluate_runs(trained_config, [final], evaluators=["captioning", "generation"],
                                              outputs=[os.path.join(out, row)])  # files in OUT/<row>/eval
    trained += 1
    record = {"row": row, "run": final, "step": step, "minutes": (time.time() - t) / 60,
              **{k: float(v) for k, v in results.items()}}
    fileio.write_json_atomic(done, record)
    rows.append(record)
    write_table(table, rows)
  write_table(table, rows)


if __name__ == "__main__":
  app.run(main)
