r"""Extracts 8x8 grid features once (PyTorch) into TFRecord shards + manifest.json.

  python tools/extract_features.py --source scenes --data_dir ~/scenes --split train,val,test \
      --backbone demo --vocab vocab/vocab.txt --out data/scenes_demo
  python tools/extract_features.py --source coco --annotations dataset_coco.json --images_dir coco/ \
      --karpathy dataset_coco.json --split train,val,test --backbone frcnn --weights frcnn.pth \
      --vocab bert-base-uncased-vocab.txt --out data/coco_frcnn --store_images --store_image_size 256
  python tools/extract_features.py --source coco ... \
      --vqa_questions v2_OpenEnded_mscoco_train2014_questions.json,v2_OpenEnded_mscoco_val2014_questions.json \
      --vqa_annotations v2_mscoco_train2014_annotations.json,v2_mscoco_val2014_annotations.json \
      --gqa_questions train_balanced_questions.json --vg_image_data image_data.json

Question answering: the scenes source always writes the world's questions (one answer each); the coco source
writes VQA v2's (10 answers each) and/or GQA's (1 answer; GQA's images are Visual Genome's, matched to COCO
ids through ``--vg_image_data``) when given, answers normalised as the VQA evaluation does
(``bigen_jax.data.qa_sources``). Records then hold the questions and the manifest ``max_answers``.

Re-running resumes: finished shards are kept, missing or damaged ones rewritten. Images are decoded by
``bigen_jax.data.images`` (16-bit scaled, transparency composited on white, EXIF orientation applied).
``--check_only`` opens every image of the requested splits without a model, prints each missing or unreadable
one and exits with status 2 if there were any (0 otherwise); ``--on_bad_image=skip`` extracts the rest and
lists the bad ones in manifest.json (``splits.<split>.skipped``).

Several workers (hosts) can extract one split into the same ``--out``: ``--shards=START:END`` writes only the
shards with index in [START, END) of each split, e.g. ``--shards=0:57`` and ``--shards=57:`` on two workers;
manifest.json lists the split complete once every shard is there. It needs ``--on_bad_image=fail``.
"""

import functools
import itertools
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top

_SOURCE = flags.DEFINE_enum("source", "scenes", ["scenes", "coco"], "Which image/caption source.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "scenes: directory of the captioned-scenes TFDS data.")
_SCENES_CONFIG = flags.DEFINE_string("scenes_config", "demo", "scenes: world configuration.")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "coco: caption annotations JSON.")
_IMAGES_DIR = flags.DEFINE_string("images_dir", None, "coco: image folder.")
_KARPATHY = flags.DEFINE_string("karpathy", None, "coco: Karpathy split file (dataset_coco.json).")
_SPLIT = flags.DEFINE_list("split", ["train"], "Comma-separated splits to extract.")
_BACKBONE = flags.DEFINE_string("backbone", "demo", "Backbone: demo, scenes_detector, resnet or frcnn.")
_WEIGHTS = flags.DEFINE_string("weights", None, "resnet/frcnn: torch state dict (.pth), none = random init; "
                                "scenes_detector: the file bigen_jax.worlds.scenes.detector.load_or_train wrote.")
_DETECTOR_LAYER = flags.DEFINE_enum("detector_layer", "fc6", ["fc6", "logits"], "scenes_detector: which layer.")
_SHORT_SIDE = flags.DEFINE_integer("short_side", None,
                                   "Resize short side (frcnn 800, resnet 448; demo: square size, 128).")
_MAX_SIDE = flags.DEFINE_integer("max_side", 1333, "resnet/frcnn: cap on the resized long side (the short side is "
                                 "smaller for long thin images); demo/scenes_detector resize to a fixed square.",
                                 lower_bound=1)
_LAYER = flags.DEFINE_enum("frcnn_layer", "fc7", ["fc6", "fc7"], "frcnn: which box-head layer to output.")
_OUT = flags.DEFINE_string("out", None, "Output directory (shards + manifest.json); needed unless --check_only.")
_VOCAB = flags.DEFINE_string("vocab", None, "Tokenizer vocab.txt (BERT WordPiece); needed unless --check_only.")
_ON_BAD_IMAGE = flags.DEFINE_enum("on_bad_image", "fail", ["fail", "skip"],
                                  "coco: a missing or unreadable image stops the run (fail) or is listed in "
                                  "manifest.json under splits.<split>.skipped and left out (skip).")
_CHECK_ONLY = flags.DEFINE_bool("check_only", False, "coco: open every image of --split without a model, list "
                                "the missing or unreadable ones and exit (status 2 if any); writes nothing.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Records per shard.")
