"""Grid-feature backbones (demo, resnet, frcnn) and the resumable extraction driver."""

import io
import json
import math
import os
import fcntl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position

from bigen_jax.data import records  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.features import backbones  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.features import extract  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, h=64, w=64, seed=0):
  return list(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def frcnn():
  with pytest.warns(UserWarning, match="randomly initialised"):
    return backbones.build_backbone("frcnn", short_side=128)


@pytest.fixture(scope="module")
def resnet():
  with pytest.warns(UserWarning, match="randomly initialised"):
    return backbones.build_backbone("resnet", short_side=256)


# ----------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name,dim", [("demo", 64), ("resnet", 2048), ("frcnn", 1024)])
def test_backbone_shapes(name, dim, frcnn, resnet):
  bb = {"demo": backbones.build_backbone("demo"), "resnet": resnet, "frcnn": frcnn}[name]
  images = _images(2) + _images(1, 48, 80, seed=1)  # sizes may differ within a batch
  out = bb(images)
  assert bb.feature_dim == dim
  assert out.shape == (3, 64, dim) and out.dtype == np.float32
  assert np.isfinite(out).all() and out.std() > 0
  # Grouping by size: an image's features never depend on the other images of its batch.
  np.testing.assert_allclose(bb(images[2:]), out[2:], rtol=1e-4, atol=1e-4)


def test_demo_backbone_is_fixed_and_local():
  bb = backbones.build_backbone("demo")
  im = np.full((128, 128, 3), 200, np.uint8)
  im2 = im.copy()
  im2[16:32, 16:32] = (220, 30, 30)  # paint cell (1, 1) red
  a, b = bb([im, im2])
  changed = np.abs(a - b).max(-1) > 1e-6
  assert changed.nonzero()[0].tolist() == [9]
  np.testing.assert_array_equal(bb([im2])[0], b)
  assert np.abs(a).max() < 10 and np.abs(b).max() < 50  # roughly standardised


def _frcnn_manual(bb, image, short_side, cells):
  """Independent path: torchvision pieces + ``roi_align`` on the FPN level of the paper's LevelMapper."""
  m = bb.model
  x = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
  x = (x - torch.tensor(backbones.IMAGENET_MEAN)[:, None, None]) / torch.tensor(backbones.IMAGENET_STD)[:, None, None]
  h, w = x.shape[1:]
  scale = min(short_side / min(h, w), 1333 / max(h, w))
  x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False)
  hh, ww = x.shape[-2:]
  x = F.pad(x, (0, math.ceil(ww / 32) * 32 - ww, 0, math.ceil(hh / 32) * 32 - hh))
  with torch.inference_mode():
    feats = m.backbone(x)
    out, levels = [], []
    for k in cells:
      box = torch.from_numpy(records.grid_boxes()[k]) * torch.tensor([ww, hh, ww, hh], dtype=torch.float32)
      area = (box[2] - box[0]) * (box[3] - box[1])
      level = int(min(5, max(2, math.floor(4 + math.log2(math.sqrt(area) / 224) + 1e-6))))
      pooled = torchvision.ops.roi_align(feats[str(level - 2)], [box[None]], output_size=7,
                                         spatial_scale=2.0 ** -level, sampling_ratio=2, aligned=False)
      head = m.roi_heads.box_head
      out.append(F.relu(head.fc7(F.relu(head.fc6(pooled.flatten(1)))))[0].numpy())
      levels.append(level)
  return np.stack(out), levels


def test_frcnn_matches_roi_align_on_fpn_level(frcnn):
  cells = [0, 27, 63]
  im = _images(1, 64, 96, seed=3)[0]  # -> 128 x 192: 16 x 24 cells pool from P2
  want, levels = _frcnn_manual(frcnn, im, 128, cells)
  assert levels == [2, 2, 2]
  np.testing.assert_allclose(frcnn([im])[0, cells], want, rtol=1e-4, atol=1e-4)

  with pytest.warns(UserWarning):
    big = backbones.build_backbone("frcnn", short_side=800)  # same seed: same weights
  im = _images(1, 60, 80, seed=4)[0]  # -> 800 x 1066: 100 x 133 cells pool from P3
  want, levels = _frcnn_manual(big, im, 800, cells)
  assert levels == [3, 3, 3]
  np.testing.assert_allclose(big([im])[0, cells], want, rtol=1e-4, atol=1e-4)


