"""Extraction driver: a source of images + captions -> TFRecord shards + ``manifest.json`` (``data.records``).

``extract_split`` is resumable: shards listed in the manifest that pass ``records.verify_shard`` are kept and
their examples skipped without running the backbone; missing, truncated or corrupt shards are rewritten.
A run whose backbone, feature size, tokenizer, ... differ from the manifest already in ``out_dir`` fails and
names the differing field instead of mixing two kinds of features in one directory.

Examples a source yields with an ``"error"`` instead of an ``"image"`` (``coco.source(on_bad_image="skip")``)
get no record: the split's manifest entry lists them under ``"skipped"`` (``{"shard", "image_id", "key",
"path", "reason"}``, ``shard`` = the shard whose source examples it was among), and resuming passes over them
again, so a bad image never has to be removed from the annotations.

``shards=(start, end)`` restricts a run to a range of the split's shards, so that several workers can extract
one split into the same ``out_dir``: the manifest's entry is merged under a file lock (``_Manifest.save_split``)
and marked complete when every shard is listed.
"""

import fcntl
import io
import itertools
import logging
import math
import os
import re
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from bigen_jax import fileio
from bigen_jax.data import records

# Top-level manifest fields that must agree between runs writing into the same directory.
CHECKED_FIELDS = ("version", "backbone", "feature_dim", "grid", "max_len", "image_size", "backbone_config",
                  "tokenizer", "max_captions", "store_images", "store_image_size", "source", "questions",
                  "max_answers")
# Fields of "source" that may differ between runs (where the files lie, not what they are).
SOURCE_PATH_FIELD = "paths"
# The file beside manifest.json that concurrent writers of one output directory lock (``_Manifest.save_split``).
LOCK_SUFFIX = ".lock"


def tokenizer_info(tokenizer, vocab_path: str | None = None) -> dict[str, Any]:
  """``{"vocab_file", "vocab_size", "sha256"}`` of the tokenizer's ``vocab.txt``."""
  vocab_path = vocab_path or getattr(tokenizer, "vocab_path", None)
  if not vocab_path:
    raise ValueError("cannot tell which vocab.txt the tokenizer uses: pass vocab_path")
  return {"vocab_file": os.path.basename(vocab_path), "vocab_size": int(tokenizer.vocab_size),
          "sha256": records.sha256_file(vocab_path)}


def manifest_header(*, backbone, tokenizer, max_len: int, max_captions: int | None, store_images: bool,
                    store_image_size: int | None = None, source_info: Mapping[str, Any] | None = None,
                    vocab_path: str | None = None, max_answers: int = 0) -> dict[str, Any]:
  """The manifest fields that describe how the features were made (everything but ``splits``); ``questions``
  and ``max_answers`` only with ``max_answers`` > 0 (a manifest without questions is unchanged)."""
  questions = {"questions": True, "max_answers": int(max_answers)} if max_answers else {}
  return {**questions,
      "version": records.SCHEMA_VERSION, "backbone": backbone.name, "feature_dim": int(backbone.feature_dim),
      "grid": records.GRID, "max_len": int(max_len), "image_size": int(backbone.image_size),
      "backbone_config": backbone.config(), "tokenizer": tokenizer_info(tokenizer, vocab_path),
      "max_captions": max_captions, "store_images": bool(store_images),
      "store_image_size": store_image_size if store_images else None, "source": dict(source_info or {}),
  }


