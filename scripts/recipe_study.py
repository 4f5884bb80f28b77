r"""Which lever moves which number: trains named variants of ``configs/demo.py`` on the demo's data and
evaluates each with the same evaluators (validation loss gap, captioning, generation).

  python scripts/recipe_study.py --out demo_out --variants paper,cosine_mask,joint --steps 1000
  python scripts/recipe_study.py --out demo_out --list

Each variant trains in ``OUT/study/recipe/<name>`` (resumable: a finished row is read back, an interrupted
one resumes from its checkpoint) and the table is rewritten after every row:
``OUT/study/recipe.{md,json}``. Variants are overrides of the demo config (``VARIANTS`` below); the data
(records, vocabulary) are those ``make demo`` wrote, or ``--records`` / ``--vocab``.
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

_OUT = flags.DEFINE_string("out", "demo_out", "The demo's output directory.")
_RECORDS = flags.DEFINE_string("records", "", "Records directory (default OUT/records).")
_VOCAB = flags.DEFINE_string("vocab", "", "Vocabulary directory (default OUT/vocab).")
_VARIANTS = flags.DEFINE_list("variants", [], "Variant names, in order (see --list).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of every variant (0: the config's).")
_LIST = flags.DEFINE_bool("list", False, "Print the variants and exit.")
_TAG = flags.DEFINE_string("tag", "recipe", "Name of the table (OUT/study/<tag>.md) and of its run folder.")

# name -> (what it changes, overrides of configs/demo.py as dotted keys).
PAPER = {"task_schedule": "cycle", "tasks.t2i.mask_schedule": "count", "tasks.t2i.caption_dropout": 0.0,
         "tasks.itm.weight": 0, "optimizer.lr": 5e-4}


def _feature_bag(weight: float, guidance: float = 4.0, **extra) -> dict:
  """Overrides of T2I's feature bag at ``weight`` (the image head's classifier from the standardised codebook x
  0.3), decoded with guidance ``guidance``; ``extra``: more overrides (e.g. seed)."""
  return {"model.code_bag_head": "features", "tasks.t2i.code_bag": weight, "init_image_head_from_codebook": True,
          "image_head_codebook_std": 0.3, "eval.generation.variants.guidance.guidance": guidance, **extra}


VARIANTS = {
    "paper": ("the paper's stage-1 recipe: strict I2T/T2I alternation, U{6..64} masked cells", PAPER),
    "cosine_mask": ("T2I masks drawn MaskGIT-style (cos schedule: mostly near-full masks)",
                    {**PAPER, "tasks.t2i.mask_schedule": "cosine"}),
    "joint": ("both tasks in every step (summed losses), one Adam state for the sum",
              {**PAPER, "task_schedule": "joint"}),
    "joint_cosine": ("joint steps + cosine masks", {**PAPER, "task_schedule": "joint",
                                                    "tasks.t2i.mask_schedule": "cosine"}),
    "joint_cosine_itm": ("joint steps + cosine masks + image-text matching",
                         {**PAPER, "task_schedule": "joint", "tasks.t2i.mask_schedule": "cosine",
                          "tasks.itm.weight": 1}),
    "joint_cosine_lr1e-3": ("joint steps + cosine masks, lr 1e-3",
                            {**PAPER, "task_schedule": "joint", "tasks.t2i.mask_schedule": "cosine",
                             "optimizer.lr": 1e-3}),
    "demo": ("configs/demo.py as it is", {}),
    "demo_2026-12-02": ("configs/demo.py before issue 10's session of 2026-12-06: the paper's I2T layout and one "
                        "cross-attention module", {"tasks.i2t.layout": "mask", "model.shared_cross_attention": True}),
    "demo_constant_lr": ("configs/demo.py, constant lr after warm-up", {"optimizer.schedule": "constant"}),
    "demo_full_masks": ("configs/demo.py with every T2I cell masked (only the caption tells what to draw)",
                        {"tasks.t2i.mask_schedule": "count", "tasks.t2i.min_masked": 64}),
    "demo_i2t_discrete": ("configs/demo.py with I2T reading the cluster tokens T2I learns to fill in (the "
                          "paper's discrete-only input, for I2T only)", {"tasks.i2t.visual_input": "discrete"}),
    "demo_lr2e-3": ("configs/demo.py at lr 2e-3", {"optimizer.lr": 2e-3}),
    "demo_width64": ("configs/demo.py at half the width (64, 2 heads, FFN 256): more steps in the same time",
                     {"model.hidden_size": 64, "model.num_heads": 2, "model.mlp_dim": 256}),
    "demo_causal": ("configs/demo.py with I2T's causal layout: every word of every caption trained in each step",
                    {"tasks.i2t.layout": "causal"}),
    "demo_causal_w64": ("demo_causal at half the width (64, 2 heads, FFN 256)",
                        {"tasks.i2t.layout": "causal", "model.hidden_size": 64, "model.num_heads": 2,
                         "model.mlp_dim": 256}),
    "demo_causal_head128": ("demo_causal with a 128-wide image head before the cluster logits (not the "
                            "27-d feature width)", {"tasks.i2t.layout": "causal", "model.image_head_dim": 128}),
    "demo_causal_unshared": ("demo_causal with a cross-attention module per direction (text -> cells apart "
                             "from cells -> text)", {"tasks.i2t.layout": "causal",
                                                     "model.shared_cross_attention": False}),
    "demo_causal_unshared_head128": ("demo_causal_unshared with the 128-wide image head",
                                     {"tasks.i2t.layout": "causal", "model.shared_cross_attention": False,
                                      "model.image_head_dim": 128}),
    "demo_causal_unshared_w64": ("demo_causal_unshared at half the width (64, 2 heads, FFN 256)",
                                 {"tasks.i2t.layout": "causal", "model.shared_cross_attention": False,
                                  "model.hidden_size": 64, "model.num_heads": 2, "model.mlp_dim": 256}),
    "demo_t2i_weight2": ("configs/demo.py with the T2I loss weighted 2 in the joint sum", {"tasks.t2i.weight": 2}),
    "demo_init_0.088": ("configs/demo.py with weights drawn N(0, 1/sqrt(128))", {"model.init_std": 0.088}),
    "demo_2026-12-06": ("configs/demo.py before the feature bag (third session of 2026-12-06): no T2I auxiliary, "
                        "the image head's classifier from random init, guidance w = 2",
                        {"model.code_bag_head": "", "tasks.t2i.code_bag": 0.0, "init_image_head_from_codebook": False,
                         "image_head_codebook_std": 0.0, "eval.generation.variants.guidance.guidance": 2.0}),
    "demo_feature_bag": ("configs/demo.py with T2I's feature bag (every masked cell regresses the mean standardised "
                         "centroid of the image's codes) and the image head's classifier started from the "
                         "standardised codebook x 0.3", _feature_bag(1.0, guidance=2.0)),
    "demo_feature_bag15_w4": ("demo_feature_bag with the feature bag weighted 1.5, decoded with guidance w = 4 (the "
                              "demo)", _feature_bag(1.5)),
    "demo_feature_bag15_w4_seed1": ("demo_feature_bag15_w4 with seed 1 (init, data order, masks): run-to-run spread",
                                    _feature_bag(1.5, seed=1)),
    "demo_feature_bag2_w4": ("demo_feature_bag with the feature bag weighted 2, decoded with guidance w = 4",
                             _feature_bag(2.0)),
    "demo_feature_bag2_w4_seed1": ("demo_feature_bag2_w4 with seed 1 (init, data order, masks): run-to-run spread",
                                   _feature_bag(2.0, seed=1)),
    "demo_feature_bag3_w4": ("demo_feature_bag with the feature bag weighted 3, decoded with guidance w = 4",
                             _feature_bag(3.0)),
    "demo_dropout": ("configs/demo.py with dropout 0.1 (hidden and attention; the demo until 2026-12-07)",
                     {"model.dropout_rate": 0.1, "model.attention_dropout_rate": 0.1}),
    "demo_dropout_rbg": ("demo_dropout with its masks drawn by XLA's RngBitGenerator (model.dropout_rng=rbg)",
                         {"model.dropout_rate": 0.1, "model.attention_dropout_rate": 0.1,
                          "model.dropout_rng": "rbg"}),
    "demo_no_dropout": ("configs/demo.py without dropout (hidden or attention): the demo since 2026-12-07",
                        {"model.dropout_rate": 0.0, "model.attention_dropout_rate": 0.0}),
}
KEYS = ("validation_loss/i2t/loss", "validation_loss/i2t/gap", "validation_loss/t2i/loss", "validation_loss/t2i/gap",
        "captioning/CIDEr-D", "captioning/semantic/accuracy", "captioning/distinct_captions",
        "generation/semantic/accuracy", "generation/r_precision_easy", "generation/r_precision_hard",
        "generation/guidance/semantic/accuracy", "generation/guidance/r_precision_hard",
        "generation/reference/semantic/accuracy")


def variant_config(name: str, out: str, steps: int):
  """configs/demo.py with the variant's overrides, pointed at the demo's data."""
  from configs import demo as demo_configs  # pylint: disable=g-import-not-at-top
  if name not in VARIANTS:
    raise app.UsageError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
  config = demo_configs.get_config("demo")
  config.data.records_dir = _RECORDS.value or os.path.join(out, "records")
  config.data.vocab_dir = _VOCAB.value or os.path.join(out, "vocab")
  config.data.tokenizer = os.path.join(out, "tokenizer", "vocab.txt")
  config.eval.generation.recognizer_dir = os.path.join(out, "scene_recognizer")
  detectors = sorted(glob.glob(os.path.join(out, "scenes_detector", "*.pt.heads.npz")))
  if detectors:  # the demo's scenes detector draws generated tokens (worlds/scenes/scene_decoder.py)
    config.eval.generation.scene_decoder_heads = detectors[-1]
  config.eval.every = 0
  if steps:
    config.total_steps = steps
  config.update_from_flattened_dict(VARIANTS[name][1])
  return config


def write_table(path: str, rows: list[dict]) -> None:
  from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_json_atomic(path + ".json", rows)
  short = [k.replace("validation_loss/", "val ").replace("captioning/", "I2T ").replace("generation/", "T2I ")
           for k in KEYS]
  lines = ["| variant | what | steps | minutes | " + " | ".join(short) + " |", "|---" * (len(KEYS) + 4) + "|"]
  for r in rows:
    cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k in KEYS]
    lines.append(f"| {r['variant']} | {r['what']} | {r['steps']} | {r['minutes']:.1f} | " + " | ".join(cells) + " |")
  with open(path + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  if _LIST.value:
    for name, (what, overrides) in VARIANTS.items():
      print(f"{name:24s} {what}\n{'':24s} {overrides}")
    return
  logging.set_verbosity(logging.WARNING)
  from bigen_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(_OUT.value)
  table = os.path.join(out, "study", _TAG.value)
  rows = []
  for name in _VARIANTS.value:
    workdir = os.path.join(out, "study", _TAG.value, name)
    done = os.path.join(workdir, "row.json")
    if os.path.exists(done):
      with open(done) as f:
        rows.append(json.load(f))
      continue
    config = variant_config(name, out, _STEPS.value)
    print(f"[recipe] {name}: {VARIANTS[name][0]}", flush=True)
    t = time.time()
    state = train.train_and_evaluate(config, workdir)
    results, step = evaluate.evaluate(config, workdir, evaluators=["validation_loss", "captioning", "generation"])
    row = {"variant": name, "what": VARIANTS[name][0], "steps": int(state.step), "minutes": (time.time() - t) / 60,
           **{k: float(v) for k, v in results.items()}}
    from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_json_atomic(done, row)
    rows.append(row)
    write_table(table, rows)
  write_table(table, rows)


if __name__ == "__main__":
  app.run(main)
