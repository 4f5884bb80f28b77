"""COCO captions as a source of ``{"image_id", "key", "image", "captions"}`` examples (docs/data_interfaces.md).

Two readers:
  ``source``       COCO-format caption JSON (``captions_train2014.json``: ``images`` + ``annotations``) and an
                   image folder, optionally split by Karpathy's ``dataset_coco.json`` (train = train +
                   restval, validation = val, test = test: 113,287 / 5,000 / 5,000 images).
  ``tfds_source``  the TFDS ``coco_captions`` dataset, for users who have prepared it.
Images are read lazily by ``images.decode_image`` (COCO has grayscale and CMYK files); a missing or
unreadable image raises ``DataError`` naming the file, or with ``on_bad_image="skip"`` is yielded as an
example with an ``"error"`` (its reason) instead of an ``"image"``, for the extractor to record and skip.
Captions whose image id is not in the annotations' images list are dropped with a warning giving their count.
"""

import json
import logging
import os
from typing import Any, Iterator, Mapping

import numpy as np

from bigen_jax.data import images
from bigen_jax.data.records import DataError

KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "val": ("val",), "test": ("test",)}


def load_json(path: str, what: str) -> Any:
  """The JSON file ``path`` (``what`` names it in errors: a missing file or bad JSON is a ``DataError``)."""
  if not path or not os.path.isfile(path):
    raise DataError(f"{what} {path!r} does not exist")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{what} {path} is not valid JSON: {e}") from e


def json_field(obj: Any, key: str, path: str, where: str) -> Any:
  """``obj[key]``, or a ``DataError`` naming the file ``path`` and the place ``where`` that lacks it."""
  if not isinstance(obj, dict) or key not in obj:
    raise DataError(f"{path}: {where} lacks the field {key!r}")
  return obj[key]


