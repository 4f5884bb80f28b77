"""PyTorch LXMERT -> Flax: numerical parity with Hugging Face's implementation, namings, errors, the CLI and the
provenance file it writes beside the params."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import LxmertForPreTraining, LxmertModel
from transformers.models.lxmert.modeling_lxmert import LxmertPredictionHeadTransform

from bigen_jax import errors
from bigen_jax import state as state_lib
from bigen_jax.convert import io
from bigen_jax.convert import lxmert as convert
from bigen_jax.data import vocab
from bigen_jax.models import lxmert
from conftest import write_records
from test_model import jit, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _hf_config(config, **kw):
  return convert.hf_config(config, num_qa_labels=5, num_object_labels=7, num_attr_labels=3, **kw)


def _inputs(config, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, config.max_len), np.int64)
  mask[1, config.max_len // 2:] = 0
  return dict(text_ids=rng.integers(1, config.vocab_size, (batch, config.max_len)), text_mask=mask,
              visual_feats=rng.normal(size=(batch, config.num_cells, config.visual_feat_dim)).astype(np.float32),
              boxes=rng.uniform(size=(batch, config.num_cells, 4)).astype(np.float32))


def _torch_forward(model, x, visual_feats=None):
  feats = x["visual_feats"] if visual_feats is None else visual_feats
  with torch.no_grad():
    return model(input_ids=torch.tensor(x["text_ids"]), attention_mask=torch.tensor(x["text_mask"]),
                 visual_feats=torch.tensor(feats), visual_pos=torch.tensor(x["boxes"]), output_hidden_states=True)


def _flax_forward(config, params, x, **kw):
  """The model's outputs (with text and image logits) and its matching logits."""
  model = lxmert.build_model(config)

  def run(p, x):
    out = model.apply({"params": p}, **x, text_logits=True, image_logits=True)
    return out, model.apply({"params": p}, out.pooled, method="predict_match")
  return jit(run)(params, dict(x, **kw))


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b.detach().numpy())))


def _check_encoders(config, out, ref):
  """Max |flax - torch| of the single-modality encoders, the cross-modality outputs and the pooled output."""
  errors = {"language_encoder": _err(out.language_encoder, ref.language_hidden_states[config.num_language_layers - 1]),
            "vision_encoder": _err(out.vision_encoder, ref.vision_hidden_states[config.num_vision_layers - 1]),
            "language": _err(out.language, ref.language_hidden_states[-1]),
            "vision": _err(out.vision, ref.vision_hidden_states[-1])}
  if getattr(ref, "pooled_output", None) is not None:
    errors["pooled"] = _err(out.pooled, ref.pooled_output)
  return errors


@pytest.fixture(scope="module")
def tiny_pretraining():
  torch.manual_seed(0)
  config = model_config("tiny")
  return config, LxmertForPreTraining(_hf_config(config)).eval()


