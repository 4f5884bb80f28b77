r"""`make demo`: the whole pipeline built so far, end to end, on the captioned-scenes world (2 CPU cores).

Stages (each resumable: re-running skips finished work):
  1. world      render the captioned-scenes TFDS dataset (train/validation/test)
  2. tokenizer  train a WordPiece vocabulary on the training captions (offline)
  3. detector   train (once) the scenes detector: a convnet that says what each grid cell holds (objects,
                shapes, colours, sizes, centres, background), the world's stand-in for the papers' detector
  3b features   extract its 8x8 RoI-pooled grid features (`scenes_detector` backbone) into TFRecords (+ PNG)
  4. vocab      FAISS k-means visual vocabulary; every cell gets its cluster id
  5. pipeline   read a few training batches through the tf.data input pipeline
  6. pictures   contact sheet: images, their captions and their k-means token maps
  7. train      stage 1 (alternating I2T / T2I) of a small model: configs/demo.py, checkpoints, metrics
  8. captions   loss curves (PNG) and greedy captions of validation images (PNG grid)
  9b clip       train (once, cached, resumable) a small CLIP contrastively on the training pairs
                (bigen_jax.train_clip, configs/clip.py:demo): the world's stand-in for OpenAI's CLIP
  9c generator  train (once, cached, resumable) the SPADE image generator on (image, token grid) pairs
                (bigen_jax.train_generator, configs/generator.py:demo: 64 px, 200 steps)
  10. stage 2   stage 2 from stage 1's params (configs/demo.py:two_stage, bigen_jax.stages): SCST with the in-graph
                CIDEr-D reward, the Gumbel-softmax CLIP loss through the frozen GAN and the demo CLIP, cross-entropy
                steps between them
  10b recogniser  the scene recogniser that reads generated images back into scene graphs, trained once in a
                background process from the demo's start (nice 19: on the core the other stages leave idle)
  11. evaluate  stage 1's and stage 2's checkpoints at once (stage 1's in a second process: each evaluation keeps
                one core busy) with the same evaluators (bigen_jax.evaluate):
                captioning and generation evaluators on the validation split: COCO
                caption metrics, truth of captions, CLIP-S, images decoded by argmax mask-predict, MaskGIT
                sampling and classifier-free guidance, drawn by the scene decoder and by the SPADE generator
                (the patch preview as a baseline): FID, semantic accuracy, R-precision, CLIPScore and CLIP
                R-precision; a markdown table, a caption -> image PNG grid and the held-out images rebuilt from
                their true tokens (real | preview | scene decoder | GAN); stage 2's figures beside stage 1's
  12. bundle    stage 2's run exported as a bundle (OUT/bundle, bigen_jax.export) and used through the three-line
                API (bigen_jax.Pipeline): captions of validation images from their pixels, pictures of their
                captions (OUT/api_samples.png)

Writes OUT/summary.json and OUT/summary.md, prints the summary table, and writes the report page
OUT/report/index.html with its markdown copy OUT/report/report.md (``bigen_jax.report``: the figures beside the
paper's, loss curves, sample grids, timings).
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", "demo_out", "Output directory.")
_SCENES = flags.DEFINE_string("scenes_config", "demo", "Captioned-scenes size: tiny, demo or large.")
_K = flags.DEFINE_integer("k", 1024, "Visual vocabulary size (k-means clusters): scripts/feature_study.py.")
_BACKBONE = flags.DEFINE_enum("backbone", "scenes_detector", ["scenes_detector", "demo"],
                              "Grid features: the trained scenes detector, or the fixed hand-made `demo` cells.")
_LAYER = flags.DEFINE_enum("layer", "gated_logits", ["gated_logits", "logits", "fc6"], "scenes_detector: the layer "
                           "whose outputs are the grid features (scripts/feature_study.py compares them).")
_EXACT_MIN_COUNT = flags.DEFINE_integer("exact_min_count", 100, "Vocabulary: feature vectors repeated at least "
                                        "this often get a code each (gated_logits' empty cells); 0: off.")
_TEXT_VOCAB = flags.DEFINE_integer("text_vocab", 1000, "WordPiece vocabulary size to train (at most).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of k-means and the input pipeline.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 0, "Stage-1 steps (0: configs/demo.py's total_steps).")

SPLITS = ("train", "validation", "test")
# The evaluation numbers the summary shows (the full table is in demo_out/train/eval/results_<step>.md).
EVAL_KEYS = ("validation_loss/i2t/gap", "validation_loss/t2i/gap", "captioning/BLEU-4", "captioning/METEOR",
             "captioning/ROUGE-L", "captioning/CIDEr-D", "captioning/distinct_captions",
             "captioning/semantic/accuracy", "generation/cell_accuracy", "generation/fid_recognizer",
             "generation/reference/fid_recognizer", "generation/semantic/accuracy",
             "generation/reference/semantic/accuracy", "generation/preview_reference/semantic/accuracy",
             "generation/r_precision_easy", "generation/reference/r_precision_easy", "generation/r_precision_hard",
             "generation/reference/r_precision_hard", "generation/real/semantic/accuracy",
             "generation/real/r_precision_easy", "generation/real/r_precision_hard",
             "generation/sampling/semantic/accuracy",
             "generation/sampling/r_precision_easy", "generation/sampling/r_precision_hard",
             "generation/guidance/semantic/accuracy", "generation/guidance/r_precision_easy",
             "generation/guidance/r_precision_hard", "captioning/clip_s", "captioning/clip_s_reference",
             "generation/clip_score", "generation/real/clip_score", "generation/reference/clip_score",
             "generation/guidance/clip_score", "generation/clip_r_precision_easy",
             "generation/real/clip_r_precision_easy", "generation/guidance/clip_r_precision_easy",
             "generation/clip_r_precision_hard", "generation/real/clip_r_precision_hard",
             "generation/guidance/clip_r_precision_hard", "generation/preview_reference/fid_recognizer",
             "generation/gan_reference/semantic/accuracy", "generation/gan_reference/fid_recognizer",
             "generation/gan_reference/r_precision_hard", "generation/guidance/gan/semantic/accuracy",
             "generation/guidance/gan/r_precision_hard", "generation/guidance/gan/fid_recognizer",
             "generation/guidance/gan/clip_score")


class Timer:
  """Collects wall time and this process's CPU time per stage, and prints a progress line as each stage starts and
  ends: on 2 cores, cores busy below 2 is time another stage could use."""

  def __init__(self):
    self.times = {}
    self.cores = {}
    self._start = time.time()

  def stage(self, name):
    timer = self

    def cpu_seconds():  # this process's: the background recogniser's time would land on the stage that waits
      t = os.times()
      return t.user + t.system

    class _Stage:
      def __enter__(self):
        print(f"[demo] {name} ...", flush=True)
        self.t, self.cpu = time.time(), cpu_seconds()

      def __exit__(self, *exc):
        wall = time.time() - self.t
        timer.times[name] = round(wall, 1)
        timer.cores[name] = round((cpu_seconds() - self.cpu) / max(wall, 1e-9), 2)
        print(f"[demo] {name} done in {wall:.1f}s ({timer.cores[name]:.2f} cores busy)", flush=True)

    return _Stage()

  @property
  def total(self):
    return round(time.time() - self._start, 1)


def render_world(data_dir, config):
  from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
  b = tfds_builder.builder(data_dir, config=config)
  tfds_builder.prepare(b)
  return {s: b.info.splits[s].num_examples for s in SPLITS}


def train_tokenizer(data_dir, config, out_dir, vocab_size):
  """A WordPiece vocabulary of the training captions and questions (X-LXMERT's question answering reads the
  questions: trained on captions alone, "what", "how many", "colour" and "?" were all [UNK])."""
  from bigen_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
  path = os.path.join(out_dir, "vocab.txt")
  if not os.path.exists(path):
    texts = [text for ex in tfds_builder.source("train", data_dir=data_dir, config=config)
             for text in list(ex["captions"]) + [q["question"] for q in ex["questions"]]]
    path = tokenizer.train_wordpiece(texts, vocab_size=vocab_size, out_dir=out_dir)
  return tokenizer.load_tokenizer(path), path


def train_detector(out):
  """The scenes detector (trained once, cached and resumable in OUT/scenes_detector): (weights path, report)."""
  from bigen_jax.worlds.scenes import detector  # pylint: disable=g-import-not-at-top
  return detector.load_or_train(os.path.join(out, "scenes_detector"))


def extract_features(data_dir, config, records_dir, tok, vocab_path, sizes, weights):
  from bigen_jax.features import backbones, extract  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
  backbone = backbones.build_backbone(_BACKBONE.value, weights=weights,
                                      **({"layer": _LAYER.value} if weights else {}))
  for split in SPLITS:
    extract.extract_split(
        tfds_builder.source(split, data_dir=data_dir, config=config), split=split, out_dir=records_dir,
        backbone=backbone, tokenizer=tok, num_examples=sizes[split], shard_size=500, batch_size=64,
        store_images=True, source_info={"name": "scenes", "config": config}, vocab_path=vocab_path)
  return backbone.feature_dim


def read_pipeline(records_dir, vocab_dir, seed, steps=20, batch_size=32):
  from bigen_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  it = input_pipeline.create_iterator(records_dir=records_dir, split="train", global_batch_size=batch_size,
                                      seed=seed, vocab_dir=vocab_dir, train=True)
  batch = next(it)
  t = time.time()
  for _ in range(steps):
    next(it)
  rate = steps / (time.time() - t)
  return {k: f"{v.dtype}{list(v.shape)}" for k, v in batch.items()}, rate


def contact_sheet(records_dir, vocab_dir, tok, k, path, n=8):
  """Validation images | k-means token map, with two of their captions, as one PNG."""
  from bigen_jax import viz  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import images  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  it = input_pipeline.create_iterator(records_dir=records_dir, split="validation", global_batch_size=n,
                                      seed=0, vocab_dir=vocab_dir, train=False, with_images=True)
  batch = next(it)
  rows, texts = [], []
  for i in range(n):
    image = images.decode_image(batch["image"][i])
    rows.append([image, viz.token_map(batch["cluster_ids"][i], k, size=256)])
    caps = tok.decode(batch["caption_ids"][i][:2])
    texts.append(" | ".join(caps))
  half = (n + 1) // 2
  sheet = viz.side_by_side([viz.captioned_grid(rows[:half], texts[:half], tile=256),
                            viz.captioned_grid(rows[half:], texts[half:], tile=256)])
  return viz.save_png(sheet, path)


# Stage 1 against stage 2 (the same evaluators, validation split).
STAGE2_KEYS = ("captioning/CIDEr-D", "captioning/BLEU-4", "captioning/semantic/accuracy",
               "captioning/distinct_captions", "captioning/clip_s", "generation/clip_score",
               "generation/gan/clip_score",
               "generation/gan/semantic/accuracy", "generation/semantic/accuracy", "generation/fid_recognizer",
               "generation/guidance/semantic/accuracy", "generation/guidance/clip_score",
               "generation/guidance/r_precision_hard", "generation/guidance/gan/clip_score")


def demo_config(out, steps, detector="", variant="two_stage"):
  """configs/demo.py:<variant> pointed at the demo's files under ``out`` (``configs/demo.py:with_paths``: data,
  recogniser, CLIP, generator, and the scenes detector's heads, which draw generated tokens); ``steps``: stage 1's
  steps (0: the config's)."""
  from configs import demo as demo_configs  # pylint: disable=g-import-not-at-top
  config = demo_configs.with_paths(demo_configs.get_config(variant), out, detector)
  if steps:
    config.total_steps = steps
  return config


def start_recogniser(out):
  """``(process, log path)`` training the scene recogniser (``tools/train_scene_recognizer.py``) in the background
  at the lowest CPU priority (nice 19), or None when it is cached. Its training keeps one core busy (1.04 cores
  for 131 s alone) and only the evaluation reads it, so it runs on the cycles the stages before leave idle (2 cores:
  stage 2's compiles, the world's rendering and the trainers' host work use one) instead of after them."""
  from bigen_jax.worlds.scenes import recognizer  # pylint: disable=g-import-not-at-top
  directory = os.path.join(out, "scene_recognizer")
  if os.path.exists(recognizer.recognizer_path(directory)):
    return None
  log_path = os.path.join(out, "scene_recognizer.log")
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train_scene_recognizer.py")
  with open(log_path, "w") as log:
    process = subprocess.Popen(["nice", "-n", "19", sys.executable, tool, "--out", directory], stdout=log,
                               stderr=subprocess.STDOUT)
  return process, log_path


def wait_recogniser(started, out):
  """Waits for ``start_recogniser``'s process (if any), then loads the recogniser: (params, report)."""
  from bigen_jax.worlds.scenes import recognizer  # pylint: disable=g-import-not-at-top
  if started:
    process, log_path = started
    if process.wait():
      raise RuntimeError(f"training the scene recogniser failed (exit {process.returncode}): see {log_path}")
  return recognizer.load_or_train(os.path.join(out, "scene_recognizer"))


def train_stage1(out, steps, detector):
  """Trains stage 1 of configs/demo.py:two_stage on the demo data (resumes from demo_out/train); returns (state,
  config, logged rows)."""
  from bigen_jax import experiment, metrics, stages, train  # pylint: disable=g-import-not-at-top
  config = stages.stage1_config(demo_config(out, steps, detector))
  workdir = os.path.join(out, "train")
  state = train.train_and_evaluate(config, workdir)
  return state, experiment.resolve_config(config)[0], metrics.read_history(workdir)


def train_stage2(out, steps, detector):
  """Trains stage 2 of configs/demo.py:two_stage (SCST, CLIP loss, cross-entropy) from stage 1's run in
  demo_out/train into demo_out/stage2 (resumable); returns (stage-2 config, logged rows)."""
  from bigen_jax import metrics, stages, train  # pylint: disable=g-import-not-at-top
  config = stages.stage2_config(demo_config(out, steps, detector), os.path.join(out, "train"))
  workdir = os.path.join(out, "stage2")
  train.train_and_evaluate(config, workdir)
  return config, metrics.read_history(workdir)


EVALUATORS = ("validation_loss", "captioning", "generation")


def evaluate_stages(out, detector):
  """``[(results, step)]`` of stage 1's run (OUT/train) and stage 2's (OUT/stage2) under EVALUATORS, both with
  stage 1's config. Each evaluation keeps one core busy (decoding small batches, the recogniser's scoring in Python,
  METEOR in Java), so stage 1's runs in a second process (``python -m bigen_jax.evaluate``, its log in
  OUT/evaluate_stage1.log) while stage 2's runs here: the two take about as long as one."""
  from bigen_jax import evaluate, stages  # pylint: disable=g-import-not-at-top
  train = os.path.join(out, "train")
  log_path = os.path.join(out, "evaluate_stage1.log")
  command = [sys.executable, "-m", "bigen_jax.evaluate", f"--workdir={train}", f"--evaluators={','.join(EVALUATORS)}"]
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    second = evaluate.evaluate(stages.stage1_config(demo_config(out, _TRAIN_STEPS.value, detector)),
                               os.path.join(out, "stage2"), evaluators=list(EVALUATORS))
  except BaseException:
    process.kill()
    raise
  if process.wait():
    raise RuntimeError(f"evaluating stage 1 failed (exit {process.returncode}): see {log_path}")
  step = evaluate.checkpoint_steps(train)[-1]
  with open(os.path.join(train, "eval", f"results_{step}.json")) as f:
    return (json.load(f), step), second


def first_last(rows, key):
  """"first -> last" of ``key``'s logged values, each the mean of up to 5 logged rows (stage 2's rewards are
  noisy)."""
  values = [r[key] for r in rows if key in r]
  return f"{np.mean(values[:5]):.3f} -> {np.mean(values[-5:]):.3f}"


def caption_sheet(state, config, tok, path, n=12):
  """Greedy captions of ``n`` validation images as a PNG of cards: each image over its whole generated caption,
  its first reference caption and whether the claim checker finds the generated caption true of the image's
  scene graph. Returns (generated, reference, true or None off the scenes world) per image."""
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax import viz  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
  from bigen_jax.eval import sources  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import captions  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import grammar  # pylint: disable=g-import-not-at-top
  batch = next(input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split="validation", global_batch_size=n, seed=0, train=False,
      with_images=True))
  model = lxmert.build_model(config.model)
  decode = jax.jit(lambda params, feats, boxes: captions.greedy_captions(
      params, model=model, visual={"visual_feats": feats}, boxes=boxes, max_len=config.model.max_len,
      tokens=captions.Tokens.from_tokenizer(tok, banned=(tok.unk_id,)), layout=config.tasks.i2t.layout))
  ids = jax.device_get(decode(jax.device_get(state.params), batch["dense"].astype(np.float32), batch["boxes"]))
  generated = tok.decode(ids)
  references = [c[0].decode() for c in batch["captions"]]
  plugin = sources.plugin(records.read_manifest(config.data.records_dir).get("source", {}))
  graphs = plugin.scene_graphs("validation", batch["index"]) if plugin is not None else None
  truths = ([None] * n if graphs is None
            else [grammar.check_caption(c, g) for c, g in zip(generated, graphs)])
  verdicts = {True: ("claim check: TRUE", (0, 140, 0)), False: ("claim check: FALSE", (200, 0, 0)),
              None: ("claim check: n/a (no scene graph)", (120, 120, 120))}
  images = [images_lib.decode_image(batch["image"][i]) for i in range(n)]
  texts = [[(f"model: {g}", (0, 0, 0)), (f"reference: {r}", (70, 70, 160)), verdicts[t]]
           for g, r, t in zip(generated, references, truths)]
  viz.save_png(viz.caption_cards(images, texts, tile=192, columns=4), path)
  return list(zip(generated, references, truths))


