"""Export bundles (``bigen_jax.export``): what a bundle holds, that every corruption is a ``BundleError`` naming the
file, and that an interrupted export leaves the previous bundle intact. On the tiny captioned-scenes world seen
through a 4-step scenes detector (so the bundle carries its weights); the run holds freshly initialised params
(``untrained_run``: the trainer's own files without the training, which ``test_pipeline.py`` runs)."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

from etils import epath
import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from bigen_jax import checkpoint
from bigen_jax import errors
from bigen_jax import experiment
from bigen_jax import export
from bigen_jax import fileio
from bigen_jax import run_config
from bigen_jax import train_generator
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab as vocab_lib
from bigen_jax.models import lxmert
from bigen_jax.models import spade
from configs import demo
from configs import generator as generator_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTOR = dict(steps=4, batch_size=4, num_train_scenes=8, width=8, feature_dim=16, eval_scenes=0, checkpoint_every=2,
                log_every=1)


def scenes_data(root: str, splits=(("train", 24), ("validation", 8))) -> dict[str, str]:
  """The tiny captioned-scenes world's examples through a 4-step scenes detector (``fc6``): records with their
  64-px images and no source plug-in (the evaluators draw with the preview decoder, and need no recogniser), an
  8-cluster vocabulary, a WordPiece tokenizer of the training captions, and the detector's weights file."""
  from bigen_jax.features import backbones  # pylint: disable=g-import-not-at-top
  from bigen_jax.features import extract  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import detector  # pylint: disable=g-import-not-at-top
  from bigen_jax.worlds.scenes import world  # pylint: disable=g-import-not-at-top
  scene = world.DATASETS["tiny"].scene_config()
  examples = {split: [world.make_example(i, scene, split=split) for i in range(n)] for split, n in splits}
  vocab_path = tokenizer.train_wordpiece([c for ex in examples["train"] for c in ex["captions"]], vocab_size=200,
                                         out_dir=os.path.join(root, "tokenizer"))
  weights, _ = detector.load_or_train(os.path.join(root, "detector"), **DETECTOR)
  backbone = backbones.build_backbone("scenes_detector", weights=weights, layer="fc6")
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  for split, rows in examples.items():
    extract.extract_split(rows, split=split, out_dir=records_dir, backbone=backbone,
                          tokenizer=tokenizer.load_tokenizer(vocab_path), shard_size=100, batch_size=32,
                          store_images=True, vocab_path=vocab_path, progress=False)
  vocab_lib.build_vocab(records_dir, vocab_dir, k=8, iterations=5, sample_size=1000, seed=0)
  return {"records_dir": records_dir, "vocab_dir": vocab_dir, "tokenizer": vocab_path, "weights": weights}


def tiny_config(data: dict[str, str], **overrides) -> ml_collections.ConfigDict:
  """``configs/demo.py:tiny`` on ``data``, one device."""
  config = demo.get_config("tiny")
  config.data.update({k: data[k] for k in ("records_dir", "vocab_dir", "tokenizer")})
  config.update_from_flattened_dict({"mesh.num_devices": 1, **overrides})
  return config


def untrained_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """A run directory as the trainer leaves one (its resolved config.json, a verified checkpoint at step 1) holding
  freshly initialised params, which it returns (numpy)."""
  ctx = experiment.build_context(config, workdir)
  params = jax.device_get(nn.unbox(lxmert.init_params(ctx.model, ctx.config.model, jax.random.key(0))))
  run_config.save(ctx.config, workdir)
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=1, async_save=False)
  ckpt.save(1, {"params": params}, {"epoch": 0, "batch_in_epoch": 0}, force=True)
  ckpt.close()
  return params