def test_parity_tiny_pretraining_model(tiny_pretraining):
  config, hf = tiny_pretraining
  result = convert.convert(hf.state_dict(), config, init_missing_heads=True)
  assert set(result.initialised) == {"image_head/feat_proj/kernel", "image_head/feat_proj/bias",
                                     "image_head/classifier/kernel", "image_head/classifier/bias",
                                     "visual_mask_feature"}
  assert any(k.startswith("answer_head.") for k in result.dropped)
  assert any(k.startswith("obj_predict_head.decoder_dict.") for k in result.dropped)
  x = _inputs(config)
  ref = _torch_forward(hf, x)
  out, match = _flax_forward(config, result.params, x)
  errors = _check_encoders(config, out, ref)
  errors["pooled"] = _err(out.pooled, _torch_forward(hf.lxmert, x).pooled_output)
  errors["text_logits"] = _err(out.text_logits, ref.prediction_logits)
  errors["match_logits"] = _err(match, ref.cross_relationship_score)
  print("tiny parity:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < TOL, errors


def test_parity_full_width_layers():
  """One 768-wide layer of each kind (language, vision, cross) and the 2048-d visual input."""
  torch.manual_seed(1)
  config = model_config("paper", vocab_size=100, num_language_layers=1, num_vision_layers=1, num_cross_layers=1,
                        num_clusters=16, dtype="float32", scan_layers=False, max_len=17, num_cells=64)
  hf = LxmertModel(_hf_config(config)).eval()
  params = convert.params_from_torch(hf.state_dict(), config, init_missing_heads=True)
  x = _inputs(config, batch=2)
  errors = _check_encoders(config, _flax_forward(config, params, x)[0], _torch_forward(hf, x))
  print("full-width parity:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < TOL, errors


class _XLxmertObjHead(torch.nn.Module):
  """X-LXMERT's cluster-centroid classification head: transform, linear_feat H->D, out_cluster D->K."""

  def __init__(self, hf_config, centroids):
    super().__init__()
    self.transform = LxmertPredictionHeadTransform(hf_config)
    self.linear_feat = torch.nn.Linear(hf_config.hidden_size, centroids.shape[1])
    self.out_cluster = torch.nn.Linear(centroids.shape[1], centroids.shape[0])
    self.out_cluster.weight.data = torch.tensor(centroids)

  def forward(self, x):
    return self.out_cluster(self.linear_feat(self.transform(x)))


def _xlxmert_state_dict(config, hf, head, mask_feat, centroids):
  """The naming of X-LXMERT's saved checkpoints: ``module.bert.*``, its CCC head, mask_feat, vis_emb."""
  state = {}
  for key, value in hf.state_dict().items():
    if key.startswith("obj_predict_head."):
      continue
    key = key.replace("lxmert.", "bert.", 1)
    key = key.replace("embeddings.LayerNorm.weight", "embeddings.LayerNorm.gamma")
    key = key.replace("embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta")
    state["module." + key] = value
  state.update({f"module.obj_predict_head.{k}": v for k, v in head.state_dict().items()})
  state["module.mask_feat"] = torch.tensor(mask_feat)
  state["module.vis_emb.weight"] = torch.tensor(centroids)
  return state


def test_xlxmert_original_naming_and_ccc_head(tiny_pretraining):
  """Also the scanned layout (layers stacked by the converter)."""
  _, hf = tiny_pretraining
  config = model_config("tiny", scan_layers=True)
  rng = np.random.default_rng(3)
  centroids = rng.normal(size=(config.num_clusters, config.visual_feat_dim)).astype(np.float32)
  mask_feat = rng.normal(size=config.visual_feat_dim).astype(np.float32)
  torch.manual_seed(2)
  head = _XLxmertObjHead(hf.config, centroids).eval()
  result = convert.convert(_xlxmert_state_dict(config, hf, head, mask_feat, centroids), config)
  assert result.initialised == ()
  np.testing.assert_array_equal(result.codebook, centroids)
  x = _inputs(config)
  cells = np.zeros((3, config.num_cells), bool)
  cells[:, ::3] = True
  ids = rng.integers(0, config.num_clusters, (3, config.num_cells))
  feats = np.where(cells[..., None], mask_feat, centroids[ids])  # X-LXMERT: vis_emb(cluster_ids), then mask
  ref = _torch_forward(hf, x, visual_feats=feats)
  out, _ = _flax_forward(config, result.params, dict(x, visual_feats=None), cluster_ids=ids,
                         codebook=result.codebook, visual_mask=cells)
  errors = _check_encoders(config, out, ref)
  with torch.no_grad():
    errors["image_logits"] = _err(out.image_logits, head(ref.vision_hidden_states[-1]))
  errors["text_logits"] = _err(out.text_logits, ref.prediction_logits)
  print("X-LXMERT naming parity (scan_layers=True):", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < TOL, errors


def test_conversion_errors_list_keys(tiny_pretraining):
  config, hf = tiny_pretraining
  state = dict(hf.state_dict())
  with pytest.raises(convert.ConversionError, match=r"unknown source keys.*lxmert\.encoder\.extra\.weight"):
    convert.convert(dict(state, **{"lxmert.encoder.extra.weight": torch.zeros(2)}), config,
                    init_missing_heads=True)
  missing = {k: v for k, v in state.items() if k != "lxmert.encoder.r_layers.1.output.dense.weight"}
  with pytest.raises(convert.ConversionError, match=r"backbone params missing.*vision/layers_1/ffn/output/kernel"):
    convert.convert(missing, config, init_missing_heads=True)
  with pytest.raises(convert.ConversionError, match=r"init_missing_heads.*image_head/classifier/kernel"):
    convert.convert(state, config)
  with pytest.raises(convert.ConversionError, match=r"shape mismatches.*visn_fc"):
    convert.convert(state, model_config("tiny", visual_feat_dim=8), init_missing_heads=True)
  untied = dict(state, **{"cls.predictions.decoder.weight": torch.zeros_like(state["cls.predictions.bias"])[:, None]
                          .expand(-1, config.hidden_size).clone()})
  with pytest.raises(convert.ConversionError, match="tie"):
    convert.convert(untied, config, init_missing_heads=True)


def test_params_io_roundtrip(tmp_path, tiny_pretraining):
  config, hf = tiny_pretraining
  params = convert.params_from_torch(hf.state_dict(), config, init_missing_heads=True)
  for path in (str(tmp_path / "params.npz"), str(tmp_path / "orbax_params")):
    io.save_params(params, path)
    jax.tree.map(np.testing.assert_array_equal, io.load_params(path), params)
  torch.save({"state_dict": hf.lxmert.state_dict()}, tmp_path / "model.pth")
  loaded = io.load_state_dict(str(tmp_path / "model.pth"))
  np.testing.assert_array_equal(loaded["embeddings.word_embeddings.weight"],
                                hf.lxmert.embeddings.word_embeddings.weight.detach().numpy())


def test_cli(tmp_path, tiny_pretraining):
  config, hf = tiny_pretraining
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.clone() for k, v in hf.state_dict().items()}, str(tmp_path / "lxmert.safetensors"))
  out = str(tmp_path / "params.npz")
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_lxmert.py"),
                  f"--input={tmp_path / 'lxmert.safetensors'}", f"--output={out}", "--init_missing_heads",
                  f"--config={os.path.join(ROOT, 'configs', 'model.py')}:tiny", "--config.scan_layers=True"],
                 capture_output=True, text=True, check=True)
  params = io.load_params(out)
  assert params["language"]["layers"]["ffn"]["output"]["kernel"].shape[0] == config.num_language_layers
  expected = convert.params_from_torch(hf.state_dict(), model_config("tiny", scan_layers=True),
                                       init_missing_heads=True)
  for key in ("text_embed", "language", "vision", "cross", "pooler", "text_head"):
    jax.tree.map(np.testing.assert_array_equal, params[key], expected[key])
  with open(out + ".provenance.json") as f:
    record = json.load(f)
  assert record["feature_extractor"] == "frcnn_vg" and record["codebook_sha256"] is None  # LXMERT: no centroids


