"""``bigen_jax.Pipeline`` and ``python -m bigen_jax.generate`` on the export bundle of a trained tiny model (issue 17's
acceptance): a fresh process captions the held-out images exactly as the captioning evaluator does, and decodes
their captions to the generation evaluator's mask-predict token ids and preview pictures; a bundled generator draws
what ``text_to_image.caption_to_pixels`` draws, each padded batch shape compiled once."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from bigen_jax import errors
from bigen_jax import experiment
from bigen_jax import export
from bigen_jax import text_to_image
from bigen_jax import train
from bigen_jax import train_generator
from bigen_jax.eval import captioning
from bigen_jax.eval import eval_set
from bigen_jax.eval import generation
from test_export import generator_run
from test_export import scenes_data
from test_export import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fresh process: the bundle's pipeline on the images and captions given -> features, token ids, pictures, captions.
SCRIPT = """
import json, sys
import numpy as np
from bigen_jax import Pipeline
from bigen_jax.data import images
bundle, out, texts = sys.argv[1:4]
pipe = Pipeline.load(bundle)
pictures = [images.decode_image(path) for path in sys.argv[4:]]
features = pipe.features(pictures)
ids, pixels = pipe.generate_arrays(json.loads(texts))
np.savez(out, dense=features["dense"], cluster_ids=features["cluster_ids"], ids=ids, pixels=pixels)
with open(out + ".json", "w") as f:
  json.dump(pipe.caption(pictures), f)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(data, config, workdir, params of a 2-step stage-1 run of the tiny model, the run's bundle)."""
  root = str(tmp_path_factory.mktemp("pipeline"))
  data = scenes_data(root)
  config = tiny_config(data, **{"total_steps": 2, "checkpoint.every": 2, "eval.every": 0})
  workdir = os.path.join(root, "run")
  params = jax.device_get(train.train_and_evaluate(config, workdir).params)
  return data, config, workdir, params, export.export(workdir, os.path.join(root, "bundle"),
                                                      backbone_weights=data["weights"])


def _popen(args):
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc):
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  return stdout


def test_a_fresh_process_reproduces_the_evaluators(trained, tmp_path):
  data, config, workdir, params, bundle = trained
  held_out = eval_set.load(config, split="validation", image_size=64)  # the stored 64-px images, unchanged
  paths = []
  for i, image in enumerate(held_out["images"]):
    paths.append(str(tmp_path / f"v{i}.png"))
    Image.fromarray(image).save(paths[-1])
  texts = [refs[0] for refs in held_out["references"]]
  out = str(tmp_path / "out.npz")
  api = _popen(["-c", SCRIPT, bundle, out, json.dumps(texts)] + paths)
  command = _popen(["-m", "bigen_jax.generate", "--bundle", bundle, "--out", str(tmp_path / "x.png")]
                   + [f"--image={p}" for p in paths] + [f"--text={t}" for t in texts])

  ctx = experiment.build_context(config, workdir)
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    captions = captioning.Evaluator(ctx).captions(params)
    drawer = generation.Evaluator(ctx)
    ids = drawer.generate(params)
  drawings = drawer.draw(ids)
  printed = _finish(api) + _finish(command)

  got = np.load(out)
  np.testing.assert_array_equal(got["dense"], held_out["dense"])  # the records' features, bit for bit
  np.testing.assert_array_equal(got["cluster_ids"], held_out["cluster_ids"])
  np.testing.assert_array_equal(got["ids"], ids)
  np.testing.assert_array_equal(got["pixels"], drawings)
  with open(out + ".json") as f:
    assert json.load(f) == captions
  lines = printed.splitlines()
  assert lines[:len(paths)] == captions
  written = [str(tmp_path / f"x_{i}.png") for i in range(len(texts))]
  assert lines[len(paths):] == written
  np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in written]), drawings)


def test_a_bundled_generator_draws_what_caption_to_pixels_draws(trained, tmp_path):
  """Eight captions in two batches of 4, MaskGIT sampling: ids and pictures equal ``caption_to_pixels`` on the same
  batches and keys; the bucket compiles once, and an input's picture does not depend on the others of its batch
  (three captions padded to 4 get the pictures they got beside the fourth)."""
  data, config, workdir, params, _ = trained
  gan_dir = str(tmp_path / "gan")
  generator_run(data, gan_dir)
  path = export.export(workdir, str(tmp_path / "b"), backbone_weights=data["weights"], generator_dir=gan_dir)
  from bigen_jax import Pipeline  # pylint: disable=g-import-not-at-top  (the package's lazy export)
  pipe = Pipeline.load(path, max_batch=4)
  held_out = eval_set.load(config, split="validation")
  texts = [refs[0] for refs in held_out["references"]]
  options = dict(order="maskgit", temperature=1.0, choice_temperature=1.0, schedule="cosine")
  ids, pixels = pipe.generate_arrays(texts, seed=3, steps=3, **options)

  ctx = experiment.build_context(config, workdir)
  settings = {**generation.decoder_settings(ctx.config.eval.generation)[""], **options, "num_steps": 3}
  want_ids, want_pixels = [], []
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    fn = jax.jit(text_to_image.caption_to_pixels(ctx, settings))
    for i in range(2):
      batch = {k: held_out[k][4 * i:4 * i + 4] for k in ("text_ids", "text_mask", "boxes")}
      out = jax.device_get(fn(params, train_generator.load_generator(gan_dir), batch,
                              jax.random.fold_in(jax.random.key(3), i)))
      want_ids.append(out[0])
      want_pixels.append(out[1])
  np.testing.assert_array_equal(ids, np.concatenate(want_ids))
  np.testing.assert_array_equal(pixels, np.concatenate(want_pixels))
  assert pixels.shape == (8, 32, 32, 3)
  assert [key[1] for key in pipe.jitted] == [4]
  again = pipe.generate(texts[:3], seed=3, steps=3, **options)  # bucket 4 again: no new program
  assert [key[1] for key in pipe.jitted] == [4]
  assert all(fn._cache_size() == 1 for fn in pipe.jitted.values())  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.stack([np.asarray(x) for x in again]), pixels[:3])
  run_decoder = generation.decoder_settings(ctx.config.eval.generation)[""]
  assert pipe.decoder_settings(steps=8, guidance=4.0) == {**run_decoder, "num_steps": 8, "guidance": 4.0}