def bundle_and_api(out, detector, n=4):
  """Exports stage 2's run as a bundle (OUT/bundle: ``bigen_jax.export``, with the scenes detector's weights) and
  uses it as a user would, through the three-line API (``bigen_jax.Pipeline``): captions of ``n`` validation
  images from their pixels, and pictures of their first reference captions (the run's guided decoder, the
  bundled GAN), as cards in OUT/api_samples.png. Returns (bundle path, [(API caption, reference, true)])."""
  from bigen_jax import Pipeline  # pylint: disable=g-import-not-at-top
  from bigen_jax import export, viz  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import grammar, tfds_builder  # pylint: disable=g-import-not-at-top
  bundle = export.export(os.path.join(out, "stage2"), os.path.join(out, "bundle"), backbone_weights=detector or None)
  pipeline = Pipeline.load(bundle)
  examples = [ex for _, ex in zip(range(n), tfds_builder.source("validation", data_dir=os.path.join(out, "tfds"),
                                                                 config=_SCENES.value))]
  references = [ex["captions"][0] for ex in examples]
  captions = pipeline.caption([ex["image"] for ex in examples])
  pictures = pipeline.generate(references, guidance=4.0)
  truths = [grammar.check_caption(c, ex["scene_graph"]) for c, ex in zip(captions, examples)]
  texts = [[("Pipeline.caption(image):", (70, 70, 160)), (c, (0, 140, 0) if t else (200, 0, 0))] for c, t in
           zip(captions, truths)] + [[("Pipeline.generate(caption):", (70, 70, 160)), (r, (0, 0, 0))]
                                     for r in references]
  images = [np.asarray(ex["image"]) for ex in examples] + [np.asarray(p) for p in pictures]
  viz.save_png(viz.caption_cards(images, texts, tile=192, columns=n), os.path.join(out, "api_samples.png"))
  return bundle, list(zip(captions, references, truths))


