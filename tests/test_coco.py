"""COCO reader on a tiny COCO-format fixture: Karpathy splits, captions, RGB images, errors, extraction."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from bigen_jax.data import coco
from bigen_jax.data import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# image id -> (Karpathy split, folder, mode)
IMAGES = {9: ("train", "train2014", "RGB"), 3: ("restval", "val2014", "L"), 25: ("val", "val2014", "RGB"),
          7: ("test", "val2014", "CMYK"), 12: ("train", "train2014", "RGB")}


def _caption(image_id, k):
  return f"  a photo number {image_id} with caption {k} "


@pytest.fixture
def fixture(tmp_path):
  rng = np.random.default_rng(0)
  images, annotations, karpathy = [], [], []
  ann_id = 0
  for image_id, (split, folder, mode) in IMAGES.items():
    name = f"COCO_{folder}_{image_id:012d}.jpg"
    os.makedirs(tmp_path / "images" / folder, exist_ok=True)
    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(tmp_path / "images" / folder / name, format="JPEG")
    images.append({"id": image_id, "file_name": name, "height": 40, "width": 48})
    for k in range(5 if image_id != 12 else 6):
      annotations.append({"image_id": image_id, "id": 1000 - ann_id, "caption": _caption(image_id, k)})
      ann_id += 1
    karpathy.append({"filepath": folder, "filename": name, "cocoid": image_id, "split": split,
                     "sentences": [{"raw": "unused"}]})
  ann_file, karpathy_file = tmp_path / "captions.json", tmp_path / "dataset_coco.json"
  ann_file.write_text(json.dumps({"images": images, "annotations": annotations}))
  karpathy_file.write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
  return {"annotations_file": str(ann_file), "images_dir": str(tmp_path / "images"),
          "karpathy_file": str(karpathy_file)}


def test_karpathy_splits(fixture):
  assert [len(coco.source(s, **fixture)) for s in ("train", "validation", "val", "test")] == [3, 1, 1, 1]
  train = list(coco.source("train", **fixture))
  assert [ex["image_id"] for ex in train] == [3, 9, 12]  # train + restval, sorted by id
  for ex in train:
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (40, 48, 3)  # grayscale -> RGB
    assert ex["key"].startswith("COCO_") and ex["key"].endswith(f"{ex['image_id']:012d}.jpg")
  ann = json.load(open(fixture["annotations_file"]))["annotations"]
  want = [a["caption"].strip() for a in sorted(ann, key=lambda a: a["id"]) if a["image_id"] == 12]
  assert train[2]["captions"] == want and len(want) == 6  # all captions, annotation-id order, stripped
  assert next(iter(coco.source("test", **fixture)))["image"].shape == (40, 48, 3)  # CMYK -> RGB


def test_without_karpathy_all_images_are_one_split(fixture, tmp_path):
  flat = tmp_path / "flat"
  os.makedirs(flat)
  for folder in ("train2014", "val2014"):
    for name in os.listdir(os.path.join(fixture["images_dir"], folder)):
      os.rename(os.path.join(fixture["images_dir"], folder, name), flat / name)
  src = coco.source("anything", annotations_file=fixture["annotations_file"], images_dir=str(flat))
  assert [ex["image_id"] for ex in src] == sorted(IMAGES)
  assert len(coco.source("train", **{**fixture, "images_dir": str(flat)}, limit=2)) == 2  # flat layout found


def test_errors_name_the_file_and_field(fixture, tmp_path):
  missing = os.path.join(fixture["images_dir"], "val2014", "COCO_val2014_000000000025.jpg")
  os.remove(missing)
  with pytest.raises(records.DataError, match="000000000025.jpg does not exist"):
    list(coco.source("validation", **fixture))
  corrupt = os.path.join(fixture["images_dir"], "val2014", "COCO_val2014_000000000007.jpg")
  with open(corrupt, "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(records.DataError, match="000000000007.jpg cannot be read"):
    list(coco.source("test", **fixture))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
  with pytest.raises(records.DataError, match=r"bad.json: images\[0\] lacks the field 'file_name'"):
    coco.source("train", annotations_file=str(bad), images_dir=fixture["images_dir"])
  bad.write_text("{")
  with pytest.raises(records.DataError, match="bad.json is not valid JSON"):
    coco.source("train", annotations_file=str(bad), images_dir=fixture["images_dir"])
  with pytest.raises(records.DataError, match="split 'dev'"):
    coco.source("dev", **fixture)
  ann = json.load(open(fixture["annotations_file"]))
  ann["images"] = [im for im in ann["images"] if im["id"] != 9]
  partial = tmp_path / "partial.json"
  partial.write_text(json.dumps(ann))
  with pytest.raises(records.DataError, match=r"not in .*partial.json \(e.g. ids \[9\]\)"):
    coco.source("train", **{**fixture, "annotations_file": str(partial)})


def test_tfds_source_reads_a_prepared_builder(monkeypatch):
  class FakeBuilder:
    data_dir = "/nowhere"

    def __init__(self, prepared):
      self.prepared = prepared

    def is_prepared(self):
      return self.prepared

    def as_dataset(self, split, shuffle_files):
      assert split == "val" and not shuffle_files
      return [{"image": np.zeros((4, 5, 3), np.uint8), "image/id": 77,
               "captions": {"text": np.array([b" a cat ", b"a dog"])}}]

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: FakeBuilder(True))
  monkeypatch.setattr(tfds, "as_numpy", lambda ds: ds)
  (ex,) = list(coco.tfds_source("val"))
  assert ex["image_id"] == 77 and ex["captions"] == ["a cat", "a dog"] and ex["image"].shape == (4, 5, 3)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: FakeBuilder(False))
  with pytest.raises(records.DataError, match="not prepared"):
    list(coco.tfds_source("val"))


def test_extract_features_cli_on_coco(fixture, tmp_path):
  from bigen_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  texts = [c for ex in coco.source("train", **fixture) for c in ex["captions"]]
  vocab_path = tokenizer.train_wordpiece(texts, vocab_size=80, out_dir=str(tmp_path / "tok"))
  out = str(tmp_path / "records")
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--source", "coco",
                  "--annotations", fixture["annotations_file"], "--images_dir", fixture["images_dir"],
                  "--karpathy", fixture["karpathy_file"], "--split", "train,test", "--backbone", "demo",
                  "--vocab", vocab_path, "--out", out, "--shard_size", "2"], check=True, capture_output=True)
  manifest = records.read_manifest(out)
  assert manifest["source"]["name"] == "coco"
  assert manifest["splits"]["train"]["num_examples"] == 3 and manifest["splits"]["test"]["num_examples"] == 1
  got = [b for b in records.read_split(out, "train", fields=("image_id", "captions"))]
  assert got[0]["image_id"].tolist() == [3, 9, 12]
  assert got[0]["captions"][2][0].decode() == _caption(12, 5).strip()  # annotation ids run backwards


def test_orphan_captions_are_counted_in_a_warning(fixture, tmp_path, caplog):
  ann = json.load(open(fixture["annotations_file"]))
  ann["annotations"] += [{"image_id": 99, "id": 1, "caption": "lost"}, {"image_id": 99, "id": 2, "caption": "x"},
                         {"image_id": 98, "id": 3, "caption": "y"}]
  path = tmp_path / "orphans.json"
  path.write_text(json.dumps(ann))
  with caplog.at_level("WARNING"):
    src = coco.source("anything", annotations_file=str(path), images_dir=fixture["images_dir"])
  assert "orphans.json: 3 of 29 caption annotations name 2 image id(s) that are not in its images list " \
         "(e.g. ids [98, 99])" in caplog.text
  assert all("lost" not in e["captions"] for e in src.entries)


def _tokenizer(fixture, tmp_path):
  from bigen_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  texts = [c for e in coco.source("train", **fixture).entries for c in e["captions"]]
  return tokenizer.load_tokenizer(tokenizer.train_wordpiece(texts, vocab_size=80, out_dir=str(tmp_path / "tok")))


def test_bad_image_fails_then_skip_resumes_without_editing_annotations(fixture, tmp_path):
  from bigen_jax.features import backbones, extract  # pylint: disable=g-import-not-at-top
  tok = _tokenizer(fixture, tmp_path)
  bad = os.path.join(fixture["images_dir"], "train2014", "COCO_train2014_000000000009.jpg")  # 2nd of 3 by id
  with open(bad, "wb") as f:
    f.write(b"")
  out = str(tmp_path / "records")

  def run(on_bad_image, **files):
    src = coco.source("train", **{**fixture, **files}, on_bad_image=on_bad_image)
    return extract.extract_split(src, split="train", out_dir=out, backbone=backbones.build_backbone("demo"),
                                 tokenizer=tok, shard_size=1, batch_size=1, progress=False)

  with pytest.raises(records.DataError, match=r"000000000009.jpg cannot be read.*--on_bad_image=skip"):
    run("fail")
  partial = records.read_manifest(out)["splits"]["train"]
  assert not partial["complete"] and len(partial["shards"]) == 1
  entry = run("skip")  # same annotations: the written shard is kept, the bad image recorded and passed over
  assert entry["complete"] and entry["num_examples"] == 2 and entry["requested_examples"] == 3
  assert {**entry["shards"][0], "file": None} == {**partial["shards"][0], "file": None}  # renamed -of-00002 only
  assert [s["file"] for s in entry["shards"]] == [records.shard_name("train", i, 2) for i in range(2)]
  (skipped,) = entry["skipped"]
  assert skipped["path"] == bad and skipped["image_id"] == 9 and "cannot be read" in skipped["reason"]
  got = next(iter(records.read_split(out, "train", fields=("index", "image_id"))))
  assert got["index"].tolist() == [0, 1] and got["image_id"].tolist() == [3, 12]
  # A damaged shard after the bad image is rewritten byte-identically; the skip list stays as it was.
  shard = os.path.join(out, entry["shards"][1]["file"])
  data = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(data[:-5])
  assert run("skip") == entry and open(shard, "rb").read() == data
  # Removing the image from the split instead gets an error that says how to go on.
  karpathy = json.load(open(fixture["karpathy_file"]))
  karpathy["images"] = [im for im in karpathy["images"] if im["cocoid"] != 9]
  edited = tmp_path / "edited.json"
  edited.write_text(json.dumps(karpathy))
  with pytest.raises(records.DataError, match=r"requested_examples is 3 but this run asks for 2.*annotations.*"
                                              r"pass --on_bad_image=skip.*another --out directory"):
    run("skip", karpathy_file=str(edited))


def _check_only(fixture, *extra):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--source", "coco",
                         "--annotations", fixture["annotations_file"], "--images_dir", fixture["images_dir"],
                         "--karpathy", fixture["karpathy_file"], "--check_only", *extra],
                        capture_output=True, text=True, check=False)


def test_check_only_lists_every_bad_image_and_writes_nothing(fixture, tmp_path):
  ok = _check_only(fixture, "--split", "train,validation,test")
  assert ok.returncode == 0, ok.stderr
  assert "0 of 5 images" in ok.stdout
  truncated = os.path.join(fixture["images_dir"], "train2014", "COCO_train2014_000000000012.jpg")
  data = open(truncated, "rb").read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  missing = os.path.join(fixture["images_dir"], "val2014", "COCO_val2014_000000000025.jpg")
  os.remove(missing)
  out = tmp_path / "records"
  bad = _check_only(fixture, "--split", "train,validation,test", "--out", str(out))
  assert bad.returncode == 2, bad.stderr
  lines = bad.stdout.strip().splitlines()
  assert lines[0].startswith(f"image {truncated} cannot be read: image file is truncated")
  assert lines[1] == f"image {missing} does not exist"
  assert lines[2].startswith("2 of 5 images in split(s) train,validation,test are missing or unreadable")
  assert not out.exists()


def test_extract_features_cli_with_vqa_and_gqa_questions(fixture, tmp_path):
  from bigen_jax.data import answers  # pylint: disable=g-import-not-at-top
  from bigen_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  vqa_q = {"questions": [{"image_id": 9, "question": "Is it red?", "question_id": 90},
                         {"image_id": 3, "question": "How many?", "question_id": 30}]}
  vqa_a = {"annotations": [
      {"question_id": 90, "image_id": 9, "answer_type": "yes/no", "question_type": "is it",
       "answers": [{"answer": "Yes", "answer_id": k} for k in range(10)]},
      {"question_id": 30, "image_id": 3, "answer_type": "number", "question_type": "how many",
       "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(["two"] * 6 + ["3"] * 4)]}]}
  gqa = {"5": {"imageId": "2354786", "question": "Is the cup white?", "answer": "no",
               "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}}}
  image_data = [{"image_id": 2354786, "coco_id": 9}, {"image_id": 1, "coco_id": None}]
  files = {}
  for name, obj in (("vqa_q", vqa_q), ("vqa_a", vqa_a), ("gqa", gqa), ("image_data", image_data)):
    files[name] = str(tmp_path / f"{name}.json")
    with open(files[name], "w") as f:
      json.dump(obj, f)
  texts = [c for ex in coco.source("train", **fixture) for c in ex["captions"]] + ["is it red how many"]
  vocab_path = tokenizer.train_wordpiece(texts, vocab_size=80, out_dir=str(tmp_path / "tok"))
  out = str(tmp_path / "records")
  args = [sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--source", "coco",
          "--annotations", fixture["annotations_file"], "--images_dir", fixture["images_dir"],
          "--karpathy", fixture["karpathy_file"], "--split", "train", "--backbone", "demo", "--vocab", vocab_path,
          "--out", out, "--vqa_questions", files["vqa_q"], "--vqa_annotations", files["vqa_a"]]
  bad = subprocess.run(args + ["--gqa_questions", files["gqa"]], capture_output=True, text=True)
  assert bad.returncode != 0 and "--gqa_questions needs --vg_image_data" in bad.stderr
  subprocess.run(args + ["--gqa_questions", files["gqa"], "--vg_image_data", files["image_data"]], check=True,
                 capture_output=True)
  manifest = records.read_manifest(out)
  assert manifest["questions"] and manifest["max_answers"] == 10 and manifest["source"]["questions"] == ["vqa", "gqa"]
  assert manifest["splits"]["train"]["shards"][0]["num_questions"] == 3
  rows = records.read_questions(out, "train")  # images 3, 9, 12
  assert rows[0] == {"types": ["number"], "answers": [["2"] * 6 + ["3"] * 4]}
  assert rows[1] == {"types": ["yes/no", "verify"], "answers": [["yes"] * 10, ["no"] + [""] * 9]}
  assert rows[2] == {"types": [], "answers": []}
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_answers.py"), "--records", out,
                  "--min_count", "1"], check=True, capture_output=True)
  vocab = answers.load_answer_vocab(answers.default_path(out), records_dir=out)
  assert sorted(vocab.answers) == ["2", "no", "yes"] and vocab.types == ("number", "verify", "yes/no")
  assert vocab.majority == {"number": "2", "verify": "no", "yes/no": "yes"}