def test_frcnn_fc6_layer():
  with pytest.warns(UserWarning):
    bb = backbones.build_backbone("frcnn", short_side=64, layer="fc6")
  assert bb([_images(1)[0]]).shape == (1, 64, 1024) and bb.config()["layer"] == "fc6"
  with pytest.raises(ValueError, match="fc6"):
    backbones.build_backbone("frcnn", layer="fc8")


def test_resnet_grid_is_avg_pool_of_layer4(resnet):
  im = _images(1, 64, 96, seed=5)[0]
  x = torch.from_numpy(im.copy()).permute(2, 0, 1).float()[None] / 255
  x = F.interpolate(x, size=(256, 384), mode="bilinear", align_corners=False, antialias=True)
  x = (x - torch.tensor(backbones.IMAGENET_MEAN)[:, None, None]) / torch.tensor(backbones.IMAGENET_STD)[:, None, None]
  trunk = torch.nn.Sequential(*list(resnet.model.children())[:-2])  # torchvision's own layer order
  with torch.inference_mode():
    c5 = trunk(x)[0].numpy()  # [2048, 8, 12]
  hh, ww = c5.shape[1:]
  want = np.stack([c5[:, (i * hh) // 8:-((-(i + 1) * hh) // 8), (j * ww) // 8:-((-(j + 1) * ww) // 8)].mean((1, 2))
                   for i in range(8) for j in range(8)])
  np.testing.assert_allclose(resnet([im])[0], want, rtol=1e-4, atol=1e-5)


def test_resnet_caps_the_long_side(resnet):
  assert tuple(resnet.preprocess(_images(1, 4, 400)[0]).shape) == (3, 13, 1333)  # not 256 x 25600
  assert resnet.config()["max_side"] == 1333
  assert tuple(resnet.preprocess(_images(1, 400, 4)[0]).shape) == (3, 1333, 13)
  assert tuple(resnet.preprocess(_images(1, 64, 96)[0]).shape) == (3, 256, 384)  # short side when it fits
  resnet.max_side = 300
  try:
    assert tuple(resnet.preprocess(_images(1, 64, 96)[0]).shape) == (3, 200, 300)
    assert resnet([_images(1, 4, 400)[0]]).shape == (1, 64, 2048)
  finally:
    resnet.max_side = 1333


def test_unknown_backbone():
  with pytest.raises(ValueError, match=r"unknown backbone 'vgg'.*demo.*frcnn.*resnet"):
    backbones.build_backbone("vgg")


def test_weights_with_wrong_keys(tmp_path):
  path = str(tmp_path / "bad.pth")
  torch.save({"model": {"foo.weight": torch.zeros(3), "conv1.weight": torch.zeros(1)}}, path)
  with pytest.raises(backbones.WeightsError) as e:
    backbones.build_backbone("resnet", weights=path)
  msg = str(e.value)
  assert path in msg and "foo.weight" in msg and "missing" in msg and "layer1.0.conv1.weight" in msg
  assert "conv1.weight (1,) vs (64, 3, 7, 7)" in msg
  with pytest.raises(backbones.WeightsError, match="does not exist"):
    backbones.build_backbone("frcnn", weights=str(tmp_path / "nope.pth"))


def test_weights_load_with_module_prefix(tmp_path, resnet):
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(1)
    src = torchvision.models.resnet50(weights=None)
  path = str(tmp_path / "r50.pth")
  torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
  loaded = backbones.build_backbone("resnet", weights=path, short_side=256)
  assert loaded.config()["weights"] == "r50.pth" and loaded.config()["weights_sha256"]
  with pytest.warns(UserWarning):
    seed1 = backbones.build_backbone("resnet", short_side=256, seed=1)
  im = _images(1, seed=6)
  out = loaded(im)
  np.testing.assert_allclose(out, seed1(im), rtol=1e-5, atol=1e-6)
  assert np.abs(out - resnet(im)).max() > 1e-3  # the seed-0 model differs


# ----------------------------------------------------------------------------------------------- extraction

WORDS = ["a", "red", "blue", "green", "circle", "square", "small", "big", "left", "of", "the", "triangle"]


def _source(n=7, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    caps = [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(rng.integers(1, 4))]
    out.append({"image_id": 100 + i, "key": f"mem/{i:03d}", "captions": caps,
                "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)})
  return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  from bigen_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  texts = [c for ex in _source(50, seed=9) for c in ex["captions"]]
  path = tokenizer.train_wordpiece(texts, vocab_size=60, out_dir=str(tmp_path_factory.mktemp("vocab")))
  return tokenizer.load_tokenizer(path)


class _Counting:
  """A backbone proxy counting the images it runs on."""

  def __init__(self, bb):
    self.bb, self.images = bb, 0
    self.name, self.feature_dim, self.image_size, self.config = bb.name, bb.feature_dim, bb.image_size, bb.config

  def __call__(self, images):
    self.images += len(images)
    return self.bb(images)


def _extract(out_dir, tok, source=None, backbone=None, **kw):
  kw = {"split": "train", "out_dir": str(out_dir), "tokenizer": tok, "shard_size": 3, "batch_size": 2,
        "store_images": True, "progress": False, **kw}
  return extract.extract_split(_source() if source is None else source,
                               backbone=backbone or backbones.build_backbone("demo"), **kw)


def _mtimes(d):
  return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d) if f.endswith(".tfrecord")}


def test_extract_end_to_end(tmp_path, tok):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  src = _source()
  src[2]["captions"] = []  # e.g. an unlabelled test image
  src[3]["captions"] = [f"a red circle number {i}" for i in range(8)]  # kept: the first max_captions=5
  entry = _extract(tmp_path, tok, source=src)
  manifest = records.read_manifest(str(tmp_path))
  assert manifest["splits"]["train"] == entry
  assert manifest["backbone"] == "demo" and manifest["feature_dim"] == 64 and manifest["max_len"] == 17
  assert manifest["tokenizer"] == {"vocab_file": "vocab.txt", "vocab_size": tok.vocab_size,
                                   "sha256": records.sha256_file(tok.vocab_path)}
  assert entry["num_examples"] == 7 and entry["complete"]
  assert [s["file"] for s in entry["shards"]] == [records.shard_name("train", i, 3) for i in range(3)]
  assert [s["num_examples"] for s in entry["shards"]] == [3, 3, 1]
  feats = backbones.build_backbone("demo")([ex["image"] for ex in src])
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  got = [records.decode_example(r.numpy(), 64, 17)
         for s in entry["shards"] for r in tf.data.TFRecordDataset(str(tmp_path / s["file"]))]
  assert [g["index"] for g in got] == list(range(7))
  for g, ex, f in zip(got, src, feats):
    assert g["image_id"] == ex["image_id"] and g["key"].decode() == ex["key"]
    np.testing.assert_allclose(g["dense"].astype(np.float32), f, rtol=1e-3, atol=1e-2)
    caps = ex["captions"][:5]
    assert g["caption_ids"].shape == (len(caps), 17)
    if caps:
      np.testing.assert_array_equal(g["caption_ids"], tok.encode(caps, max_len=17))
    assert [c.decode() for c in g["captions"]] == caps
    np.testing.assert_array_equal(g["boxes"], records.grid_boxes())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(g["image"]))), ex["image"])