def write_summary(out, summary):
  from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_json_atomic(os.path.join(out, "summary.json"), summary)
  lines = ["| what | value |", "|---|---|"]
  for key, value in summary.items():
    lines.append(f"| {key} | {value} |")
  text = "\n".join(lines) + "\n"
  fileio.write_atomic(os.path.join(out, "summary.md"), text)
  print(text)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # library chatter; the demo prints its own progress
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  dirs = {name: os.path.join(out, name) for name in ("tfds", "tokenizer", "records", "vocab")}
  timer = Timer()
  summary = {}
  recogniser = start_recogniser(out)
  with timer.stage("1 world"):
    sizes = render_world(dirs["tfds"], _SCENES.value)
  summary["dataset sizes (train/validation/test)"] = "/".join(str(sizes[s]) for s in SPLITS)
  with timer.stage("2 tokenizer"):
    tok, vocab_path = train_tokenizer(dirs["tfds"], _SCENES.value, dirs["tokenizer"], _TEXT_VOCAB.value)
  summary["WordPiece vocabulary"] = tok.vocab_size
  detector = ""
  if _BACKBONE.value == "scenes_detector":
    with timer.stage("3 detector"):
      detector, report = train_detector(out)
    held = report["heldout"]
    summary["scenes detector (held-out cells): object, shape, colour, size, background accuracy"] = ", ".join(
        f"{held[k]:.3f}" for k in ("object", "shape_on_objects", "colour_on_objects", "size_on_objects",
                                   "background"))
  with timer.stage("3b features"):
    dim = extract_features(dirs["tfds"], _SCENES.value, dirs["records"], tok, vocab_path, sizes, detector)
  summary["grid features"] = f"8x8 x {dim} ({_BACKBONE.value} backbone{', ' + _LAYER.value if detector else ''})"
  with timer.stage("4 vocab"):
    from bigen_jax.data import vocab  # pylint: disable=g-import-not-at-top
    vocab.build_vocab(dirs["records"], dirs["vocab"], k=_K.value, iterations=20, sample_size=64 * sizes["train"],
                      seed=_SEED.value, exact_min_count=_EXACT_MIN_COUNT.value)
    with open(os.path.join(dirs["vocab"], "vocab.json")) as f:
      meta = json.load(f)
  for split in SPLITS:
    s = meta["splits"][split]
    summary[f"k-means {split}: relative quantisation error"] = f"{s['relative_error']:.4f}"
  summary["k-means clusters used (train)"] = f"{meta['splits']['train']['used_clusters']} / {_K.value}"
  with timer.stage("5 pipeline"):
    shapes, rate = read_pipeline(dirs["records"], dirs["vocab"], _SEED.value)
  summary["batch (32)"] = ", ".join(f"{k} {v}" for k, v in shapes.items())
  summary["input pipeline, batches/s"] = f"{rate:.1f}"
  with timer.stage("6 pictures"):
    sheet = contact_sheet(dirs["records"], dirs["vocab"], tok, _K.value, os.path.join(out, "contact_sheet.png"))
  summary["contact sheet"] = os.path.relpath(sheet)
  with timer.stage("7 train"):
    state, config, rows = train_stage1(out, _TRAIN_STEPS.value, detector)
  last = {k: v for r in rows for k, v in r.items()}
  first = {k: v for r in reversed(rows) for k, v in r.items()}
  for key in ("i2t/loss", "t2i/loss", "i2t/accuracy", "t2i/accuracy", "validation_loss/i2t/loss",
              "validation_loss/t2i/loss", "validation_loss/i2t/accuracy", "validation_loss/t2i/accuracy"):
    if key in last:
      summary[f"stage 1 {key} (first -> last)"] = f"{first[key]:.3f} -> {last[key]:.3f}"
  summary["stage 1 steps, steps/s"] = f"{int(state.step)}, {last.get('steps_per_sec', 0):.2f}"
  with timer.stage("8 captions"):
    from bigen_jax import viz  # pylint: disable=g-import-not-at-top
    curves = viz.loss_curves(rows, os.path.join(out, "loss_curves.png"))
    pairs = caption_sheet(state, config, tok, os.path.join(out, "captions.png"))
  summary["loss curves"] = os.path.relpath(curves)
  summary["greedy captions"] = os.path.relpath(os.path.join(out, "captions.png"))
  for i, (generated, reference, true) in enumerate(pairs[:4]):
    summary[f"caption {i}: model || reference (true of the scene)"] = f"{generated} || {reference} ({true})"
  with timer.stage("9b clip"):
    from bigen_jax import train_clip  # pylint: disable=g-import-not-at-top
    clip_dir = os.path.join(out, "clip")
    _, report = train_clip.load_or_train(clip_dir, records_dir=dirs["records"])
  summary["demo CLIP (held-out): R@1 among 100, above hard negatives, CLIP-S real / shuffled pairs"] = (
      f"{report['r_precision_easy']:.3f}, {report['r_precision_hard']:.3f}, "
      f"{report['clip_s_real']:.3f} / {report['clip_s_shuffled']:.3f}")
  with timer.stage("9c generator"):
    from bigen_jax import train_generator  # pylint: disable=g-import-not-at-top
    from configs import generator as generator_configs  # pylint: disable=g-import-not-at-top
    generator_dir = os.path.join(out, "generator")
    gan_config = generator_configs.get_config("demo")
    gan_config.data.update(dict(records_dir=dirs["records"], vocab_dir=dirs["vocab"]))
    train_generator.load_or_train(gan_config, generator_dir)
  summary["SPADE generator (64 px, %d steps)" % gan_config.total_steps] = os.path.relpath(generator_dir)
  with timer.stage("10 stage 2"):
    stage2, rows = train_stage2(out, _TRAIN_STEPS.value, detector)
  for key in ("scst/reward_greedy", "scst/reward_sample", "clip/cos", "t2i/loss"):
    summary[f"stage 2 {key} (first -> last, 5-row means)"] = first_last(rows, key)
  cycle = ", ".join(stage2.task_order)
  summary["stage 2 steps (cycle), lr"] = f"{stage2.total_steps} ({cycle}), {stage2.optimizer.lr:g}"
  with timer.stage("10b recogniser (waits for its background training)"):
    _, report = wait_recogniser(recogniser, out)
  held = report["heldout"]
  summary["scene recogniser (held-out scenes): captions judged true, objects found"] = (
      f"{held['caption_accuracy']:.3f}, recall {held['recall']:.3f} precision {held['precision']:.3f}")
  with timer.stage("11 evaluate"):
    (results, step), (results2, step2) = evaluate_stages(out, detector)
  for key in EVAL_KEYS:
    if key in results:
      summary[f"eval {key}"] = f"{results[key]:.3f}"
  for key in STAGE2_KEYS:
    summary[f"stage 1 -> stage 2 {key}"] = f"{results[key]:.3f} -> {results2[key]:.3f}"
  summary["evaluation table"] = os.path.relpath(os.path.join(out, "train", "eval", f"results_{step}.md"))
  summary["caption -> image grid"] = os.path.relpath(os.path.join(out, "train", "eval", f"generation_{step}.png"))
  summary["held-out images rebuilt from their tokens (real | preview | scene decoder | GAN)"] = os.path.relpath(
      os.path.join(out, "train", "eval", f"reconstructions_{step}.png"))
  summary["stage-2 evaluation table, caption -> image grid"] = ", ".join(os.path.relpath(os.path.join(
      out, "stage2", "eval", f"{name}_{step2}.{ext}")) for name, ext in (("results", "md"), ("generation", "png")))
  with timer.stage("12 bundle"):
    bundle, api = bundle_and_api(out, detector)
  summary["export bundle, the API's captions and pictures"] = (
      f"{os.path.relpath(bundle)}, {os.path.relpath(os.path.join(out, 'api_samples.png'))}: "
      f"{sum(t for _, _, t in api)}/{len(api)} captions true")
  for name, secs in timer.times.items():
    summary[f"time: {name}"] = f"{secs}s ({timer.cores[name]:.2f} cores busy)"
  summary["time: total"] = f"{timer.total}s"
  write_summary(out, summary)
  from bigen_jax import report  # pylint: disable=g-import-not-at-top
  print(f"[demo] report: {os.path.relpath(report.write_report(out))}", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
