"""open_clip CLIP -> Flax CLIP: parity of both towers (tiny and ViT-B-32), open_clip's tokenizer, gradients to
the pixels only (against PyTorch autograd), the differentiable preprocessing against open_clip's transform,
bfloat16, conversion errors, the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
from open_clip.transform import image_transform
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from bigen_jax.convert import clip as convert
from bigen_jax.convert import io
from bigen_jax.models import clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
CAPTIONS = ["a photo of a cat", "A dog, running on the beach!", "two red buses " * 30]  # the last: truncated


def _pixels(config, batch, seed):
  return np.random.default_rng(seed).normal(size=(batch, config.image_size, config.image_size, 3)).astype(
      np.float32)


def _nchw(x):
  return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _torch_embeddings(model, pixels, ids):
  with torch.no_grad():
    return (model.encode_image(_nchw(pixels)).numpy(), model.encode_text(torch.tensor(ids).long()).numpy(),
            model.logit_scale.exp().item())


def _encode(model):
  return jax.jit(lambda p, x, ids: model.apply({"params": p}, x, ids, method=lambda m, x, ids: (
      m.encode_image(x), m.encode_text(ids))))


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)))


@pytest.fixture(scope="module")
def tiny():
  """(config, open_clip model of the tiny config, its converted params)."""
  config = clip.clip_config("tiny")
  torch.manual_seed(0)
  net = open_clip.model.CLIP(**convert.open_clip_kwargs(config)).eval()
  return config, net, convert.params_from_torch(net.state_dict(), config)


def test_tokenizer_is_open_clips():
  ids = clip.tokenize(CAPTIONS)
  want = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS).numpy()
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, want)
  eot = np.argmax(ids, axis=-1)  # the text tower pools here: EOT 49407 is the largest id of every row
  assert np.all(ids[:, 0] == 49406) and np.all(ids[np.arange(3), eot] == 49407), ids
  assert eot[2] == 76 and np.all(ids[0, eot[0] + 1:] == 0)  # truncation keeps the EOT; zero padding
  np.testing.assert_array_equal(clip.tokenize(CAPTIONS, context_length=16),
                                open_clip.get_tokenizer("ViT-B-32", context_length=16)(CAPTIONS).numpy())


def test_parity_tiny(tiny):
  """Both towers and the logits of ``__call__``; ids cut after the longest EOT give the same text embeddings."""
  config, net, params = tiny
  pixels, ids = _pixels(config, 2, seed=0), clip.tokenize(CAPTIONS)
  want_image, want_text, scale = _torch_embeddings(net, pixels, ids)
  model = clip.build_model(config)
  image, text = _encode(model)(params, pixels, ids)
  errors = {"image": _max_diff(image, want_image), "text": _max_diff(text, want_text)}
  out = jax.jit(model.apply)({"params": params}, pixels, ids)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  errors["logits"] = _max_diff(out.logits, scale * unit(want_image) @ unit(want_text).T) / scale
  short = ids[:2, :np.argmax(ids[:2], -1).max() + 1]  # cut after the later EOT: causal, so padding is inert
  errors["short_ids"] = _max_diff(_encode(model)(params, pixels, short)[1], want_text[:2])
  print("tiny parity:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert out.logits.shape == (2, 3) and np.std(want_text) > 0.1 and np.std(want_image) > 0.1
  assert max(errors.values()) < TOL, errors


def test_parity_quick_gelu():
  """OpenAI's activation (x sigmoid(1.702 x), open_clip's ``quick_gelu=True``) in both towers."""
  config = clip.clip_config("tiny", quick_gelu=True)
  torch.manual_seed(2)
  net = open_clip.model.CLIP(**convert.open_clip_kwargs(config)).eval()
  pixels, ids = _pixels(config, 2, seed=7), clip.tokenize(CAPTIONS)
  want_image, want_text, _ = _torch_embeddings(net, pixels, ids)
  image, text = _encode(clip.build_model(config))(convert.params_from_torch(net.state_dict(), config), pixels, ids)
  assert max(_max_diff(image, want_image), _max_diff(text, want_text)) < TOL


def test_parity_vit_b32():
  """open_clip's ViT-B-32 (random init, GELU) on random pixels and three captions."""
  config = clip.clip_config("ViT-B-32")
  torch.manual_seed(1)
  net = open_clip.create_model("ViT-B-32", pretrained=None).eval()
  params = convert.params_from_torch(net.state_dict(), config)
  pixels, ids = _pixels(config, 2, seed=1), clip.tokenize(CAPTIONS)
  want_image, want_text, _ = _torch_embeddings(net, pixels, ids)
  image, text = _encode(clip.build_model(config))(params, pixels, ids)
  errors = {"image": _max_diff(image, want_image), "text": _max_diff(text, want_text)}
  print("ViT-B-32 parity:", {k: f"{v:.1e}" for k, v in errors.items()},
        f"(|image| max {np.abs(want_image).max():.2f}, |text| max {np.abs(want_text).max():.2f})")
  assert max(errors.values()) < TOL, errors