def test_resume_rewrites_only_missing_and_truncated_shards(tmp_path, tok):
  first = _extract(tmp_path, tok)
  files = [s["file"] for s in first["shards"]]
  before = _mtimes(tmp_path)
  # A finished split: nothing runs.
  bb = _Counting(backbones.build_backbone("demo"))
  assert _extract(tmp_path, tok, backbone=bb) == first and bb.images == 0
  # One shard deleted: only it is rewritten, byte-identical.
  os.remove(tmp_path / files[1])
  bb = _Counting(backbones.build_backbone("demo"))
  assert _extract(tmp_path, tok, backbone=bb) == first
  assert bb.images == 3
  after = _mtimes(tmp_path)
  assert {f: after[f] for f in (files[0], files[2])} == {f: before[f] for f in (files[0], files[2])}
  # A truncated shard fails verification and is rewritten.
  path = tmp_path / files[0]
  data = path.read_bytes()
  path.write_bytes(data[:-10])
  with pytest.raises(records.DataError, match="truncated"):
    records.verify_shard(str(tmp_path), first["shards"][0])
  bb = _Counting(backbones.build_backbone("demo"))
  assert _extract(tmp_path, tok, backbone=bb) == first and bb.images == 3
  assert path.read_bytes() == data


class _Stub:
  name, feature_dim, image_size = "resnet", 2048, 448

  def config(self):
    return {"name": self.name}


