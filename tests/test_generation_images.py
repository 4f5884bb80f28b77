"""The generation evaluator on stored images of any size and aspect ratio (COCO-like): one preprocessing
(``eval_set.square_image``: the whole image, bicubic, to the drawings' square), FID under the name of the
Inception variant its weights are (``fid`` / ``fid_torchvision``), with ``inception_transform_input`` for
torchvision's weights only; records of the captioned-scenes world read through its plug-in, whose recogniser
is loaded, never trained."""

import io
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from bigen_jax import errors
from bigen_jax import experiment
from bigen_jax import fileio
from bigen_jax import text_to_image
from bigen_jax import train_generator
from bigen_jax.convert import io as convert_io
from bigen_jax.data import images as images_lib
from bigen_jax.data import records
from bigen_jax.data import tokenizer
from bigen_jax.data import vocab
from bigen_jax.eval import captioning
from bigen_jax.eval import eval_set
from bigen_jax.eval import fid
from bigen_jax.eval import generation
from bigen_jax.models import clip
from bigen_jax.models import inception
from bigen_jax.models import lxmert
from bigen_jax.models import spade
from bigen_jax.worlds.scenes import recognizer
from configs import demo
from configs import generator as generator_config

SPLITS = {"train": 16, "validation": 6}
SHAPES = ((48, 80), (96, 40), (64, 64))  # (height, width) of record i: SHAPES[i % 3]