_SHARDS = flags.DEFINE_string("shards", "", "START:END: write only the shards with index in [START, END) of each "
                              "split (START: from 0, END: to the split's end when left out), for one of several "
                              "workers on the same --out; empty: all. Needs --on_bad_image=fail.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per backbone call (default: demo 64, else 4).")
_STORE_IMAGES = flags.DEFINE_bool("store_images", False, "Also store each image as PNG (for the GAN).")
_STORE_IMAGE_SIZE = flags.DEFINE_integer("store_image_size", None, "Resize stored images to this short side.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Extract at most this many examples per split.")
_MAX_CAPTIONS = flags.DEFINE_integer("max_captions", 5, "Captions kept per image.")
_MAX_LEN = flags.DEFINE_integer("max_len", 17, "Caption length in tokens.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default); --check_only: "
                                "files checked in parallel (0: the CPU count).")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device (cpu, cuda, cuda:1, ...).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of randomly initialised backbones (testing only).")
_VQA_QUESTIONS = flags.DEFINE_list("vqa_questions", [], "coco: VQA v2 question JSON file(s); their questions are "
                                   "stored with each image (--vqa_annotations: answers).")
_VQA_ANNOTATIONS = flags.DEFINE_list("vqa_annotations", [], "coco: VQA v2 annotation JSON file(s), one per "
                                     "--vqa_questions file in the same order; none for test-dev/test questions.")
_GQA_QUESTIONS = flags.DEFINE_list("gqa_questions", [], "coco: GQA question JSON file(s) (needs --vg_image_data).")
_VG_IMAGE_DATA = flags.DEFINE_string("vg_image_data", None, "coco with --gqa_questions: Visual Genome's "
                                     "image_data.json (image_id -> coco_id).")


def check_question_flags() -> None:
  """UsageError for question flags that do not go together (before any model is built)."""
  if _SOURCE.value == "scenes" and (_VQA_QUESTIONS.value or _GQA_QUESTIONS.value):
    raise app.UsageError("--vqa_questions/--gqa_questions are for --source coco: the scenes source writes the "
                         "world's own questions")
  if _VQA_ANNOTATIONS.value and len(_VQA_ANNOTATIONS.value) != len(_VQA_QUESTIONS.value):
    raise app.UsageError(f"--vqa_annotations names {len(_VQA_ANNOTATIONS.value)} file(s) but --vqa_questions "
                         f"{len(_VQA_QUESTIONS.value)}: give one annotation file per question file, or none")
  if _GQA_QUESTIONS.value and not _VG_IMAGE_DATA.value:
    raise app.UsageError("--gqa_questions needs --vg_image_data (GQA's images are Visual Genome's: their COCO ids "
                         "come from Visual Genome's image_data.json)")


def shard_range() -> tuple[int, int | None] | None:
  """``--shards`` as (start, end) shard indices, end None = to the split's end; None without the flag."""
  if not _SHARDS.value:
    return None
  match = re.fullmatch(r"(\d*):(\d*)", _SHARDS.value)
  if not match:
    raise app.UsageError(f"--shards={_SHARDS.value}: expected START:END, a half-open range of shard indices such as "
                         "0:4, 4: or :4")
  start, end = int(match[1] or 0), int(match[2]) if match[2] else None
  if end is not None and end <= start:
    raise app.UsageError(f"--shards={_SHARDS.value}: the range START:END is empty (END must exceed START)")
  if _ON_BAD_IMAGE.value != "fail":
    raise app.UsageError(f"--shards needs --on_bad_image=fail, not {_ON_BAD_IMAGE.value}: a skipped image moves "
                         "the start of every later shard in the source, which a worker starting mid-split cannot "
                         "know")
  return start, end


@functools.cache
def coco_questions():
  """COCO image id -> questions of --vqa_questions/--gqa_questions (None without them), and max_answers; read
  once for all splits."""
  from bigen_jax.data import qa_sources  # pylint: disable=g-import-not-at-top
  check_question_flags()
  parts = [qa_sources.read_vqa(q, a) for q, a in itertools.zip_longest(_VQA_QUESTIONS.value, _VQA_ANNOTATIONS.value)]
  if _GQA_QUESTIONS.value:
    parts.append(qa_sources.by_coco_id(qa_sources.read_gqa(_GQA_QUESTIONS.value),
                                       qa_sources.coco_ids(_VG_IMAGE_DATA.value)))
  max_answers = (qa_sources.VQA_ANSWERS if _VQA_QUESTIONS.value else
                 qa_sources.GQA_ANSWERS if _GQA_QUESTIONS.value else 0)
  return (qa_sources.merge(*parts) if parts else None), max_answers


