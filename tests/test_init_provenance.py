"""``--config.init_from`` of converted params: the provenance file beside them is checked against the records'
backbone and the vocabulary's codebook before training (``state.check_init_provenance``)."""

import json
import os
import re

import numpy as np
import pytest

from bigen_jax import errors
from bigen_jax import experiment
from bigen_jax import optim
from bigen_jax import state as state_lib
from bigen_jax.convert import provenance
from bigen_jax.data import vocab
from configs import demo
from conftest import write_records
from conftest import write_training_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Records (backbone "fixture", 8-d) and a vocabulary imported from known centroids [7, 8]."""
  root = str(tmp_path_factory.mktemp("provenance_data"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  write_records(records_dir, splits={"train": 4, "validation": 2})
  centroids = np.random.default_rng(0).normal(size=(7, 8)).astype(np.float32)
  codebook_file = os.path.join(root, "centroids.npy")
  np.save(codebook_file, centroids)
  vocab.import_vocab(records_dir, vocab_dir, codebook_file)
  return {"root": root, "records_dir": records_dir, "vocab": vocab.load_vocab(vocab_dir), "centroids": centroids,
          "codebook_file": codebook_file}


def _converted(data, name, *, feature_extractor="fixture", codebook=None):
  """A converted params path with a provenance file beside it (the params themselves are never read)."""
  path = os.path.join(data["root"], name)
  provenance.write_provenance(path, converter="test", source=path, feature_extractor=feature_extractor,
                              visual_feat_dim=8, num_clusters=7, codebook=codebook,
                              codebook_file=data["codebook_file"] if codebook is not None else None)
  return path


def _check(data, init_from, uses_codebook=True):
  state_lib.check_init_provenance(init_from, records_dir=data["records_dir"], vocab=data["vocab"],
                                  uses_codebook=uses_codebook)


def test_the_matching_checkpoint_passes(data):
  path = _converted(data, "match.npz", codebook=data["centroids"])
  with open(path + ".provenance.json") as f:
    assert json.load(f)["codebook_sha256"] == vocab.codebook_sha256(data["centroids"])
  _check(data, path)
  _check(data, _converted(data, "plain_lxmert.npz"))  # no centroids in the checkpoint: only the backbone


def test_another_codebook_is_refused_naming_the_flag_the_files_and_the_fix(data):
  other = data["centroids"] + 1e-3
  path = _converted(data, "other_codebook.npz", codebook=other)
  have, want = vocab.codebook_sha256(data["centroids"]), vocab.codebook_sha256(other)
  vocab_dir = data["vocab"].dir
  with pytest.raises(errors.ConfigError) as e:
    _check(data, path)
  for part in (f"--config.init_from={path}", f"--config.data.vocab_dir={vocab_dir}",
               f"{vocab_dir}/codebook.npy", f"{path}.provenance.json: codebook_sha256 {want[:16]}",
               f"sha256 {have[:16]}", f"tools/build_vocab.py --records {data['records_dir']}",
               f"--codebook {data['codebook_file']}"):
    assert part in str(e.value), (part, str(e.value))
  _check(data, path, uses_codebook=False)  # a model that never reads cluster ids does not care


def test_another_backbone_is_refused_naming_the_flag_the_files_and_the_fix(data):
  path = _converted(data, "xlxmert.npz", feature_extractor="frcnn_vg", codebook=data["centroids"])
  manifest = os.path.join(data["records_dir"], "manifest.json")
  with pytest.raises(errors.ConfigError, match=re.escape(
      f"--config.init_from={path} was trained on 'frcnn_vg' features ({path}.provenance.json: feature_extractor) "
      f"but --config.data.records_dir={data['records_dir']} holds 'fixture' features ({manifest}: backbone): "
      "extract features with the checkpoint's backbone")):
    _check(data, path, uses_codebook=False)


def test_params_without_provenance_load_with_a_warning(data, caplog):
  path = os.path.join(data["root"], "old_conversion.npz")
  with caplog.at_level("WARNING"):
    _check(data, path)
  assert f"--config.init_from={path} has no provenance file {path}.provenance.json" in caplog.text
  with open(path + ".provenance.json", "w") as f:
    f.write('{"feature_extractor": "fixture"}')
  with pytest.raises(errors.ConfigError, match=rf"init_from={path}: {path}.provenance.json: provenance without "
                     "visual_feat_dim, num_clusters, codebook_sha256"):
    _check(data, path)
  os.remove(path + ".provenance.json")


def test_reads_codebook():
  config = demo.get_config("tiny")
  assert config.tasks.t2i.weight > 0 and state_lib.reads_codebook(config)
  config.tasks.t2i.weight = 0
  config.tasks.i2t.visual_input = "dense"
  config.eval.every = 0
  assert not state_lib.reads_codebook(config)
  config.tasks.i2t.visual_input = "discrete"
  assert state_lib.reads_codebook(config)


def test_xlxmert_params_into_resnet_features_stop_before_training(tmp_path):
  """The case that used to load silently: X-LXMERT's weights over records of another (here: resnet) backbone."""
  fields = write_training_data(str(tmp_path), splits={"train": 8, "validation": 4})
  manifest = os.path.join(fields["records_dir"], "manifest.json")
  with open(manifest) as f:
    content = json.load(f)
  with open(manifest, "w") as f:
    json.dump(dict(content, backbone="resnet"), f)
  codebook = vocab.load_vocab(fields["vocab_dir"]).codebook
  config = demo.get_config("tiny")
  config.data.update(fields)
  config.mesh.num_devices = 2

  def create(init_from):
    run_config = config.copy_and_resolve_references()
    run_config.init_from = init_from
    ctx = experiment.build_context(run_config, str(tmp_path / "run"))
    tx, _ = optim.make_optimizer(ctx.config.optimizer, ctx.config.total_steps)
    return state_lib.create_state(ctx, tx, ctx.vocab.codebook)

  xlxmert = str(tmp_path / "xlxmert.npz")
  provenance.write_provenance(xlxmert, converter="test", source=xlxmert, feature_extractor="frcnn_vg",
                              visual_feat_dim=8, num_clusters=6, codebook=codebook)
  with pytest.raises(errors.ConfigError, match=r"init_from=.*'frcnn_vg' features.*holds 'resnet' features"):
    create(xlxmert)
  matching = str(tmp_path / "resnet_trained.npz")
  provenance.write_provenance(matching, converter="test", source=matching, feature_extractor="resnet",
                              visual_feat_dim=8, num_clusters=6, codebook=codebook)
  create(matching)  # checked, not yet read: the params file is opened by init only