def _stripes(height, width):
  """uint8 [H, W, 3]: the left quarter red, the middle half green, the right quarter blue."""
  image = np.zeros((height, width, 3), np.uint8)
  image[:, :width // 4, 0] = 255
  image[:, width // 4:width - width // 4, 1] = 255
  image[:, width - width // 4:, 2] = 255
  return image


def test_square_image_keeps_the_whole_image():
  """A wide image squeezed, not cropped: each stripe keeps its share of the width (a centre crop would cut
  the red and blue quarters to an eighth of the square each); the filter is PIL's bicubic; a square of the
  target size is returned unchanged."""
  image = _stripes(40, 120)
  out = eval_set.square_image(image, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  colour = out[16].argmax(-1)
  np.testing.assert_array_equal(colour[:7], 0)
  np.testing.assert_array_equal(colour[9:23], 1)
  np.testing.assert_array_equal(colour[25:], 2)
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC)))
  square = _stripes(32, 32)
  assert eval_set.square_image(square, 32) is square


def _write_records(out_dir, rng):
  """Records (8-d blob features, one caption each) with PNG images of the sizes in ``SHAPES``."""
  manifest = {"version": records.SCHEMA_VERSION, "backbone": "fixture", "feature_dim": 8, "grid": records.GRID,
              "max_len": 6, "max_captions": 1, "store_images": True, "splits": {}}
  centres = rng.normal(size=(4, 8)).astype(np.float32) * 10
  for split, n in SPLITS.items():
    serialized = []
    for i in range(n):
      dense = centres[rng.integers(4, size=records.NUM_CELLS)] + rng.normal(size=(records.NUM_CELLS, 8)) * 0.1
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, SHAPES[i % 3] + (3,), dtype=np.uint8)).save(buf, format="PNG")
      serialized.append(records.encode_example(
          index=i, image_id=1000 + i, key=f"{split}/{i}", dense=dense.astype(np.float32),
          boxes=records.grid_boxes(), caption_ids=np.array([[2, 10 + i % 5, 3, 0, 0, 0]], np.int64),
          captions=[f"caption {i}"], image=buf.getvalue()))
    path = os.path.join(out_dir, records.shard_name(split, 0, 1))
    os.makedirs(out_dir, exist_ok=True)
    manifest["splits"][split] = {"num_examples": n, "shards": [records.write_shard(path, serialized)],
                                 "complete": True}
  fileio.write_json_atomic(os.path.join(out_dir, records.MANIFEST_NAME), manifest)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config, workdir, params of the tiny demo model, FID Inception weights .npz, torchvision ones .npz)."""
  root = str(tmp_path_factory.mktemp("generation_images"))
  records_dir, vocab_dir = os.path.join(root, "records"), os.path.join(root, "vocab")
  _write_records(records_dir, np.random.default_rng(0))
  vocab.build_vocab(records_dir, vocab_dir, k=4, iterations=3, sample_size=500, seed=0)
  vocab_txt = os.path.join(root, "vocab.txt")
  with open(vocab_txt, "w") as f:
    f.write("\n".join(list(tokenizer.SPECIAL_TOKENS) + [f"w{i}" for i in range(50)]) + "\n")
  config = demo.get_config("tiny")
  config.data.update(dict(records_dir=records_dir, vocab_dir=vocab_dir, tokenizer=vocab_txt))
  config.eval.generation.update(dict(batch_size=8, grid_images=2))
  workdir = os.path.join(root, "run")
  ctx = experiment.build_context(config, workdir)
  params = jax.device_get(nn.unbox(lxmert.init_params(ctx.model, ctx.config.model, jax.random.key(0))))
  weights = {}
  for variant, width in inception.NUM_CLASSES.items():  # only the classifier's width says the variant
    weights[variant] = os.path.join(root, f"{variant}_inception.npz")
    convert_io.save_params({"params": {"fc": {"bias": np.zeros(width, np.float32)}}}, weights[variant])
  return config, workdir, params, weights


@pytest.fixture
def inception_calls(monkeypatch):
  """``fid.inception_features_fn`` replaced by a cheap feature function (per-channel mean and the overall
  standard deviation: 4-d, so 6 images have a full-rank covariance; the network itself is tested in
  test_inception.py), recording (variant, transform_input, shapes of the image batches) of each call."""
  calls = []

  def fake(variables, **kwargs):
    call = (inception.variant_of(variables), kwargs.get("transform_input", False), [])
    calls.append(call)

    def features(images):
      assert images.dtype == np.uint8
      call[2].append(images.shape)
      x = images.astype(np.float64)
      return np.concatenate([x.mean((1, 2)), x.std((1, 2, 3))[:, None]], axis=1)
    return features
  monkeypatch.setattr(fid, "inception_features_fn", fake)
  return calls


def _evaluator(setup, **overrides):
  config, workdir, _, _ = setup
  config = config.copy_and_resolve_references()
  config.eval.generation.update(overrides)
  ctx = experiment.build_context(config, workdir)
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    return ctx, generation.Evaluator(ctx)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # the untrained model draws one picture for every caption
def test_non_square_images_are_squared_and_scored_with_fid(setup, inception_calls):
  config, _, params, weights = setup
  ctx, gen = _evaluator(setup, inception_weights=weights["fid"])
  n = SPLITS["validation"]
  assert [c[:2] for c in inception_calls] == [("fid", False)]
  assert gen.image_size == 128 and gen.data["images"].shape == (n, 128, 128, 3)
  stored = {}
  for batch in records.read_split(config.data.records_dir, "validation", batch_size=n, fields=("index", "image")):
    stored.update(zip(batch["index"].tolist(), batch["image"]))
  for i, image in zip(gen.data["index"], gen.data["images"]):
    decoded = images_lib.decode_image(stored[int(i)])
    assert decoded.shape[:2] == SHAPES[int(i) % 3]
    np.testing.assert_array_equal(image, eval_set.square_image(decoded, 128))
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    results = gen.run(params, step=0)
  for key in ("generation/fid", "generation/reference/fid", "generation/cell_accuracy"):
    assert np.isfinite(results[key]), key
  assert results["generation/reference/fid"] > 0 and not any("torchvision" in k for k in results)
  assert set(inception_calls[0][2]) == {(50, 128, 128, 3)}  # real, reference and generated images, squared
  assert len(inception_calls[0][2]) == 3


@pytest.mark.parametrize("transform_input", [True, False])
def test_torchvision_weights_report_fid_torchvision(setup, inception_calls, transform_input):
  _, _, _, weights = setup
  _, gen = _evaluator(setup, inception_weights=weights["torchvision"], inception_transform_input=transform_input)
  assert [c[:2] for c in inception_calls] == [("torchvision", transform_input)]
  assert set(gen.reference) == {"fid_torchvision"} and np.isfinite(gen.reference["fid_torchvision"])


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_scenes_records_load_the_recogniser_and_never_train_it(setup, tmp_path):
  """Records whose manifest names the captioned-scenes world get its plug-in (``eval.sources``): a missing
  recogniser is a UserError naming its directory and the command that trains it, and nothing is trained or
  written; a saved one reads the drawings (``fid_recognizer``, ``semantic/...``)."""
  config, workdir, params, _ = setup
  config = config.copy_and_resolve_references()
  config.data.records_dir = str(tmp_path / "records")
  shutil.copytree(setup[0].data.records_dir, config.data.records_dir)
  manifest = records.read_manifest(config.data.records_dir)
  manifest["source"] = {"name": "scenes", "config": "tiny"}
  fileio.write_json_atomic(os.path.join(config.data.records_dir, records.MANIFEST_NAME), manifest)
  config.eval.generation.recognizer_dir = directory = str(tmp_path / "recognizer")
  ctx = experiment.build_context(config, workdir)
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    with pytest.raises(errors.UserError, match=f"no scene recogniser in {directory}.*train_scene_recognizer"):
      generation.Evaluator(ctx)
    assert not os.path.exists(directory)
    recognizer.save_recognizer(recognizer.recognizer_path(directory), recognizer.init_params(0))
    results = generation.Evaluator(ctx).run(params, step=0)
  for key in ("generation/fid_recognizer", "generation/reference/fid_recognizer"):
    assert np.isfinite(results[key]), key
  assert results["generation/semantic/accuracy"] == 0.0  # the fixture's captions are not scene captions
  assert "generation/real/semantic/accuracy" in results and "generation/real/r_precision_hard" in results
  assert not any(k.startswith("generation/real/fid") for k in results)  # real against real is no distance


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_clip_scores_join_both_evaluators(setup, tmp_path):
  """``config.eval.clip`` with converted params of a random tiny CLIP: ``generation`` reports CLIPScore (100 x
  max(cos, 0)) and CLIP R-precision, ``captioning`` CLIP-S (2.5 x max(cos, 0)) of its captions and of the
  references; each equals the mean computed here through ``clip.frozen_similarity`` on the same pictures."""
  config, workdir, params, _ = setup
  model = clip.build_model(clip.clip_config("tiny"))
  clip_params = jax.device_get(nn.unbox(clip.init_params(model, jax.random.key(3))))
  path = str(tmp_path / "clip.npz")
  convert_io.save_params(clip_params, path)
  config = config.copy_and_resolve_references()
  config.eval.clip.update(dict(path=path, variant="tiny", batch_size=4))
  ctx = experiment.build_context(config, workdir)

  def cosines(images, texts):
    pixels = clip.preprocess(jnp.asarray(images), image_size=model.image_size)
    ids = clip.tokenize(texts, context_length=model.context_length)
    return np.asarray(clip.frozen_similarity(clip_params, pixels, ids, model=model))

  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    gen = generation.Evaluator(ctx)
    results = gen.run(params, step=0)
    drawn = gen.draw(gen.generate(params))
    cap = captioning.Evaluator(ctx)
    captions = cap.captions(params)
    cap_results = cap.run(params, step=0)
  want = np.mean(100 * np.maximum(cosines(drawn, gen.captions), 0))
  np.testing.assert_allclose(results["generation/clip_score"], want, rtol=1e-4)
  assert "generation/clip_r_precision_hard" in results  # word swaps: these captions have none, so no trials
  images = eval_set.load(config, split="validation", image_size=model.image_size)["images"]
  references = [refs[0] for refs in cap.data["references"]]
  for name, texts in (("clip_s", captions), ("clip_s_reference", references)):
    want = np.mean(2.5 * np.maximum(cosines(images, texts), 0))
    np.testing.assert_allclose(cap_results[f"captioning/{name}"], want, rtol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def gan_dir(setup, tmp_path_factory):
  """A tiny SPADE generator (32 px) trained 2 steps on the fixture's records."""
  config = generator_config.get_config("tiny")
  config.data.update(dict(records_dir=setup[0].data.records_dir, vocab_dir=setup[0].data.vocab_dir))
  config.update_from_flattened_dict({"mesh.num_devices": 1, "eval.num_examples": 0, "total_steps": 2})
  workdir = str(tmp_path_factory.mktemp("gan"))
  train_generator.train_generator(config, workdir)
  return workdir


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_the_frozen_generator_draws_beside_the_drawer(setup, gan_dir, inception_calls):
  """``generator_dir``: the trained generator (``load_generator``: G of its newest checkpoint) draws the true
  tokens (``gan_reference/``) and every decoder's tokens (``gan/``, ``<variant>/gan/``), resized to the drawings'
  side; its FID is the one of those pictures; the reconstructions PNG is written."""
  config, workdir, params, weights = setup
  variants = {"sampling": dict(order="maskgit", temperature=1.0, num_steps=2)}
  ctx, gen = _evaluator(setup, inception_weights=weights["fid"], generator_dir=gan_dir, variants=variants)
  gen_variables = train_generator.load_generator(gan_dir)
  ids = gen.data["cluster_ids"]
  padded = np.concatenate([ids, ids[:1].repeat(gen.batch_size - len(ids), axis=0)])  # one batch of the evaluator's
  grid = spade.centroid_grid(jnp.asarray(ctx.vocab.codebook, jnp.float32), jnp.asarray(padded))
  want = np.asarray(spade.to_uint8(jax.jit(spade.decode_image)(gen_variables, grid, jax.random.fold_in(
      jax.random.key(config.seed), 0))))[:len(ids)]
  assert want.shape == (len(ids), 32, 32, 3)
  want = np.stack([eval_set.square_image(x, gen.image_size) for x in want])
  np.testing.assert_array_equal(gen.gan_drawings, want)
  features = inception_calls[0]  # (variant, transform, shapes); recompute the distance from the fake features
  fake_fn = fid.inception_features_fn(convert_io.load_params(weights["fid"]))
  np.testing.assert_allclose(gen.gan_reference["fid"], fid.fid_from_features(fake_fn(want),
                                                                             fake_fn(gen.data["images"])), rtol=1e-6)
  assert features[0] == "fid"
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    results = gen.run(params, step=3)
  for key in ("gan_reference/fid", "gan/fid", "sampling/gan/fid", "fid", "sampling/fid"):
    assert np.isfinite(results[f"generation/{key}"]), key
  assert results["generation/gan_reference/fid"] == pytest.approx(gen.gan_reference["fid"])
  for name in ("generation_3.png", "reconstructions_3.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0


def test_caption_to_pixels_is_decoding_then_drawing(setup, gan_dir):
  """``text_to_image.caption_to_pixels`` (jitted whole) equals T2I decoding then the frozen generator with the
  keys it splits, and the same key gives the same pictures."""
  config, workdir, params, _ = setup
  ctx = experiment.build_context(config, workdir)
  gen_variables = train_generator.load_generator(gan_dir)
  settings = dict(order="maskgit", num_steps=2, temperature=1.0, schedule="cosine", choice_temperature=1.0,
                  guidance=2.0)
  data = eval_set.load(config, split="validation", image_size=32)
  batch = {k: jnp.asarray(data[k][:4]) for k in ("text_ids", "text_mask", "boxes")}
  rng = jax.random.key(5)
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    fn = jax.jit(text_to_image.caption_to_pixels(ctx, settings))
    ids, pixels = fn(params, gen_variables, batch, rng)
    again = fn(params, gen_variables, batch, rng)
    token_rng, noise_rng = jax.random.split(rng)
    want_ids = text_to_image.token_decoder(ctx, settings)(params, batch, token_rng)
    want = text_to_image.generator_drawer(ctx.frozen["codebook"])(gen_variables, want_ids, noise_rng)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(pixels, spade.to_uint8(want))
  assert pixels.dtype == np.uint8 and pixels.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(again[1], pixels)