def test_gradient_to_pixels_only(tiny):
  """d sum(cos) / d pixels of frozen_similarity matches torch autograd; the params' gradient is zero."""
  config, net, params = tiny
  model = clip.build_model(config)
  pixels, ids = _pixels(config, 3, seed=2), clip.tokenize(CAPTIONS)
  loss = lambda p, x: jnp.sum(clip.frozen_similarity(p, x, ids, model=model))
  g_params, g_pixels = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, pixels)
  want = _torch_pixel_grad(net, pixels, ids)
  rel = _max_diff(g_pixels, want) / float(np.max(np.abs(want)))
  print(f"pixel gradient: max rel error {rel:.1e}")
  assert np.all(np.isfinite(g_pixels)) and rel < 1e-3, rel
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_params))


def _torch_pixel_grad(net, pixels, ids):
  x = _nchw(pixels).requires_grad_()
  image = F.normalize(net.encode_image(x), dim=-1)
  text = F.normalize(net.encode_text(torch.tensor(ids).long()), dim=-1)
  (grad,) = torch.autograd.grad((image * text).sum(), x)
  return grad.permute(0, 2, 3, 1).numpy()


def _smooth_image(height, width, seed):
  """A uint8 photo-like image: random 16x16-pixel colour cells, bilinearly blended (PIL)."""
  cells = np.random.default_rng(seed).integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR))


def test_preprocess_shapes_and_normalisation():
  """Short side to S, centre crop, CLIP mean/std; uint8, [0, 1] and [-1, 1] inputs agree; gradients flow."""
  image = _smooth_image(48, 80, seed=3)[None]
  x01 = image.astype(np.float32) / 255
  out = clip.preprocess(image, image_size=32)
  assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(clip.preprocess(x01, image_size=32), out, atol=1e-5)
  np.testing.assert_allclose(clip.preprocess(2 * x01 - 1, image_size=32, value_range=(-1.0, 1.0)), out, atol=1e-5)
  grey = np.broadcast_to(np.asarray(clip.CLIP_MEAN, np.float32), (1, 40, 30, 3))
  np.testing.assert_allclose(clip.preprocess(grey, image_size=32), 0.0, atol=1e-5)  # mean -> 0
  assert clip.resized_shape(48, 80, 32) == (32, 53) and clip.resized_shape(300, 200, 224) == (336, 224)
  same = clip.preprocess(x01[:, :32, :35], image_size=32)  # no resize: the crop alone, offset round(3 / 2) = 2
  np.testing.assert_allclose(same, (x01[:, :32, 2:34] - np.asarray(clip.CLIP_MEAN)) / np.asarray(clip.CLIP_STD),
                             atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(clip.preprocess(x, image_size=32) ** 2))(x01)
  assert np.all(np.isfinite(grad)) and np.max(np.abs(grad)) > 0