def test_mismatch_with_existing_manifest(tmp_path, tok):
  _extract(tmp_path, tok)
  before = _mtimes(tmp_path)
  with pytest.raises(records.DataError, match=r"backbone \(manifest: 'demo'.*feature_dim \(manifest: 64"):
    _extract(tmp_path, tok, backbone=_Stub())
  with pytest.raises(records.DataError, match="max_len"):
    _extract(tmp_path, tok, max_len=12)
  with pytest.raises(records.DataError, match="shard_size"):
    _extract(tmp_path, tok, shard_size=4)
  assert _mtimes(tmp_path) == before


def test_source_errors_propagate_and_resume(tmp_path, tok):
  src = _source()

  def broken():
    for i, ex in enumerate(src):
      if i == 4:
        raise records.DataError("image /data/coco/000004.jpg is corrupt")
      yield ex

  with pytest.raises(records.DataError, match="000004.jpg"):
    _extract(tmp_path, tok, source=broken(), num_examples=7)
  partial = records.read_manifest(str(tmp_path))["splits"]["train"]
  assert not partial["complete"] and [s["num_examples"] for s in partial["shards"]] == [3]
  bb = _Counting(backbones.build_backbone("demo"))
  entry = _extract(tmp_path, tok, source=iter(src), num_examples=7, backbone=bb)
  assert entry["complete"] and entry["num_examples"] == 7 and bb.images == 4


def test_source_shorter_than_requested(tmp_path, tok):
  entry = _extract(tmp_path, tok, source=iter(_source(5)), num_examples=10)
  assert entry["num_examples"] == 5 and entry["requested_examples"] == 10
  assert sorted(os.listdir(tmp_path)) == sorted([records.MANIFEST_NAME, records.MANIFEST_NAME + extract.LOCK_SUFFIX]
                                                + [records.shard_name("train", i, 2) for i in range(2)])
  with open(tmp_path / records.MANIFEST_NAME) as f:
    assert json.load(f)["splits"]["train"]["shards"][1]["file"] == "train-00001-of-00002.tfrecord"
  bb = _Counting(backbones.build_backbone("demo"))
  assert _extract(tmp_path, tok, source=iter(_source(5)), num_examples=10, backbone=bb) == entry
  assert bb.images == 0
  with pytest.raises(ValueError, match="num_examples"):
    _extract(tmp_path / "x", tok, source=iter(_source(2)))


def test_repaired_shard_is_byte_identical_in_another_process_and_keeps_the_vocabulary(tmp_path, tok):
  from bigen_jax.data import vocab  # pylint: disable=g-import-not-at-top
  out, vocab_dir = tmp_path / "records", str(tmp_path / "vocab")
  entry = _extract(out, tok)
  vocab.build_vocab(str(out), vocab_dir, k=4, iterations=2, sample_size=200)
  shard = out / entry["shards"][1]["file"]
  data = shard.read_bytes()
  flipped = bytearray(data)
  flipped[len(data) // 2:len(data) // 2 + 8] = bytes(255 - b for b in flipped[len(data) // 2:len(data) // 2 + 8])
  shard.write_bytes(bytes(flipped))
  # The repair runs in a fresh process, as a re-run of the tool would (protobuf map order is per process).
  script = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]\n"
            "from bigen_jax.data import tokenizer\n"
            "import test_extract_features as t\n"
            f"t._extract({str(out)!r}, tokenizer.load_tokenizer({tok.vocab_path!r}))\n")
  subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=ROOT)
  assert shard.read_bytes() == data
  assert records.read_manifest(str(out))["splits"]["train"] == entry
  vocab.load_vocab(vocab_dir, records_dir=str(out))  # fingerprint unchanged: no k-means rebuild


