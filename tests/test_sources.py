"""Eval plug-ins per data source (``bigen_jax.eval.sources``): the captioned-scenes world's is found from the
records' manifest source, regenerates the truth of its records, and the world imports without TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np

from bigen_jax.eval import sources
from bigen_jax.worlds.scenes import plugin as scenes_plugin
from bigen_jax.worlds.scenes import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_FREE = ("world", "lexicon", "grammar", "captions", "qa", "render", "recognizer_model", "recognizer",
           "semantic", "scene_decoder", "plugin", "detector")


def test_the_world_imports_without_tensorflow():
  """Every module of the world but the TFDS builder imports with TensorFlow blocked (and so do the generic
  evaluators' plug-in registry and the captioning evaluator); the builder is the one that needs it."""
  script = "\n".join([
      "import sys",
      "sys.modules['tensorflow'] = None",  # any import of it now raises ImportError
      "sys.modules['tensorflow_datasets'] = None",
      "import bigen_jax.worlds.scenes",
      *[f"import bigen_jax.worlds.scenes.{name}" for name in TF_FREE],
      "import bigen_jax.eval.sources",
      "try:",
      "  import bigen_jax.worlds.scenes.tfds_builder",
      "except ImportError:",
      "  print('builder needs tensorflow')",
  ])
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "builder needs tensorflow"


def test_plugin_is_looked_up_from_the_manifest_source():
  plugin = sources.plugin({"name": "scenes", "config": "tiny"})
  assert isinstance(plugin, scenes_plugin.ScenesPlugin) and plugin.dataset == "tiny"
  assert sources.plugin({"name": "coco", "karpathy": True}) is None  # no world of that name
  assert sources.plugin({}) is None and sources.plugin({"name": "../x"}) is None
  custom = sources.plugin({"name": "scenes", "config": "tiny-num_train3"})  # sizes changed: no truth by name
  assert custom.scene_graphs("validation", [0]) is None
  assert custom.caption_metrics(["a red circle"], split="validation", indices=[0]) == {}
  assert custom.image_reader({"recognizer_dir": "nowhere"}, workdir="") is None


def test_plugin_regenerates_the_truth_of_records():
  plugin = sources.plugin({"name": "scenes", "config": "tiny"})
  cfg = world.DATASETS["tiny"].scene_config()
  examples = [world.make_example(i, cfg, split="validation") for i in (0, 5)]
  graphs = plugin.scene_graphs("validation", np.array([0, 5]))
  assert graphs == [json.loads(e["scene_graph"]) for e in examples]
  captions = [e["captions"][0] for e in examples]
  metrics = plugin.caption_metrics(captions, split="validation", indices=[0, 5])
  assert metrics["accuracy"] == 1.0 and metrics["num_captions"] == 2
  swapped = plugin.caption_metrics(captions[::-1], split="validation", indices=[0, 5])
  assert swapped["accuracy"] < 1.0
  negatives_fn, contexts = plugin.hard_negatives(split="validation", indices=[0, 5])
  assert contexts == graphs
  assert all(not world.check_caption(neg, g) for c, g in zip(captions, graphs)
             for _, neg in negatives_fn(c, g, np.random.default_rng(0)))
