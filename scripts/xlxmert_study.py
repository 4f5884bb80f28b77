r"""X-LXMERT on the captioned-scenes world: question answering against the majority baseline, CCC against feature
regression, and the unified model's stage 1 from the pretrained model against stage 1 from scratch.

  python scripts/xlxmert_study.py --out demo_out                  # every row, validation split (tune here)
  python scripts/xlxmert_study.py --out demo_out --split test     # final figures, same runs
  python scripts/xlxmert_study.py --out demo_out --rows pretrain_ccc,stage1_from_ccc --pretrain_lr 1e-4

Needs a finished ``make demo`` in ``--out`` (world, tokenizer, scenes detector, records, vocabulary, scene
recogniser, stage 1 in OUT/train). First the data, under OUT/xlxmert:
  records  the demo's images re-extracted with the world's questions (the same backbone, detector weights, layer
           and tokenizer as the demo's records: read from OUT/records/manifest.json), their cells assigned to the
           demo's codebook (``vocab.import_vocab`` of OUT/vocab/codebook.npy: cluster ids equal the demo's; the
           table says how many do), and the answer vocabulary (``answers.build_answer_vocab``: the world's fixed
           answers, each question type's majority answer from the training split).
Then the rows (``ROWS``), each trained in OUT/xlxmert/<row> and evaluated on ``--split``:
  pretrain_ccc         configs/xlxmert_pretrain.py:demo (MLM, CCC, ITM, QA) on these records
  pretrain_regression  configs/xlxmert_pretrain.py:demo,regression (feature regression instead of CCC); its T2I
                       decodes by the nearest centroid (``eval.generation.readout``): its classifier never trains
  qa_from_ccc          configs/xlxmert_vqa.py:demo (QA alone, BCE, X-LXMERT's lr 5e-4, 2000 steps) from pretrain_ccc
  qa_from_scratch      the same fine-tuning from a random init: the reference row
  qa_from_stage1       the same fine-tuning from make demo's stage 1 (OUT/train: the unified model, its cross-modality
                       layers grounded by I2T), on the dense cells
  stage1_from_ccc      configs/demo.py's stage 1 on the demo's records, initialised from pretrain_ccc (its answer
                       head left out, the demo's code-bag head fresh, the vision cross-attention from the shared
                       one: ``state.restore_run_params``)
  stage1_scratch       make demo's own stage 1 (OUT/train), evaluated here (its files go to OUT/xlxmert, not OUT/train)
Each row's evaluation files (results, QA table, pictures) go to OUT/xlxmert/<row>/<split>/eval.
Evaluation: the pretraining and QA rows by ``qa`` (VQA accuracy per question type against the majority answer of
the type), the pretraining rows also by ``generation`` (T2I semantic accuracy and R-precision of argmax
mask-predict-4 and the demo's guided decoder, drawn by the scene decoder), the stage-1 rows by ``validation_loss``,
``captioning`` and ``generation``. The demo CLIP and the GAN are left out, for time
(the study compares semantic accuracy and R-precision).

Resumable row by row: a row's evaluation is kept in OUT/xlxmert/<row>/results_<split>.json and read back, an
interrupted training resumes from its checkpoint. The tables, rewritten after each row:
OUT/xlxmert/xlxmert_<split>.{md,json}. Progress: each row's start, minutes and the estimated time left.
``--steps N`` trains every row N steps (tests: the whole study on the tiny world).

Run time (2 CPU cores), measured on the tiny world only (``tests/test_xlxmert_study.py``'s make-demo stand-in:
64/16/16 scenes, a 4-step detector, the demo's model): the whole study at ``--steps 2`` in 4.9 min (compiles and
evaluations; a test suite ran on the same cores), and alone at ``--steps 150`` the training rates were 3.5 steps/s
(pretraining), 3.7 (QA) and 2.5 (stage 1's joint steps; make demo's own: 2.9). From these, the default steps
(pretraining 1000 x 2, QA 500 x 2, stage 1 800) train for about 22 min on the demo world, and with the data (the
detector over 2,500 images) and the evaluations of 250 validation images the study should take about 28 min. Measured
on the demo world (2026-12-07, an AMD 2-core machine shared with other jobs): pretrain_ccc 12.9 min,
pretrain_regression 8.7, qa_from_ccc 2.3, qa_from_scratch 3.0, stage1_from_ccc 7.9, stage1_scratch 0.7 (its
evaluation only): about 36 min with the data; the row qa_from_stage1, added later, about 4 min more. Since the QA
rows train 2000 steps at lr 5e-4 (twelfth session), each takes 14.3-14.7 min on one core (pretrain_regression at
lr 1e-4: 10.5 min on two): about 75 min for the whole study.
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", "demo_out", "A finished make demo's output directory; the study writes OUT/xlxmert.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "The split every row is evaluated on.")
_ROWS = flags.DEFINE_list("rows", None, "Rows to run, in order (default: all of ROWS).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of every row (0: each row's default, STEPS).", lower_bound=0)
_PRETRAIN_LR = flags.DEFINE_float("pretrain_lr", None, "The pretraining rows' lr (default: configs/xlxmert_pretrain."
                                  "py:demo's, 1e-4); given, every row's run and the tables go to "
                                  "OUT/xlxmert/pretrain_lr_<lr> (the data stays shared).", lower_bound=0.0)

SPLITS = ("train", "validation", "test")
# row -> (what it is, evaluators)
ROWS = {
    "pretrain_ccc": ("X-LXMERT pretraining (MLM, CCC, ITM, QA)", ("qa", "generation")),
    "pretrain_regression": ("X-LXMERT pretraining with feature regression instead of CCC", ("qa", "generation")),
    "qa_from_ccc": ("QA fine-tuning from pretrain_ccc", ("qa",)),
    "qa_from_scratch": ("QA fine-tuning from a random init", ("qa",)),
    "qa_from_stage1": ("QA fine-tuning from make demo's stage 1 (OUT/train), dense cells", ("qa",)),
    "stage1_from_ccc": ("configs/demo.py stage 1 from pretrain_ccc", ("validation_loss", "captioning", "generation")),
    "stage1_scratch": ("make demo's stage 1 (OUT/train)", ("validation_loss", "captioning", "generation")),
}
# Default training steps by kind (stage 1: make demo's own run's, so that both stage-1 rows train as long).
STEPS = {"pretrain": 1000, "qa": 2000}  # by kind, or by row
COLUMNS = {  # the T2I and stage-1 tables: (column, result key)
    "t2i": (("T2I semantic acc. (mask-predict-4)", "generation/semantic/accuracy"),
            ("guided semantic acc.", "generation/guidance/semantic/accuracy"),
            ("guided R-prec. hard", "generation/guidance/r_precision_hard"),
            ("cell accuracy", "generation/cell_accuracy"), ("QA accuracy (its QA head)", "qa/accuracy")),
    "stage1": (("val I2T gap", "validation_loss/i2t/gap"), ("val T2I gap", "validation_loss/t2i/gap"),
               ("CIDEr-D", "captioning/CIDEr-D"), ("captions true", "captioning/semantic/accuracy"),
               ("T2I semantic acc.", "generation/semantic/accuracy"),
               ("guided semantic acc.", "generation/guidance/semantic/accuracy"),
               ("guided R-prec. hard", "generation/guidance/r_precision_hard")),
}
QA_ROWS = ("qa_from_ccc", "qa_from_scratch", "qa_from_stage1", "pretrain_ccc", "pretrain_regression")


class Paths:
  """Where the demo's files are and where the study writes."""

  def __init__(self, out: str, pretrain_lr: float | None = None):
    self.out, self.pretrain_lr = out, pretrain_lr
    self.study = os.path.join(out, "xlxmert")
    self.runs = os.path.join(self.study, f"pretrain_lr_{pretrain_lr:g}") if pretrain_lr else self.study
    self.records, self.vocab = os.path.join(self.study, "records"), os.path.join(self.study, "vocab")
    self.demo_records, self.demo_vocab = os.path.join(out, "records"), os.path.join(out, "vocab")
    self.tokenizer = os.path.join(out, "tokenizer", "vocab.txt")
    self.demo_stage1 = os.path.join(out, "train")

  def run(self, row: str) -> str:
    return os.path.join(self.runs, row)

  def detector(self) -> str:
    """The scenes detector's weights the demo's records were extracted with ("" for the fixed demo backbone)."""
    from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
    name = records.read_manifest(self.demo_records).get("backbone_config", {}).get("weights")
    return os.path.join(self.out, "scenes_detector", name) if name else ""