# ----------------------------------------------------------------------------------------------- shard ranges


def _same_shards(dir_a, dir_b, entry):
  for shard in entry["shards"]:
    assert (dir_a / shard["file"]).read_bytes() == (dir_b / shard["file"]).read_bytes(), shard["file"]


def test_workers_on_shard_ranges_write_what_one_run_writes(tmp_path, tok):
  single = _extract(tmp_path / "single", tok)  # 7 examples, 3 shards
  files = [s["file"] for s in single["shards"]]
  out = tmp_path / "workers"
  first = _Counting(backbones.build_backbone("demo"))
  entry = _extract(out, tok, backbone=first, shards=(0, 2))
  assert not entry["complete"] and [s["file"] for s in entry["shards"]] == files[:2] and first.images == 6
  assert records.read_manifest(str(out))["splits"]["train"] == entry
  second = _Counting(backbones.build_backbone("demo"))
  assert _extract(out, tok, backbone=second, shards=(2, None)) == single
  assert second.images == 1  # shards 0 and 1's examples passed over without the backbone
  assert records.read_manifest(str(out))["splits"]["train"] == single
  _same_shards(out, tmp_path / "single", single)
  again = _Counting(backbones.build_backbone("demo"))
  assert _extract(out, tok, backbone=again, shards=(0, 2)) == single and again.images == 0


def test_interleaved_workers_keep_each_others_shards(tmp_path, tok):
  single = _extract(tmp_path / "single", tok)
  files = [s["file"] for s in single["shards"]]
  out = tmp_path / "workers"
  second = []

  def first_source():  # worker 2: runs whole after worker 0:2 saved shard 0 and while it reads shard 1
    for k, ex in enumerate(_source()):
      if k == 4:
        second.append(_extract(out, tok, shards=(2, None)))
      yield ex

  first = _extract(out, tok, source=first_source(), num_examples=7, shards=(0, 2))
  assert not second[0]["complete"] and [s["file"] for s in second[0]["shards"]] == [files[0], files[2]]
  assert first == single and records.read_manifest(str(out))["splits"]["train"] == single
  _same_shards(out, tmp_path / "single", single)


def test_manifest_saves_wait_for_the_lock(tmp_path, tok):
  entry = _extract(tmp_path, tok, shards=(0, 1))
  header = {k: v for k, v in records.read_manifest(str(tmp_path)).items() if k != "splits"}
  manifest = extract._Manifest(str(tmp_path), header)  # pylint: disable=protected-access
  other = {**entry["shards"][0], "file": records.shard_name("train", 1, 3)}  # as another worker's shard 1
  saver = threading.Thread(target=manifest.save_split, args=("train", {**entry, "shards": [other]}))
  with open(manifest.lock_path, "a", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # a worker in the middle of its save
    saver.start()
    time.sleep(0.3)
    assert saver.is_alive() and records.read_manifest(str(tmp_path))["splits"]["train"] == entry
  saver.join(timeout=10)
  assert not saver.is_alive()
  assert records.read_manifest(str(tmp_path))["splits"]["train"]["shards"] == entry["shards"] + [other]


@pytest.mark.parametrize("args,message", [
    (["--shards=3"], "--shards=3: expected START:END"),
    (["--shards=0-2"], "--shards=0-2: expected START:END"),
    (["--shards=-1:2"], "--shards=-1:2: expected START:END"),
    (["--shards=4:2"], "--shards=4:2: the range START:END is empty"),
    (["--shards=0:2", "--on_bad_image=skip"], "--shards needs --on_bad_image=fail, not skip"),
])
def test_bad_shards_flag_is_a_one_line_error(tmp_path, args, message):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--out", str(out),
                         "--vocab", str(tmp_path / "vocab.txt"), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [proc.stderr.rstrip().splitlines()[-1]] and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr and not out.exists()