def test_cli_codebook_and_provenance_are_what_training_checks(tmp_path, tiny_pretraining):
  """X-LXMERT naming to an orbax directory: --codebook_out and <output>.provenance.json; a vocabulary imported
  from that codebook passes the trainer's check, a k-means one does not."""
  config, hf = tiny_pretraining
  rng = np.random.default_rng(4)
  centroids = rng.normal(size=(config.num_clusters, config.visual_feat_dim)).astype(np.float32)
  mask_feat = rng.normal(size=config.visual_feat_dim).astype(np.float32)
  torch.save(_xlxmert_state_dict(config, hf, _XLxmertObjHead(hf.config, centroids), mask_feat, centroids),
             tmp_path / "xlxmert.pth")
  out, codebook_out = str(tmp_path / "xlxmert_params"), str(tmp_path / "centroids.npy")
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_lxmert.py"),
                  f"--input={tmp_path / 'xlxmert.pth'}", f"--output={out}", f"--codebook_out={codebook_out}",
                  "--feature_extractor=fixture", f"--config={os.path.join(ROOT, 'configs', 'model.py')}:tiny"],
                 capture_output=True, text=True, check=True)
  np.testing.assert_array_equal(np.load(codebook_out), centroids)
  with open(out + ".provenance.json") as f:
    record = json.load(f)
  assert record == {"converter": "tools/convert_lxmert.py", "input": str(tmp_path / "xlxmert.pth"),
                    "feature_extractor": "fixture", "visual_feat_dim": config.visual_feat_dim,
                    "num_clusters": config.num_clusters, "codebook_sha256": vocab.codebook_sha256(centroids),
                    "codebook_file": codebook_out}
  records_dir = str(tmp_path / "records")
  write_records(records_dir, splits={"train": 4, "validation": 2}, dim=config.visual_feat_dim)
  vocab.import_vocab(records_dir, str(tmp_path / "imported"), codebook_out)
  vocab.build_vocab(records_dir, str(tmp_path / "kmeans"), k=config.num_clusters, iterations=2, sample_size=200)

  def check(name):
    state_lib.check_init_provenance(out, records_dir=records_dir, vocab=vocab.load_vocab(str(tmp_path / name)),
                                    uses_codebook=True)
  check("imported")
  with pytest.raises(errors.ConfigError, match=f"init_from={out}: .* from k-means.*--codebook {codebook_out} "):
    check("kmeans")