def _diff(old: Any, new: Any, path: str) -> list[str]:
  """Dotted names of the fields where ``old`` and ``new`` differ, with both values."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    out = []
    for k in sorted(set(old) | set(new), key=str):
      if path == "source" and k == SOURCE_PATH_FIELD:
        continue
      out += _diff(old.get(k), new.get(k), f"{path}.{k}")
    return out
  return [] if old == new else [f"{path} (manifest: {old!r}, this run: {new!r})"]


def check_compatible(manifest: Mapping[str, Any], header: Mapping[str, Any], path: str) -> None:
  """Raises ``DataError`` naming every field where an existing manifest disagrees with this run."""
  diffs = []
  for field in CHECKED_FIELDS:
    diffs += _diff(manifest.get(field), header.get(field), field)
  if diffs:
    raise records.DataError(
        f"{path} was written with different settings; field(s) differ: {'; '.join(diffs)}. "
        "Write to another --out directory (or delete this one) instead of mixing features.")


def _png(image: np.ndarray, short_side: int | None) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(np.asarray(image))
  if short_side and min(im.size) != short_side:
    s = short_side / min(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, format="PNG", compress_level=3)
  return buf.getvalue()


def _shard_index(entry: Mapping[str, Any], split: str) -> int | None:
  m = re.fullmatch(re.escape(split) + r"-(\d{5})-of-(\d{5})\.tfrecord", entry["file"])
  return int(m.group(1)) if m else None


class _Manifest:
  """The manifest of ``out_dir``; each save re-reads the file under a lock and updates only this split's entry."""

  def __init__(self, out_dir: str, header: Mapping[str, Any]):
    self.out_dir = out_dir
    self.path = os.path.join(out_dir, records.MANIFEST_NAME)
    self.lock_path = self.path + LOCK_SUFFIX
    self.header = dict(header)
    if os.path.exists(self.path):
      check_compatible(records.read_manifest(out_dir), header, self.path)

  def split(self, split: str) -> dict[str, Any] | None:
    if not os.path.exists(self.path):
      return None
    return records.read_manifest(self.out_dir)["splits"].get(split)

  def save_split(self, split: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the split's entry and returns it. A complete ``entry`` (from a run over the whole split) replaces
    the one on disk; an incomplete one is merged with it (``_merge``), so that workers writing other shards of
    the split at the same time keep theirs. The read-merge-write runs under ``flock`` on ``lock_path``."""
    with open(self.lock_path, "a", encoding="utf-8") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      if os.path.exists(self.path):
        manifest = records.read_manifest(self.out_dir)
        check_compatible(manifest, self.header, self.path)
      else:
        manifest = {**self.header, "splits": {}}
      on_disk = manifest["splits"].get(split) or {}
      manifest["splits"][split] = dict(entry) if entry["complete"] else _merge(split, on_disk, entry)
      fileio.write_json_atomic(self.path, manifest)
    return manifest["splits"][split]


def _merge(split: str, on_disk: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
  """The incomplete ``entry`` with the shards (and their skipped examples) that only ``on_disk`` lists added,
  by shard index. Complete when shards 0 .. S-1 (S = the requested examples' shard count) are all listed and
  their records plus skipped examples make the requested examples; ``num_examples`` is then the records'."""
  shards = {_shard_index(s, split): s for s in on_disk.get("shards", [])}
  own = {_shard_index(s, split): s for s in entry["shards"]}
  shards.update(own)
  shards.pop(None, None)
  skipped = sorted([b for b in on_disk.get("skipped", []) if b["shard"] in shards and b["shard"] not in own]
                   + list(entry.get("skipped", [])), key=lambda b: b["shard"])
  merged = {k: v for k, v in entry.items() if k != "skipped"}
  merged["shards"] = [shards[i] for i in sorted(shards)]
  if skipped:
    merged["skipped"] = skipped
  num_records = sum(s["num_examples"] for s in merged["shards"])
  num_shards = math.ceil(entry["requested_examples"] / entry["shard_size"])
  if sorted(shards) == list(range(num_shards)) and num_records + len(skipped) == entry["requested_examples"]:
    merged.update(complete=True, num_examples=num_records)
  return merged


def _count(source: Iterable[Any], num_examples: int | None) -> int:
  try:
    n = len(source)  # type: ignore[arg-type]
  except TypeError:
    n = None
  if num_examples is None and n is None:
    raise ValueError("the source has no len(): pass num_examples (the shard file names need the total)")
  return min(x for x in (num_examples, n) if x is not None)


def extract_split(source_iter: Iterable[Mapping[str, Any]], *, split: str, out_dir: str, backbone, tokenizer,
                  num_examples: int | None = None, shard_size: int = 1000, batch_size: int = 32,
                  store_images: bool = False, max_len: int = 17, max_captions: int | None = 5,
                  store_image_size: int | None = None, source_info: Mapping[str, Any] | None = None,
                  vocab_path: str | None = None, progress: bool = True, max_answers: int = 0,
                  shards: tuple[int, int | None] | None = None) -> dict[str, Any]:
  """Extracts one split into ``out_dir``; returns the split's manifest entry.

  ``source_iter`` yields ``{"image_id", "key", "image" uint8 [H, W, 3], "captions"}`` (``worlds.scenes.tfds_builder``
  / ``data.coco`` sources); the first ``num_examples`` (default ``len(source_iter)``) are written, record
  ``index`` = position in the split, ``shard_size`` records a shard. Each record holds ``backbone`` features
  [64, D] (float16), the cell boxes, the first ``max_captions`` captions as ids [N, max_len] and, with
  ``store_images``, the image as PNG (short side resized to ``store_image_size`` if given).

  ``max_answers`` = A > 0: records also hold each example's ``"questions"`` (``[{"question", "answers",
  "type"}]``, none when absent; questions as ids [Q, max_len] with the captions' tokenizer, answers padded to A
  with ""; more than A answers is a ``DataError``), the manifest ``"questions": true, "max_answers": A`` and each
  shard entry its ``"num_questions"``. 0: no question fields (records byte-identical to those of earlier versions).

  ``shards=(start, end)``: write only the shards with index in [start, end) (``end`` None: to the split's end),
  for one of several workers on the split. The source examples of earlier shards are passed over unread, so that
  record indices and shard names are those of a run over the whole split; the returned entry is the one on disk,
  merged with the other workers' shards, and complete once all are listed. The source must yield every example
  (none with an ``"error"``: a skipped one would move every later shard's start) and as many as ``num_examples``.
  """
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
  n = _count(source_iter, num_examples)
  if n < 1:
    raise ValueError(f"split {split!r}: nothing to extract (num_examples={n})")
  os.makedirs(out_dir, exist_ok=True)
  header = manifest_header(backbone=backbone, tokenizer=tokenizer, max_len=max_len, max_captions=max_captions,
                           store_images=store_images, store_image_size=store_image_size,
                           source_info=source_info, vocab_path=vocab_path, max_answers=max_answers)
  manifest = _Manifest(out_dir, header)
  old = manifest.split(split)
  if old is not None:
    if old.get("shard_size") != shard_size:
      raise records.DataError(
          f"{manifest.path}: splits.{split}.shard_size is {old.get('shard_size')!r} but this run asks for "
          f"{shard_size!r}; write to another --out directory (or delete the split's shards and manifest entry)")
    if old.get("requested_examples") != n:
      raise records.DataError(
          f"{manifest.path}: splits.{split}.requested_examples is {old.get('requested_examples')!r} but this run "
          f"asks for {n!r}: the source (annotations, --num_examples) changed since the split was started, so "
          "its shards no longer line up with it. Bad images need not be removed from the annotations: keep "
          "them as they were and pass --on_bad_image=skip, which lists them under splits."
          f"{split}.skipped. Otherwise write to another --out directory (or delete the split's shards and "
          "manifest entry)")
  num_shards = math.ceil(n / shard_size)
  final_shards = math.ceil(old["num_examples"] / shard_size) if old and old.get("complete") else num_shards
  start, end = shards or (0, None)
  if start < 0 or (end is not None and end <= start):
    raise ValueError(f"shards must be a non-empty range (start, end) with 0 <= start, got {shards}")
  lo, hi = min(start, num_shards), num_shards if end is None else min(end, num_shards)
  whole = lo == 0 and hi == num_shards  # else one worker of several: it may not see the split's end
  if not whole and (old or {}).get("skipped"):
    raise records.DataError(f"{manifest.path}: splits.{split}.skipped lists bad images, which move the start of "
                            "every later shard in the source: extract the split without a shard range")

  done: dict[int, dict[str, Any]] = {}
  for entry in (old or {}).get("shards", []):
    i = _shard_index(entry, split)
    if i is None or not lo <= i < hi:  # another worker's shard: neither read nor required here
      continue
    try:
      records.verify_shard(out_dir, entry)
    except records.DataError as e:
      logging.warning("%s: rewriting it", e)
      continue
    done[i] = dict(entry)
  skipped: dict[int, list[dict[str, Any]]] = {}  # shard index -> bad examples among its source examples
  for bad in (old or {}).get("skipped", []):
    if bad["shard"] in done:
      skipped.setdefault(bad["shard"], []).append(bad)

  def save(complete: bool, total: int) -> dict[str, Any]:
    entry = {"num_examples": total, "requested_examples": n, "shard_size": shard_size, "complete": complete,
             "shards": [done[i] for i in sorted(done)]}
    if any(skipped.values()):
      entry["skipped"] = [bad for i in sorted(skipped) for bad in skipped[i]]
    return manifest.save_split(split, entry)

  expected = [min(shard_size, n - i * shard_size) for i in range(num_shards)]
  if old and old.get("complete") and all(i in done for i in range(lo, min(hi, final_shards))):
    logging.info("split %s: all %d shards in %s are complete", split, final_shards, out_dir)
    return old
  if lo == hi:
    logging.info("split %s has %d shards: none in the range %d:%s", split, num_shards, start, end or "")
    return save(False, n)
  save(False, n)

  todo = sum(expected[i] for i in range(lo, hi) if i not in done)
  records._tf()  # pylint: disable=protected-access  # import TensorFlow before the progress bar starts
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=todo, unit="img", desc=f"{split} ({backbone.name})", disable=not progress, smoothing=0.1)
  it = iter(source_iter)
  total = sum(expected[:lo])  # the records of the shards before the range, passed over unread
  if _pass_over(it, total) != total:
    raise records.DataError(f"split {split!r}: the source ended before shard {lo}, the start of this run's range")
  try:
    for i in range(lo, hi):
      if i in done:  # pass over its source examples without running the backbone
        want = done[i]["num_examples"] + len(skipped.get(i, []))
        passed = _pass_over(it, want)
        if passed != want:
          raise records.DataError(f"split {split!r}: the source ended {want - passed} examples before the end "
                                  f"of shard {done[i]['file']} in {manifest.path}: did the source change?")
        total += done[i]["num_examples"]
        continue
      name = records.shard_name(split, i, final_shards)
      counter = [0, 0]  # records, questions
      path = os.path.join(out_dir, name)
      skipped[i] = []
      entry = records.write_shard(path, _records(
          itertools.islice(_good_examples(it, i, skipped[i]), expected[i]), start=total, backbone=backbone,
          tokenizer=tokenizer, batch_size=batch_size, max_len=max_len, max_captions=max_captions,
          store_images=store_images, store_image_size=store_image_size, counter=counter, bar=bar,
          max_answers=max_answers))
      if max_answers:
        entry["num_questions"] = counter[1]
      total += counter[0]
      if not whole and (skipped[i] or counter[0] < expected[i]):
        os.remove(path)
        why = (f"bad image {skipped[i][0]['path'] or skipped[i][0]['key']}" if skipped[i]
               else f"the source ended after {total} of {n} examples")
        raise records.DataError(f"split {split!r}, shard {i}: {why}, which changes where the shards after it start: "
                                "a shard range needs every example of the split; extract it without one")
      if counter[0] < expected[i] and any(j > i for j in done):
        raise records.DataError(f"split {split!r}: the source ended after {total} examples, but {manifest.path} "
                                "lists later shards: did the source change since they were written?")
      if counter[0] == 0:
        os.remove(path)
        break
      done[i] = entry
      save(False, n)
      if counter[0] < expected[i]:
        break
  finally:
    bar.close()

  if not whole:
    entry = save(False, n)
    logging.info("split %s: shards %d:%d of %d written; %d of them listed in %s%s", split, lo, hi, num_shards,
                 len(entry["shards"]), manifest.path, ", the split is complete" if entry["complete"] else "")
    return entry
  bad = [b for i in sorted(skipped) for b in skipped[i]]
  num_skipped = len(bad)
  if bad:
    logging.warning("split %s: %d bad image(s) skipped (e.g. %s), listed under splits.%s.skipped in %s", split,
                    len(bad), ", ".join(b["path"] or b["key"] for b in bad[:3]), split, manifest.path)
  if total < n:  # fewer records than len()/num_examples said: name the shards by the true count
    if total + num_skipped < n:
      logging.warning("split %s: the source ended after %d of %d examples", split, total + num_skipped, n)
    count = math.ceil(total / shard_size)
    for i in sorted(done):
      new = records.shard_name(split, i, count)
      if done[i]["file"] != new:
        os.replace(os.path.join(out_dir, done[i]["file"]), os.path.join(out_dir, new))
        done[i] = {**done[i], "file": new}
  return save(True, total)


def _pass_over(it: Iterator[Any], n: int) -> int:
  """Advances ``it`` by up to ``n`` examples (``it.skip`` when it has one: no image decoding); returns how many."""
  if hasattr(it, "skip"):
    return it.skip(n)
  return sum(1 for _ in itertools.islice(it, n))


def _good_examples(examples: Iterator[Mapping[str, Any]], shard: int,
                   skipped: list[dict[str, Any]]) -> Iterator[Mapping[str, Any]]:
  """``examples`` without those that carry an ``"error"``, which are appended to ``skipped`` instead."""
  for ex in examples:
    if "error" not in ex:
      yield ex
      continue
    logging.warning("skipping %s: %s", ex.get("path", ex["key"]), ex["error"])
    skipped.append({"shard": shard, "image_id": int(ex["image_id"]), "key": str(ex["key"]),
                    "path": ex.get("path"), "reason": str(ex["error"])})


def _question_fields(ex: Mapping[str, Any], tokenizer, max_len: int, max_answers: int) -> dict[str, Any]:
  """``encode_example``'s question arguments of one source example (its ``"questions"``, none when absent)."""
  qs = list(ex.get("questions") or [])
  answers = []
  for q in qs:
    row = [str(a) for a in q["answers"]]
    if len(row) > max_answers:
      raise records.DataError(f"{ex['key']!r}: question {q['question']!r} has {len(row)} answers, more than "
                              f"max_answers={max_answers}")
    answers.append(row + [""] * (max_answers - len(row)))
  texts = [str(q["question"]) for q in qs]
  ids = tokenizer.encode(texts, max_len=max_len) if texts else np.zeros((0, max_len), np.int32)
  return {"question_ids": ids, "questions": texts, "question_types": [str(q["type"]) for q in qs],
          "answers": answers}


def _records(examples: Iterator[Mapping[str, Any]], *, start: int, backbone, tokenizer, batch_size: int,
             max_len: int, max_captions: int | None, store_images: bool, store_image_size: int | None,
             counter: list[int], bar, max_answers: int = 0) -> Iterator[bytes]:
  """Serialised records of ``examples`` (indices from ``start``), the backbone run ``batch_size`` at a time;
  ``counter``: [records, questions] written so far."""
  boxes = records.grid_boxes()
  while True:
    batch = list(itertools.islice(examples, batch_size))
    if not batch:
      return
    feats = backbone([ex["image"] for ex in batch])
    captions = [list(ex.get("captions") or [])[:max_captions] for ex in batch]
    flat = [c for caps in captions for c in caps]  # one tokenizer call per batch
    all_ids = tokenizer.encode(flat, max_len=max_len) if flat else np.zeros((0, max_len), np.int32)
    splits = np.cumsum([len(caps) for caps in captions])[:-1]
    for ex, dense, caps, ids in zip(batch, feats, captions, np.split(all_ids, splits)):
      questions = _question_fields(ex, tokenizer, max_len, max_answers) if max_answers else {}
      yield records.encode_example(
          index=start + counter[0], image_id=int(ex["image_id"]), key=str(ex["key"]), dense=dense,
          boxes=boxes, caption_ids=ids, captions=caps,
          image=_png(ex["image"], store_image_size) if store_images else b"", **questions)
      counter[0] += 1
      counter[1] += len(questions.get("questions", ()))
    bar.update(len(batch))