def generator_run(data: dict[str, str], workdir: str) -> dict:
  """A ``bigen_jax.train_generator`` run directory of ``configs/generator.py:tiny`` (32 px) on ``data`` whose
  checkpoint holds a freshly initialised G; returns G's variables (numpy)."""
  config = generator_config.get_config("tiny")
  config.data.update({k: data[k] for k in ("records_dir", "vocab_dir")})
  config, _ = train_generator.resolve_config(config)
  variables = jax.device_get(nn.unbox(spade.init_generator(config.model, jax.random.key(1))))
  run_config.save(config, workdir)
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=1, async_save=False)
  ckpt.save(1, {field: {"generator": variables[field]} for field in ("params", "spectral")},
            {"epoch": 0, "batch_in_epoch": 0}, force=True)
  ckpt.close()
  return variables


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(data, the run's workdir, its params, a bundle of it)."""
  root = str(tmp_path_factory.mktemp("export"))
  data = scenes_data(root)
  workdir = os.path.join(root, "run")
  params = untrained_run(tiny_config(data), workdir)
  bundle = export.export(workdir, os.path.join(root, "bundle"), backbone_weights=data["weights"])
  return data, workdir, params, bundle


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


def test_a_bundle_holds_the_run_and_its_inputs(setup):
  data, workdir, params, path = setup
  bundle = export.load_bundle(path)
  assert bundle.meta["format_version"] == export.FORMAT_VERSION
  assert bundle.meta["versions"] == {"bigen_jax": importlib.metadata.version("bigen_jax"), "jax": jax.__version__,
                                     "flax": flax.__version__}
  assert bundle.meta["run"] == {"workdir": workdir, "step": 1} and bundle.meta["params_dtype"] == "float32"
  manifest = fileio.read_json(os.path.join(data["records_dir"], "manifest.json"))
  extractor = bundle.meta["feature_extractor"]
  assert extractor["backbone"] == "scenes_detector" and extractor["backbone_config"] == manifest["backbone_config"]
  assert extractor["backbone_config"]["layer"] == "fc6" and extractor["feature_dim"] == 16
  with open(data["weights"], "rb") as want, open(bundle.file(extractor["weights_file"]), "rb") as have:
    assert have.read() == want.read()
  assert not bundle.meta["generator"] and bundle.meta["preview"] and bundle.generator is None
  assert bundle.preview_table.shape == (8, 16, 16, 3)
  assert bundle.config.to_dict() == run_config.load(workdir).to_dict()
  np.testing.assert_array_equal(bundle.codebook, vocab_lib.load_vocab(data["vocab_dir"]).codebook)
  with open(data["tokenizer"], "rb") as want, open(bundle.file("vocab.txt"), "rb") as have:
    assert have.read() == want.read()
  assert _flat(bundle.params).keys() == _flat(params).keys()
  for key, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(bundle.params)[key], value, err_msg="/".join(key))
  record = fileio.read_json(bundle.file("sha256.json"))["files"]
  assert "bundle.json" in record and any(name.startswith("params/") for name in record)


def _copy(path, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(path, out)
  return out


def _rerecord(path):
  """Rewrites the bundle's sha256.json for its current files: only the content checks can then catch an edit."""
  fileio.write_json_atomic(os.path.join(path, "sha256.json"), {"files": checkpoint.file_digests(path)})


def _truncate_params(path):
  params = os.path.join(path, "params")
  files = [os.path.join(d, n) for d, _, names in os.walk(params) for n in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return os.path.relpath(largest, path)


def _edit_json(path, name, edit):
  with open(os.path.join(path, name)) as f:
    value = json.load(f)
  edit(value)
  with open(os.path.join(path, name), "w") as f:
    json.dump(value, f)


def _corrupt(kind, path):
  """Damages the bundle copy in ``path``; returns what the error must name."""
  if kind == "truncated params":
    return [_truncate_params(path), "truncated"]
  if kind == "missing codebook":
    os.remove(os.path.join(path, "codebook.npy"))
    return ["codebook.npy is missing"]
  if kind == "missing weights":
    os.remove(os.path.join(path, "backbone", os.listdir(os.path.join(path, "backbone"))[0]))
    return ["backbone/scenes_detector", "missing"]
  if kind == "edited version":
    _edit_json(path, "bundle.json", lambda meta: meta.update(format_version=99))
    return ["bundle.json", "format_version 99", "reads format 1"]
  if kind == "no bundle.json":
    os.remove(os.path.join(path, "bundle.json"))
    return ["bundle.json is missing"]
  if kind == "unfinished":
    os.remove(os.path.join(path, "sha256.json"))
    return ["sha256.json is missing"]
  if kind == "codebook shape":
    vocab_lib.save_npy(os.path.join(path, "codebook.npy"), np.zeros((7, 16), np.float32))
    _rerecord(path)
    return ["codebook.npy", "(7, 16)", "8 clusters of 16"]
  if kind == "params of another model":
    _edit_json(path, "config.json", lambda config: config["model"].update(mlp_dim=48))
    _rerecord(path)
    return [os.path.join(path, "params"), "does not fit the model", "shape mismatch"]
  if kind == "tokenizer of another size":
    with open(os.path.join(path, "vocab.txt"), "a") as f:
      f.write("extraword\n")
    _rerecord(path)
    return ["vocab.txt", "expected 200"]
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated params", "missing codebook", "missing weights", "edited version",
                                  "no bundle.json", "unfinished", "codebook shape", "params of another model",
                                  "tokenizer of another size"])
def test_a_damaged_bundle_is_a_user_error_naming_the_file(setup, tmp_path, kind):
  path = _copy(setup[3], tmp_path)
  export.load_bundle(path)  # the copy loads before it is damaged
  fragments = _corrupt(kind, path)
  with pytest.raises(errors.UserError) as e:
    export.load_bundle(path)
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))


def test_without_the_record_truncated_params_fail_to_read(setup, tmp_path):
  """``verify=False`` skips the sha256 record: a truncated params file still fails to read, naming params/."""
  path = _copy(setup[3], tmp_path)
  _truncate_params(path)
  with pytest.raises(export.BundleError, match="params"):
    export.load_bundle(path, verify=False)


