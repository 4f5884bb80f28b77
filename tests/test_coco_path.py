"""``configs/coco.py`` end to end at a tiny size: scanned, rematerialised, bfloat16 layers on an 8-device fsdp
mesh, started from converted (unscanned) params or with the codebook image head, through the trainer and
``bigen_jax.evaluate`` (validation loss, greedy captions, mask-predict image tokens); also the ``two_model``
ablation."""

import json
import os
import re

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import pytest

from bigen_jax import evaluate
from bigen_jax import experiment
from bigen_jax import metrics as metrics_lib
from bigen_jax import train
from bigen_jax.convert import io as convert_io
from bigen_jax.data import vocab
from bigen_jax.models import lxmert
from configs import base
from configs import coco
from configs import model as model_configs
from conftest import write_training_data

pytestmark = pytest.mark.skipif(not __import__("shutil").which("java"), reason="pycocoevalcap needs Java")

EVALUATORS = ["validation_loss", "captioning", "generation"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_training_data(str(tmp_path_factory.mktemp("coco_path")), splits={"train": 16, "validation": 8},
                             images=True)


def _config(data, variant):
  """``configs/coco.py:<variant>`` with a 2/2/2-layer, 32-wide model, the test's data, 8 devices, 2 steps."""
  config = coco.get_config(variant)
  assert config.model.scan_layers and config.model.dtype == "bfloat16" and config.init_image_head_from_codebook
  assert (config.mesh.data, config.mesh.fsdp) == (1, -1)
  config.data.update(dict(records_dir=data["records_dir"], vocab_dir=data["vocab_dir"],
                          tokenizer=data["tokenizer"]))
  config.model.update(dict(hidden_size=32, num_heads=2, mlp_dim=64, num_language_layers=2, num_vision_layers=2,
                           num_cross_layers=2, max_position_embeddings=32, remat=True))
  config.mesh.num_devices = 8
  config.update(dict(batch_size=8, total_steps=2, log_every=1))
  config.checkpoint.update(dict(every=1, async_save=False))
  config.eval.update(dict(every=0, evaluators=EVALUATORS, num_batches=1))
  config.eval.captioning.update(dict(batch_size=8, spice=False))
  config.eval.generation.update(dict(batch_size=8, grid_images=2))
  return config


def _trained_tasks(workdir):
  """{step: the task trained at that step} from the run's history."""
  rows = metrics_lib.read_history(workdir)
  out = {}
  for row in rows:
    for key, value in row.items():
      if key.endswith("/loss"):
        assert np.isfinite(value), (row["step"], key)
        out[row["step"]] = key.split("/")[0]
  return out


def _train(config, workdir):
  """Trains ``config`` (steps 1 and 2: I2T then T2I) and returns the final params, on the host. Two Adam steps at the
  warm-up's learning rates (<= 5e-5) move each parameter by less than 1e-4: the params are still the initial ones
  to 1e-3. The layers' kernels are stacked (a leading axis of 2 layers) and sharded over the 8 fsdp devices."""
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == config.total_steps
  assert _trained_tasks(workdir) == {1: "i2t", 2: "t2i"}
  for params in (state.params["i2t"], state.params["t2i"]) if "i2t" in state.params else (state.params,):
    kernel = params["cross"]["layers"]["lang_ffn"]["intermediate"]["kernel"]
    assert kernel.shape == (2, 32, 64), kernel.shape
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), kernel.sharding
  return jax.device_get(state.params)


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-3), a, b)


def _check_evaluation(config, workdir, evaluators):
  """``bigen_jax.evaluate`` on the run's saved config: finite results, a caption per image, the generation grid."""
  results, step = evaluate.evaluate(None, workdir, evaluators=evaluators)
  assert step == config.total_steps
  wanted = {"validation_loss": ("i2t/loss", "t2i/loss"), "captioning": ("CIDEr-D",), "generation": ("cell_accuracy",)}
  for key in (f"{name}/{metric}" for name in evaluators for metric in wanted[name]):
    assert key in results, (key, sorted(results))
  assert all(np.isfinite(v) for v in results.values())
  with open(os.path.join(workdir, "eval", f"captions_{step}.json")) as f:
    assert len(json.load(f)) == 8  # every validation image captioned
  assert os.path.exists(os.path.join(workdir, "eval", f"generation_{step}.png"))


@pytest.mark.slow  # ~60 s: the COCO config's whole path compiled twice; test_coco and test_convert_* cover its parts
def test_coco_config_from_converted_params(tmp_path, data):
  """``init_from`` holds unscanned params (``layers_<i>``, as tools/convert_lxmert.py writes them with
  --config.scan_layers=False): the trainer stacks them in layer order for the scanned model, sharded over fsdp."""
  config = _config(data, "paper")
  flat = experiment.resolve_config(config)[0].model
  flat.scan_layers = False
  rng = np.random.default_rng(7)  # random values of the converted shapes (compiling ``init`` costs seconds)
  converted = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32),
                           nn.unbox(lxmert.abstract_params(lxmert.build_model(flat), flat)))
  assert "layers_1" in converted["cross"] and "layers" not in converted["cross"]
  config.init_from = str(tmp_path / "xlxmert_params")  # an orbax directory, the converter's default output
  convert_io.save_params(converted, config.init_from)
  workdir = str(tmp_path / "run")

  trained = flax.traverse_util.flatten_dict(_train(config, workdir))
  converted = flax.traverse_util.flatten_dict(converted)
  for path, value in converted.items():
    layer = [re.fullmatch(r"layers_(\d+)", name) for name in path]
    i = next((i for i, match in enumerate(layer) if match), None)
    # stack/layers_<k>/... is row k of the scanned stack/layers/...
    _close(trained[path] if i is None else trained[path[:i] + ("layers",) + path[i + 1:]][int(layer[i][1])], value)
  assert sum(v.size for v in trained.values()) == sum(v.size for v in converted.values())
  _check_evaluation(config, workdir, EVALUATORS)


@pytest.mark.slow  # about 60 s here: two more compiles of the whole path (the routing is tested in test_model)
def test_two_model_ablation(tmp_path, data):
  """``configs/coco.py:two_model``: an I2T and a T2I model, each with the codebook as its image head's last layer,
  trained by the task cycle and decoded by the greedy captioner and mask-predict."""
  config = _config(data, "two_model")
  workdir = str(tmp_path / "run")
  params = _train(config, workdir)
  assert set(params) == {"i2t", "t2i"}
  codebook = vocab.load_vocab(data["vocab_dir"], records_dir=data["records_dir"]).codebook
  for task in ("i2t", "t2i"):
    classifier = params[task]["image_head"]["classifier"]
    _close(classifier, {"kernel": np.asarray(codebook, np.float32).T, "bias": np.zeros(len(codebook), np.float32)})
  assert not np.allclose(params["i2t"]["cross"]["layers"]["lang_ffn"]["intermediate"]["kernel"],
                         params["t2i"]["cross"]["layers"]["lang_ffn"]["intermediate"]["kernel"])  # two models
  _check_evaluation(config, workdir, ["captioning", "generation"])


@pytest.mark.parametrize("module,known", [(coco, r"one of \('paper', 'two_model', 'two_stage', 'stage2'\)"),
                                          (model_configs, "'paper', 'two_model', 'small', '1b' or 'tiny'"),
                                          (base, "'paper', 'two_model', 'small', '1b' or 'tiny'")])
def test_unknown_variant_raises(module, known):
  with pytest.raises(ValueError, match=f"unknown variant 'papr': expected {known}"):
    module.get_config("papr")