def test_inputs_reach_the_decoders_in_order_in_padded_buckets(trained, monkeypatch):
  """The tiny model says the same thing of every input, so the order of the inputs is checked here: with stub
  decoders (row r of a batch decodes to word 5 + r / cluster r), 7 inputs in batches of at most 4 reach them in
  order, padded to bucket 4 with copies of the batch's first row, batch i with ``fold_in(key(seed), i)``; the
  outputs come back unpadded and in order."""
  _, config, _, _, bundle = trained
  from bigen_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import preview  # pylint: disable=g-import-not-at-top
  calls = []

  def stub(width):
    def make(ctx, settings):
      del ctx, settings

      def decode(params, batch, rng):
        del params
        calls.append((batch, jax.random.key_data(rng)))
        rows = np.arange(len(batch["boxes"]))[:, None]
        if width:
          return np.broadcast_to(rows, (len(rows), width)).astype(np.int32)
        return np.concatenate([np.full_like(rows, 2), 5 + rows, np.full_like(rows, 3)], axis=1)
      return decode
    return make

  monkeypatch.setattr(captioning, "decode_fn", stub(0))
  monkeypatch.setattr(generation, "decode_fn", stub(64))
  pipe = Pipeline.load(bundle, max_batch=4)
  held_out = eval_set.load(config, split="validation", num_examples=7, image_size=64)
  words = pipe.tokenizer.decode(np.asarray([[2, 5 + r, 3] for r in range(4)]))
  assert pipe.caption(list(held_out["images"]), seed=7) == words + words[:3]
  texts = [refs[0] for refs in held_out["references"]]
  ids, pixels = pipe.generate_arrays(texts, seed=7)
  np.testing.assert_array_equal(ids[:, 0], [0, 1, 2, 3, 0, 1, 2])
  np.testing.assert_array_equal(pixels, preview.render_preview(ids, pipe.bundle.preview_table))
  for field, (first, second) in (("dense", calls[:2]), ("text_ids", calls[2:])):
    assert len(first[0][field]) == len(second[0][field]) == 4
    np.testing.assert_array_equal(np.concatenate([first[0][field], second[0][field][:3]]), held_out[field])
    np.testing.assert_array_equal(second[0][field][3], held_out[field][4])
  batch_keys = [jax.random.fold_in(jax.random.key(7), i) for i in range(2)]
  want = batch_keys + [jax.random.split(key)[0] for key in batch_keys]  # the tokens take a half of each
  for (_, got), key in zip(calls, want):
    np.testing.assert_array_equal(got, jax.random.key_data(key))


def test_caption_takes_pil_images_and_decoder_options(trained):
  _, config, _, _, bundle = trained
  from bigen_jax import Pipeline  # pylint: disable=g-import-not-at-top
  pipe = Pipeline.load(bundle)
  images = list(eval_set.load(config, split="validation", num_examples=3, image_size=64)["images"])
  greedy = pipe.caption(images)
  assert pipe.caption([Image.fromarray(x) for x in images]) == greedy
  assert pipe.caption(images, "beam", beam_size=1) == greedy  # beam size 1 is greedy decoding
  with pytest.raises(errors.UserError, match="beam_width"):
    pipe.caption(images, "beam", beam_width=2)
  with pytest.raises(errors.ConfigError, match="decoder='nucleus'"):
    pipe.caption(images, "nucleus")
  with pytest.raises(errors.UserError, match="image 1 of the batch is float32"):
    pipe.caption([images[0], images[1].astype(np.float32)])
  with pytest.raises(errors.ConfigError, match="order='spiral'"):
    pipe.generate(["a circle"], order="spiral")
  assert pipe.caption([]) == [] and pipe.generate([]) == []


def test_batches_pad_to_power_of_two_buckets_and_the_package_import_stays_light():
  from bigen_jax import pipeline  # pylint: disable=g-import-not-at-top
  assert [pipeline.bucket_size(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
  assert pipeline.bucket_size(5, 6) == 6
  import bigen_jax  # pylint: disable=g-import-not-at-top
  assert bigen_jax.Pipeline is pipeline.Pipeline
  with pytest.raises(AttributeError, match="Pipelines"):
    bigen_jax.Pipelines  # pylint: disable=pointless-statement
  code = "import sys, bigen_jax; print(sorted(m for m in ('jax', 'torch', 'bigen_jax.pipeline') if m in sys.modules))"
  assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout.strip() == "[]"