def test_preprocess_against_open_clip():
  """Measured against open_clip's eval transform (Resize(224, bicubic) + CenterCrop + Normalize), in normalised
  units (1/255 in pixel values is ~0.015 here). Float tensors (torchvision's antialiased bicubic, Keys
  a = -0.5, as jax.image.resize): equal within 1e-4. PIL images (the usual path from disk: PIL rounds each
  of its two resize passes to uint8 and clips the overshoot): within 0.02 (about 1.3/255) on a smooth image,
  mean 0.005; on white noise the clipped overshoot reaches ~0.45 at a few pixels, mean 0.006."""
  transform = image_transform(224, is_train=False)
  measured = {}
  for name, image in [("smooth", _smooth_image(300, 400, seed=4)),
                      ("noise", np.random.default_rng(5).integers(0, 256, (256, 200, 3), dtype=np.uint8))]:
    got = np.asarray(clip.preprocess(image[None], image_size=224))[0]
    from_pil = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
    from_tensor = transform(torch.tensor(image).permute(2, 0, 1).float() / 255).permute(1, 2, 0).numpy()
    measured[name] = (_max_diff(got, from_tensor), _max_diff(got, from_pil), float(np.mean(np.abs(got - from_pil))))
  print("preprocess |jax - open_clip| (tensor max, PIL max, PIL mean):",
        {k: tuple(f"{v:.1e}" for v in vs) for k, vs in measured.items()})
  assert measured["smooth"][0] < 1e-4 and measured["noise"][0] < 1e-4, measured
  assert measured["smooth"][1] < 0.02 and measured["smooth"][2] < 0.006, measured
  assert measured["noise"][1] < 0.5 and measured["noise"][2] < 0.01, measured


def test_bfloat16(tiny):
  """dtype bfloat16 (float32 params): embeddings within a few percent of float32, and not the same numbers."""
  config, _, params = tiny
  pixels, ids = _pixels(config, 2, seed=6), clip.tokenize(CAPTIONS)
  full = _encode(clip.build_model(config))(params, pixels, ids)
  low = _encode(clip.build_model(clip.clip_config("tiny", dtype="bfloat16")))(params, pixels, ids)
  for a, b in zip(low, full):
    assert a.dtype == jnp.float32 and not np.array_equal(a, b)
    rel = _max_diff(a, b) / float(np.max(np.abs(b)))
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print(f"bfloat16 vs float32: max rel diff {rel:.1e}, min cosine {np.min(cos):.5f}")
    assert rel < 0.05 and np.min(cos) > 0.999, (rel, cos)


def test_conversion_errors(tiny):
  config, net, params = tiny
  state = net.state_dict()
  openai = {f"module.{k}": v for k, v in state.items()}
  openai.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
  jax.tree.map(np.testing.assert_array_equal, convert.params_from_torch(openai, config), params)
  broken = dict(state, logit_bias=torch.zeros(()))
  del broken["visual.ln_post.weight"]
  with pytest.raises(convert.ConversionError) as e:
    convert.params_from_torch(broken, config)
  assert "1 unknown keys (no counterpart in the model) (logit_bias)" in str(e.value)
  assert "1 keys missing from the state dict (visual.ln_post.weight)" in str(e.value)
  with pytest.raises(convert.ConversionError, match=r"shape mismatches .*visual.conv1.weight \(64, 3, 8, 8\) -> "
                     r"visual/conv1/kernel expects \(4, 4, 3, 64\)"):
    convert.params_from_torch(state, clip.clip_config("tiny", patch_size=4))
  with pytest.raises(convert.ConversionError, match="not a state dict of open_clip CLIP"):
    convert.params_from_torch({"encoder.weight": np.zeros(3)}, config)
  assert convert.config_from_state_dict(state, head_width=32) == config
  assert convert.config_from_state_dict(openai, head_width=32) == config


def test_cli(tiny, tmp_path):
  """The CLI converts a saved open_clip state dict; io.load_params restores exactly the converted params."""
  _, net, params = tiny
  weights, out = str(tmp_path / "clip.pth"), str(tmp_path / "clip.npz")
  torch.save(net.state_dict(), weights)
  tool = [sys.executable, os.path.join(ROOT, "tools", "convert_clip.py"), "--model=tiny",
          f"--checkpoint={weights}", f"--out={out}"]
  subprocess.run(tool, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
  jax.tree.map(np.testing.assert_array_equal, io.load_params(out), params)


@pytest.mark.slow
def test_cli_random_init(tmp_path):
  """``--random_init``: open_clip's random model of ``--model`` under ``torch.manual_seed(--seed)``."""
  out = str(tmp_path / "clip.npz")
  tool = [sys.executable, os.path.join(ROOT, "tools", "convert_clip.py"), "--model=tiny", "--random_init",
          "--seed=3", f"--out={out}"]
  subprocess.run(tool, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
  config = clip.clip_config("tiny")
  torch.manual_seed(3)
  want = convert.params_from_torch(open_clip.model.CLIP(**convert.open_clip_kwargs(config)).state_dict(), config)
  jax.tree.map(np.testing.assert_array_equal, io.load_params(out), want)