ON_BAD_IMAGE = ("fail", "skip")
BAD_IMAGE_HINT = ("pass --on_bad_image=skip to record bad images in the manifest and go on, or --check_only "
                  "to list every bad image first")


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB (``images.decode_image``); DataError naming the file when it is missing or unreadable."""
  return images.decode_image(path)


class CocoIterator:
  """Iterates a ``CocoSource``; ``skip(n)`` passes over examples without decoding their images (resuming)."""

  def __init__(self, source: "CocoSource"):
    self.source = source
    self.pos = 0

  def __iter__(self) -> "CocoIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    if self.pos >= len(self.source.entries):
      raise StopIteration
    entry = self.source.entries[self.pos]
    self.pos += 1
    ex = {"image_id": entry["image_id"], "key": entry["key"], "captions": list(entry["captions"]),
          "path": entry["path"]}
    if "questions" in entry:
      ex["questions"] = list(entry["questions"])
    try:
      ex["image"] = load_image(entry["path"])
    except DataError as e:
      if self.source.on_bad_image == "fail":
        raise DataError(f"{e} ({BAD_IMAGE_HINT})") from e
      ex["error"] = str(e)
    return ex

  def skip(self, n: int) -> int:
    """Passes over up to ``n`` examples; returns how many there were."""
    skipped = min(n, len(self.source.entries) - self.pos)
    self.pos += skipped
    return skipped


class CocoSource:
  """The examples of one split, sorted by image id; ``len()`` is known before any image is read.

  ``on_bad_image``: "fail" raises ``DataError`` at a missing or unreadable image; "skip" yields it as
  ``{"image_id", "key", "captions", "path", "error"}`` (no ``"image"``).
  """

  def __init__(self, entries: list[dict[str, Any]], on_bad_image: str = "fail"):
    if on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    self.entries = entries
    self.on_bad_image = on_bad_image

  def __len__(self) -> int:
    return len(self.entries)

  def __iter__(self) -> CocoIterator:
    return CocoIterator(self)

  def bad_images(self, *, workers: int = 1) -> list[dict[str, Any]]:
    """``{"image_id", "key", "path", "reason"}`` of every missing or unreadable image, without a model."""
    bad = dict(images.find_bad_images([e["path"] for e in self.entries], workers=workers))
    return [{"image_id": e["image_id"], "key": e["key"], "path": e["path"], "reason": bad[e["path"]]}
            for e in self.entries if e["path"] in bad]


def _annotations(annotations_file: str) -> tuple[dict[int, str], dict[int, list[str]]]:
  """(image id -> file name, image id -> captions in annotation-id order) of a COCO caption file."""
  data = load_json(annotations_file, "COCO caption annotations")
  images = json_field(data, "images", annotations_file, "the file")
  annotations = json_field(data, "annotations", annotations_file, "the file")
  files = {}
  for i, im in enumerate(images):
    files[int(json_field(im, "id", annotations_file, f"images[{i}]"))] = json_field(
        im, "file_name", annotations_file, f"images[{i}]")
  captions: dict[int, list[tuple[int, str]]] = {}
  orphans: dict[int, int] = {}
  for i, ann in enumerate(annotations):
    image_id = int(json_field(ann, "image_id", annotations_file, f"annotations[{i}]"))
    text = str(json_field(ann, "caption", annotations_file, f"annotations[{i}]")).strip()
    if image_id not in files:
      orphans[image_id] = orphans.get(image_id, 0) + 1
      continue
    captions.setdefault(image_id, []).append((int(ann.get("id", i)), text))
  if orphans:
    logging.warning("%s: %d of %d caption annotations name %d image id(s) that are not in its images list "
                    "(e.g. ids %s); they are dropped", annotations_file, sum(orphans.values()), len(annotations),
                    len(orphans), sorted(orphans)[:5])
  return files, {k: [t for _, t in sorted(v)] for k, v in captions.items()}


def _karpathy_images(karpathy_file: str, split: str) -> list[dict[str, Any]]:
  if split not in KARPATHY_SPLITS:
    raise DataError(f"split {split!r}: the Karpathy split file {karpathy_file} has "
                    f"{sorted(KARPATHY_SPLITS)}")
  data = load_json(karpathy_file, "Karpathy split file")
  images = json_field(data, "images", karpathy_file, "the file")
  wanted = KARPATHY_SPLITS[split]
  out = []
  for i, im in enumerate(images):
    if json_field(im, "split", karpathy_file, f"images[{i}]") in wanted:
      json_field(im, "cocoid", karpathy_file, f"images[{i}]")
      json_field(im, "filename", karpathy_file, f"images[{i}]")
      out.append(im)
  return out


def source(split: str, *, annotations_file: str, images_dir: str, karpathy_file: str | None = None,
           limit: int | None = None, on_bad_image: str = "fail",
           questions: Mapping[int, list[dict[str, Any]]] | None = None) -> CocoSource:
  """The examples of ``split``. With ``karpathy_file``, ``split`` is train / validation (or val) / test of
  Karpathy's split and the image is ``images_dir/filepath/filename`` (or ``images_dir/filename``); without
  it every image of ``annotations_file`` forms the split, whatever its name. Captions come from
  ``annotations_file``; ``limit`` keeps the first images by id; ``on_bad_image`` as in ``CocoSource``.
  ``questions``: COCO image id -> its questions (``qa_sources``); every example then has ``"questions"``
  (empty for an image without any)."""
  files, captions = _annotations(annotations_file)
  if karpathy_file:
    chosen = _karpathy_images(karpathy_file, split)
    unknown = [int(im["cocoid"]) for im in chosen if int(im["cocoid"]) not in files]
    if unknown:
      raise DataError(f"{len(unknown)} images of split {split!r} in {karpathy_file} are not in "
                      f"{annotations_file} (e.g. ids {unknown[:5]}): pass the annotations of both train2014 "
                      "and val2014 (merged), as Karpathy's split mixes them")
    entries = []
    for im in chosen:
      nested = os.path.join(images_dir, im.get("filepath", ""), im["filename"])
      flat = os.path.join(images_dir, im["filename"])
      # A file in neither place is named where its folder says it should be (errors, --check_only).
      path = nested if os.path.exists(nested) or (not os.path.exists(flat)
                                                  and os.path.isdir(os.path.dirname(nested))) else flat
      entries.append({"image_id": int(im["cocoid"]), "key": im["filename"], "path": path})
  else:
    entries = [{"image_id": i, "key": name, "path": os.path.join(images_dir, name)} for i, name in files.items()]
  entries.sort(key=lambda e: e["image_id"])
  for e in entries:
    e["captions"] = captions.get(e["image_id"], [])
    if questions is not None:
      e["questions"] = list(questions.get(e["image_id"], []))
  if questions is not None:
    logging.info("split %s: %d of %d images have questions (%d questions)", split,
                 sum(bool(e["questions"]) for e in entries), len(entries), sum(len(e["questions"]) for e in entries))
  return CocoSource(entries[:limit] if limit else entries, on_bad_image)


def tfds_source(split: str, *, data_dir: str | None = None, name: str = "coco_captions",
                limit: int | None = None) -> Iterator[dict[str, Any]]:
  """Examples of a prepared TFDS ``coco_captions`` split (its image, ``image/id`` and ``captions/text``).

  The dataset must already be prepared under ``data_dir``: this never downloads.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name} is not prepared under {builder.data_dir}: prepare it with "
                    "tfds (manual_dir with the COCO files) first")
  ds = builder.as_dataset(split=split, shuffle_files=False)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if limit and i >= limit:
      return
    image_id = int(ex["image/id"])
    texts = ex["captions"]["text"]
    yield {"image_id": image_id, "key": f"{name}/{split}/{image_id}", "image": np.asarray(ex["image"]),
           "captions": [t.decode("utf-8").strip() for t in texts]}