def make_source(split: str):
  """A fresh source iterator for ``split``, its manifest description and its answers per question (0: no
  questions)."""
  if _SOURCE.value == "scenes":
    from bigen_jax.worlds.scenes import tfds_builder  # pylint: disable=g-import-not-at-top
    return (tfds_builder.source(split, data_dir=_DATA_DIR.value, config=_SCENES_CONFIG.value),
            {"name": "scenes", "config": _SCENES_CONFIG.value, "paths": {"data_dir": _DATA_DIR.value}}, 1)
  if not _ANNOTATIONS.value or not _IMAGES_DIR.value:
    raise app.UsageError("--source coco needs --annotations and --images_dir")
  from bigen_jax.data import coco  # pylint: disable=g-import-not-at-top
  questions, max_answers = coco_questions()
  info = {"name": "coco", "karpathy": bool(_KARPATHY.value),
          "paths": {"annotations": _ANNOTATIONS.value, "images_dir": _IMAGES_DIR.value, "karpathy": _KARPATHY.value}}
  if questions is not None:
    info["questions"] = [name for name, files in (("vqa", _VQA_QUESTIONS.value), ("gqa", _GQA_QUESTIONS.value))
                         if files]
    info["paths"].update({"vqa_questions": _VQA_QUESTIONS.value, "vqa_annotations": _VQA_ANNOTATIONS.value,
                          "gqa_questions": _GQA_QUESTIONS.value, "vg_image_data": _VG_IMAGE_DATA.value})
  return (coco.source(split, annotations_file=_ANNOTATIONS.value, images_dir=_IMAGES_DIR.value,
                      karpathy_file=_KARPATHY.value, on_bad_image=_ON_BAD_IMAGE.value, questions=questions),
          info, max_answers)


def count_examples(split: str, src) -> int:
  try:
    return len(src)
  except TypeError:
    if _NUM_EXAMPLES.value:
      return _NUM_EXAMPLES.value
  logging.warning("the %s source has no len(): counting split %s in a first pass", _SOURCE.value, split)
  return sum(1 for _ in make_source(split)[0])


def check_images() -> int:
  """``--check_only``: prints every missing or unreadable image of the requested splits; 2 if any, else 0."""
  if _SOURCE.value != "coco":
    raise app.UsageError("--check_only checks image files: only --source coco reads them")
  bad: dict[str, str] = {}
  total = 0
  for split in _SPLIT.value:
    src = make_source(split)[0]
    total += len(src)
    for b in src.bad_images(workers=_THREADS.value or os.cpu_count() or 1):
      bad.setdefault(b["path"], b["reason"])
  for reason in bad.values():
    print(reason)
  print(f"{len(bad)} of {total} images in split(s) {','.join(_SPLIT.value)} are missing or unreadable"
        + (": fix them, or extract with --on_bad_image=skip to leave them out" if bad else ""))
  return 2 if bad else 0


def main(argv):
  del argv
  if _CHECK_ONLY.value:
    return check_images()
  if not _OUT.value or not _VOCAB.value:
    raise app.UsageError("--out and --vocab are required (unless --check_only)")
  check_question_flags()
  shards = shard_range()
  import torch  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from bigen_jax.features import backbones, extract  # pylint: disable=g-import-not-at-top
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  backbone = backbones.build_backbone(
      _BACKBONE.value, weights=_WEIGHTS.value, short_side=_SHORT_SIDE.value, device=_DEVICE.value,
      seed=_SEED.value, **({"layer": _LAYER.value} if _BACKBONE.value == "frcnn" else {}),
      **({"max_side": _MAX_SIDE.value} if _BACKBONE.value in ("resnet", "frcnn") else {}),
      **({"layer": _DETECTOR_LAYER.value} if _BACKBONE.value == "scenes_detector" else {}))
  tok = tokenizer_lib.load_tokenizer(_VOCAB.value)
  batch_size = _BATCH_SIZE.value or (64 if _BACKBONE.value == "demo" else 4)
  for split in _SPLIT.value:
    src, info, max_answers = make_source(split)
    n = count_examples(split, src)
    if _NUM_EXAMPLES.value:
      n = min(n, _NUM_EXAMPLES.value)
    entry = extract.extract_split(
        src, split=split, out_dir=_OUT.value, backbone=backbone, tokenizer=tok, num_examples=n,
        shard_size=_SHARD_SIZE.value, batch_size=batch_size, store_images=_STORE_IMAGES.value,
        max_len=_MAX_LEN.value, max_captions=_MAX_CAPTIONS.value, store_image_size=_STORE_IMAGE_SIZE.value,
        source_info=info, vocab_path=_VOCAB.value, max_answers=max_answers, shards=shards)
    logging.info("split %s: %d examples in %d shards under %s", split, entry["num_examples"],
                 len(entry["shards"]), _OUT.value)


if __name__ == "__main__":
  cli.run(main)