def test_an_interrupted_export_leaves_the_previous_bundle(setup, tmp_path, monkeypatch):
  data, workdir, params, path = setup
  out = _copy(path, tmp_path)
  before = checkpoint.file_digests(out)

  def fail(*args, **kwargs):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(vocab_lib, "save_npy", fail)  # after config.json, params/ and vocab.txt are written
  with pytest.raises(OSError, match="simulated"):
    export.export(workdir, out, backbone_weights=data["weights"], bf16=True)
  assert checkpoint.file_digests(out) == before
  assert sorted(os.listdir(tmp_path)) == ["copy"]  # no temporary sibling left
  monkeypatch.undo()
  export.export(workdir, out, backbone_weights=data["weights"], bf16=True)  # replaces it once complete
  assert sorted(os.listdir(tmp_path)) == ["copy"]
  bundle = export.load_bundle(out)
  assert bundle.meta["params_dtype"] == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(bundle.params)} == {np.dtype(jax.numpy.bfloat16)}
  for key, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(bundle.params)[key], value.astype(jax.numpy.bfloat16))


def test_on_an_object_store_the_bundle_is_copied_over_the_old_one_record_last(setup, tmp_path, monkeypatch):
  """``_copy_over`` (what a URL ``--out`` gets instead of a rename), run on local paths: the old bundle's files
  are gone, the new one's are copied, ``sha256.json`` last."""
  new, old = _copy(setup[3], tmp_path), str(tmp_path / "old")
  os.makedirs(os.path.join(old, "generator"))
  with open(os.path.join(old, "generator", "stale.txt"), "w") as f:
    f.write("from the previous export")
  order = []
  path_type = type(epath.Path(new))
  copy = path_type.copy

  def recorded(self, dst, *args, **kwargs):
    order.append(os.path.relpath(os.fspath(dst), old))
    return copy(self, dst, *args, **kwargs)

  monkeypatch.setattr(path_type, "copy", recorded)
  export._copy_over(new, old)  # pylint: disable=protected-access
  assert order[-1] == "sha256.json" and sorted(order) == sorted([*checkpoint.file_digests(new), "sha256.json"])
  assert not os.path.exists(os.path.join(old, "generator"))
  export.load_bundle(old)


def test_export_refuses_to_replace_what_is_not_a_bundle(setup, tmp_path):
  data, workdir, _, _ = setup
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(errors.UserError, match="exists and is not a bundle"):
    export.export(workdir, str(tmp_path / "mine"), backbone_weights=data["weights"])
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_backbone_weights_must_be_the_records_ones(setup, tmp_path):
  data, workdir, _, _ = setup
  with pytest.raises(errors.UserError, match="pass --backbone_weights"):
    export.export(workdir, str(tmp_path / "b"))
  other = tmp_path / "other.pt"
  other.write_bytes(b"not the detector")
  with pytest.raises(errors.UserError, match="is not the file the records were extracted with"):
    export.export(workdir, str(tmp_path / "b"), backbone_weights=str(other))
  with pytest.raises(errors.UserError, match="no such checkpoint"):
    export.export(workdir, str(tmp_path / "b"), backbone_weights=data["weights"], step=7)
  assert not os.path.exists(tmp_path / "b")


def test_a_generator_run_is_bundled_with_its_config(setup, tmp_path):
  data, workdir, _, _ = setup
  variables = generator_run(data, str(tmp_path / "gan"))
  path = export.export(workdir, str(tmp_path / "b"), backbone_weights=data["weights"],
                       generator_dir=str(tmp_path / "gan"))
  bundle = export.load_bundle(path)
  assert bundle.meta["generator"] and not bundle.meta["preview"] and bundle.preview_table is None
  bundled, trained = run_config.load(bundle.file("generator")), run_config.load(str(tmp_path / "gan"))
  assert bundled.model.to_dict() == trained.model.to_dict()
  for key, value in _flat(variables).items():
    np.testing.assert_array_equal(_flat(bundle.generator)[key], value)
  _edit_json(path, "generator/config.json", lambda config: config["model"].update(gen_width=12))
  _rerecord(path)
  with pytest.raises(export.BundleError, match="generator/variables does not fit the generator"):
    export.load_bundle(path)


def test_the_command_lines_print_user_errors_as_one_line(setup, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  commands = {"export": [sys.executable, "-m", "bigen_jax.export", "--workdir", str(tmp_path / "none"), "--out",
                         str(tmp_path / "b")],
              "generate": [sys.executable, "-m", "bigen_jax.generate", "--bundle", str(tmp_path / "none"), "--text",
                           "a circle"]}
  procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, cmd in commands.items()}
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (name, stderr[-2000:])
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(tmp_path / "none") in lines[0], (name, stderr[-2000:])
