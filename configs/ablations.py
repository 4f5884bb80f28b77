r"""The paper's Table 1 ablations (METHOD.md §8) at the demo's scale, one config per row: ``get_config(row)``.

  python scripts/ablations.py --demo_out demo_out --out ablations     # trains and evaluates every row

Every row is ``configs/demo.py:two_stage`` (stage 1, then stage 2: SCST, the CLIP loss) with one change:

  full               the paper's recipe
  two_model          "w/o unified": one model per direction (twice the parameters)
  dense_only         T2I reads dense features too (the visual input of its unmasked cells)
  discrete_only      I2T (and SCST) read discrete features (each cell's centroid) too
  no_sequence_level  "w/o sequence-level training": stage 1 only
  no_clip_loss       stage 2 without the CLIP loss (SCST and T2I's cross-entropy steps)

The paths are make demo's (``configs/demo.py:with_paths`` points them elsewhere).
"""

from configs import demo

ROWS = ("full", "two_model", "dense_only", "discrete_only", "no_sequence_level", "no_clip_loss")


def get_config(row: str = "full"):
  if row not in ROWS:
    raise ValueError(f"configs/ablations.py: unknown row {row!r}: expected one of {ROWS}")
  config = demo.get_config("two_stage")
  if row == "two_model":
    config.model.two_model = True
  elif row == "dense_only":
    config.tasks.t2i.visual_input = "dense"
  elif row == "discrete_only":
    config.tasks.i2t.visual_input = "discrete"
    config.tasks.scst.visual_input = "discrete"
  elif row == "no_sequence_level":
    del config["stage2"]
  elif row == "no_clip_loss":
    config.stage2.tasks.clip.weight = 0
    config.stage2.task_order = ("scst", "t2i")
  return config