def check_demo(paths: Paths) -> None:
  """UsageError naming what a finished make demo would have written and is missing."""
  need = {"records": os.path.join(paths.demo_records, "manifest.json"),
          "vocabulary": os.path.join(paths.demo_vocab, "codebook.npy"), "tokenizer": paths.tokenizer,
          "world": os.path.join(paths.out, "tfds"), "stage 1": os.path.join(paths.demo_stage1, "checkpoints"),
          "scene recogniser": os.path.join(paths.out, "scene_recognizer")}
  missing = [f"{what} ({path})" for what, path in need.items() if not os.path.exists(path)]
  if missing:
    raise app.UsageError(f"--out={paths.out} is not a finished make demo: {', '.join(missing)} missing; run "
                         f"`python scripts/demo.py --out {paths.out}` first")


def build_data(paths: Paths) -> dict:
  """The records with questions, their vocabulary on the demo's codebook and the answer vocabulary (resumable:
  extraction keeps finished shards, the vocabulary and answers are rebuilt only when missing); returns what the
  table says of them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import answers, records, tokenizer, vocab  # pylint: disable=g-import-not-at-top
  from bigen_jax.features import backbones, extract  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
  demo = records.read_manifest(paths.demo_records)
  if (demo.get("source") or {}).get("name") != "scenes":
    raise app.UsageError(f"{paths.demo_records} holds {demo.get('source')!r} records: the study needs the "
                         "captioned-scenes world's (make demo)")
  backbone_config = demo.get("backbone_config", {})
  weights = paths.detector()
  backbone = backbones.build_backbone(demo["backbone"], weights=weights or None,
                                      **({"layer": backbone_config["layer"]} if weights else {}))
  if backbone.config() != backbone_config:
    raise app.UsageError(f"the backbone rebuilt from {paths.demo_records}/manifest.json ({backbone.config()}) is "
                         f"not the one its records were extracted with ({backbone_config}): is {weights} the "
                         "detector make demo trained?")
  tok = tokenizer.load_tokenizer(paths.tokenizer)
  world, data_dir = demo["source"]["config"], os.path.join(paths.out, "tfds")
  for split in SPLITS:
    entry = demo["splits"][split]
    extract.extract_split(
        tfds_builder.source(split, data_dir=data_dir, config=world), split=split, out_dir=paths.records,
        backbone=backbone, tokenizer=tok, num_examples=entry.get("requested_examples", entry["num_examples"]),
        shard_size=entry.get("shard_size", 500), batch_size=64, store_images=demo["store_images"],
        max_len=demo["max_len"], max_captions=demo["max_captions"], store_image_size=demo.get("store_image_size"),
        source_info=demo["source"], vocab_path=paths.tokenizer, progress=False, max_answers=1)
  vocab.import_vocab(paths.records, paths.vocab, os.path.join(paths.demo_vocab, "codebook.npy"))
  theirs = vocab.load_vocab(paths.demo_vocab, records_dir=paths.demo_records)
  ours = vocab.load_vocab(paths.vocab, records_dir=paths.records)
  same = {s: float(np.mean(ours.cluster_ids(s) == theirs.cluster_ids(s))) for s in SPLITS}
  answers_file = answers.default_path(paths.records)
  if not os.path.exists(answers_file):
    answers.build_answer_vocab(paths.records, split="train").save(answers_file)
  table = answers.load_answer_vocab(answers_file, records_dir=paths.records)
  manifest = records.read_manifest(paths.records)
  return {"cluster ids equal to the demo's (train/validation/test)": "/".join(f"{same[s]:.4f}" for s in SPLITS),
          "questions (train/validation/test)": "/".join(
              str(records.num_questions(paths.records, s, manifest=manifest)) for s in SPLITS),
          "answers, question types": f"{table.num_answers}, {len(table.types)}",
          "majority answer per type (train)": ", ".join(f"{t}: {a}" for t, a in table.majority.items())}


def kind(row: str) -> str:
  return row.split("_")[0]


def steps_of(row: str, paths: Paths, steps: int = 0) -> int:
  """Training steps of ``row``: ``steps`` when > 0, else ``STEPS`` of its kind (stage 1: make demo's run's)."""
  if steps:
    return steps
  if kind(row) == "stage1":
    from bigen_jax import run_config  # pylint: disable=g-import-not-at-top
    return int(run_config.load(paths.demo_stage1).total_steps)
  return STEPS.get(row, STEPS[kind(row)])


def with_study_eval(config, paths: Paths, steps: int):
  """``config`` with the demo's evaluation files (recogniser, scene decoder; no CLIP, no GAN), evaluation after
  training only, the guided decoder beside argmax mask-predict-4, ``steps`` steps."""
  from configs import demo as demo_configs  # pylint: disable=g-import-not-at-top
  demo_configs.with_paths(config, paths.out, paths.detector())
  config.eval.generation.generator_dir = ""
  config.eval.generation.variants = {"guidance": dict(demo_configs.GUIDED_SAMPLING)}
  config.eval.clip.path = ""
  config.eval.every = 0
  config.total_steps = steps
  config.checkpoint.every = min(config.checkpoint.every, steps)
  config.log_every = min(config.log_every, steps)
  return config


def row_config(row: str, paths: Paths, steps: int = 0):
  """The training config of ``row`` (``ROWS``), ``steps_of(row, paths, steps)`` steps."""
  from configs import demo as demo_configs  # pylint: disable=g-import-not-at-top
  from configs import xlxmert_pretrain, xlxmert_vqa  # pylint: disable=g-import-not-at-top
  steps = steps_of(row, paths, steps)
  if kind(row) == "stage1":
    config = with_study_eval(demo_configs.get_config("demo"), paths, steps)
    config.init_from = paths.run("pretrain_ccc") if row == "stage1_from_ccc" else ""
    return config
  if kind(row) == "pretrain":
    config = xlxmert_pretrain.get_config("demo,regression" if row == "pretrain_regression" else "demo")
    if paths.pretrain_lr:
      config.optimizer.lr = paths.pretrain_lr
  else:
    config = xlxmert_vqa.get_config("demo")
  config = with_study_eval(config, paths, steps)
  config.data.update(dict(records_dir=paths.records, vocab_dir=paths.vocab, answers_file=""))
  if row == "pretrain_regression":
    config.eval.generation.readout = "nearest_centroid"
  if kind(row) == "qa":
    config.init_from = paths.run("pretrain_ccc") if row == "qa_from_ccc" else ""
  if row == "qa_from_stage1":  # the unified model's encoder, grounded by I2T on the dense cells
    config.init_from = paths.demo_stage1
    for task in config.tasks.values():
      task.visual_input = "dense"
  return config


def trained(workdir: str, steps: int) -> bool:
  """Whether ``workdir`` holds a checkpoint of step ``steps``."""
  directory = os.path.join(workdir, "checkpoints", str(steps))
  return os.path.isdir(directory)


def fit_eval_batch(config) -> None:
  """The validation loss's batch lowered to the eval split's size (a multiple of the devices) where that is smaller
  than the training batch (the tiny world's 16 images); the demo world's 250 keep it."""
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
  n = records.read_manifest(config.data.records_dir)["splits"][config.data.eval_split]["num_examples"]
  devices = jax.device_count()
  if n < (config.eval.batch_size or config.batch_size):
    config.eval.batch_size = max(devices, n // devices * devices)


def run_row(row: str, paths: Paths, split: str, steps: int = 0) -> dict:
  """Trains ``row`` (and the pretraining it starts from, when missing; ``steps``: as ``steps_of``) and evaluates it
  on ``split``."""
  from bigen_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  config = row_config(row, paths, steps)
  pretraining = paths.run("pretrain_ccc")
  if config.init_from == pretraining and not trained(pretraining, steps_of("pretrain_ccc", paths, steps)):
    print(f"[xlxmert] {row} starts from pretrain_ccc: training it first", flush=True)
    train.train_and_evaluate(row_config("pretrain_ccc", paths, steps), config.init_from)
  workdir = paths.demo_stage1 if row == "stage1_scratch" else paths.run(row)
  if row != "stage1_scratch" and not trained(workdir, config.total_steps):
    train.train_and_evaluate(config, workdir)
  config.data.eval_split = split  # evaluation only: the run's saved config keeps its own
  fit_eval_batch(config)
  (results, step), = evaluate.evaluate_runs(config, [workdir], evaluators=list(ROWS[row][1]),
                                            outputs=[os.path.join(paths.run(row), split)])
  return {"row": row, "what": ROWS[row][0], "run": workdir, "step": step, **results}


def _cell(value) -> str:
  return f"{value:.3f}" if isinstance(value, float) else "-"


def write_tables(path: str, rows: list[dict], data: dict, split: str) -> None:
  """OUT/xlxmert/xlxmert_<split>.{md,json}: the data, QA per question type, T2I and stage 1."""
  from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_json_atomic(path + ".json", {"split": split, "data": data, "rows": rows})
  by_row = {r["row"]: r for r in rows}
  lines = [f"# X-LXMERT on the captioned-scenes world ({split} split)", "", "| data | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in data.items()]
  qa_rows = [r for r in QA_ROWS if r in by_row]
  if qa_rows:
    first = by_row[qa_rows[0]]
    types = sorted(k.split("/", 2)[2] for k in first if k.startswith("qa/num_questions/"))
    lines += ["", "VQA accuracy per question type (the QA head's argmax; majority: each type's most common training "
              "answer)", "", "| type | questions | majority baseline | " + " | ".join(qa_rows) + " |",
              "|---" * (len(qa_rows) + 3) + "|"]
    for name, suffix in [(t, f"/{t}") for t in types] + [("all", "")]:
      cells = [_cell(by_row[r].get(f"qa/accuracy{suffix}")) for r in qa_rows]
      lines.append(f"| {name} | {int(first.get(f'qa/num_questions{suffix}', 0))} | "
                   f"{_cell(first.get(f'qa/majority/accuracy{suffix}'))} | " + " | ".join(cells) + " |")
  for table, title in (("t2i", "T2I of the pretrained models (CCC: the classifier; regression: the nearest "
                                "centroid)"), ("stage1", "Stage 1 (configs/demo.py) from the CCC pretraining "
                                                         "and from scratch")):
    mine = [r for r in rows if (kind(r["row"]) == "pretrain") == (table == "t2i") and kind(r["row"]) != "qa"]
    if not mine:
      continue
    columns = COLUMNS[table]
    lines += ["", title, "", "| row | step | minutes | " + " | ".join(c for c, _ in columns) + " |",
              "|---" * (len(columns) + 3) + "|"]
    for r in mine:
      lines.append(f"| {r['row']} | {r['step']} | {r['minutes']:.1f} | "
                   + " | ".join(_cell(r.get(k)) for _, k in columns) + " |")
  qa_minutes = [r for r in rows if kind(r["row"]) == "qa"]
  if qa_minutes:
    lines += ["", "QA rows: " + ", ".join(f"{r['row']} step {r['step']}, {r['minutes']:.1f} min" for r in qa_minutes)]
  text = "\n".join(lines) + "\n"
  fileio.write_atomic(path + ".md", text)
  print(text, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
  paths = Paths(os.path.abspath(_OUT.value), _PRETRAIN_LR.value)
  rows = _ROWS.value or list(ROWS)
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise app.UsageError(f"--rows: unknown row(s) {unknown}; known: {list(ROWS)}")
  check_demo(paths)
  split, start = _SPLIT.value, time.time()
  print("[xlxmert] data: records with questions, the demo's codebook, the answer vocabulary", flush=True)
  data = build_data(paths)
  print(f"[xlxmert] data ready in {(time.time() - start) / 60:.1f} min", flush=True)
  table, done, timed, spent = os.path.join(paths.runs, f"xlxmert_{split}"), [], 0, 0.0
  for i, row in enumerate(rows):
    result_path = os.path.join(paths.run(row), f"results_{split}.json")
    if os.path.exists(result_path):
      done.append(fileio.read_json(result_path))
      continue
    eta = f", about {spent / timed * (len(rows) - i) / 60:.0f} min left" if timed else ""
    print(f"[xlxmert] row {i + 1}/{len(rows)} {row}: {ROWS[row][0]}{eta}", flush=True)
    t = time.time()
    record = run_row(row, paths, split, _STEPS.value)
    record["minutes"] = (time.time() - t) / 60
    timed, spent = timed + 1, spent + time.time() - t
    print(f"[xlxmert] {row} done in {record['minutes']:.1f} min", flush=True)
    fileio.write_json_atomic(result_path, record)
    done.append(record)
    write_tables(table, done, data, split)
  write_tables(table, done, data, split)
  print(f"[xlxmert] {len(done)} rows in {(time.time() - start) / 60:.1f} min: {table}.md", flush=True)


if __name__ == "__main__":
  app.run(main)
