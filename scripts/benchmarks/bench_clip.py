r"""CLIP embedding speed: the Flax CLIP (``bigen_jax.models.clip``) vs open_clip's PyTorch model holding the
same weights.

  python scripts/benchmarks/bench_clip.py --config tiny --batch 16 --steps 10 --threads 2
  python scripts/benchmarks/bench_clip.py --config vit_b32 --batch 8 --steps 5 --threads 2

Both embed ``--batch`` random images (preprocessed pixels at the config's size, JAX NHWC, PyTorch NCHW) and
``--batch`` captions (open_clip's tokenizer, context 77) with the open_clip model of the config (random
init, ``open_clip.model.CLIP``) and its conversion (``convert.clip.params_from_torch``); their embeddings
must agree within 1e-3 before anything is timed. PyTorch runs ``encode_image`` / ``encode_text`` under
``torch.inference_mode``, JAX one jitted ``encode_image`` / ``encode_text``, both with ``--threads`` CPU
threads. Prints images/s and texts/s of both (1 / median call time x batch, warm-up and compilation
excluded) and the ratio. PyTorch is timed first; JAX's thread pool is idle meanwhile.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import timing  # pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_enum("config", "vit_b32", ["tiny", "vit_b32", "vit_b16"], "CLIP config (clip.clip_config).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images (and captions) per call.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (compilation, allocation).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")
_TOLERANCE = 1e-3
_WORDS = ("a", "photo", "of", "red", "dog", "cat", "running", "on", "the", "beach", "two", "buses", "near", "tree")


def _captions(batch: int, rng: np.random.Generator) -> list[str]:
  return [" ".join(rng.choice(_WORDS, size=rng.integers(3, 20))) for _ in range(batch)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  import jax  # pylint: disable=g-import-not-at-top
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import clip as convert  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import clip  # pylint: disable=g-import-not-at-top
  config = clip.clip_config(_CONFIG.value)
  torch.manual_seed(0)
  net = open_clip.model.CLIP(**convert.open_clip_kwargs(config)).eval()
  params = jax.device_put(convert.params_from_torch(net.state_dict(), config))
  model = clip.build_model(config)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(_BATCH.value, config.image_size, config.image_size, 3)).astype(np.float32)
  ids = clip.tokenize(_captions(_BATCH.value, rng), context_length=config.context_length)
  encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
  encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))

  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = net.to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)  # NCHW
  torch_ids = torch.from_numpy(ids).long().to(device)
  with torch.inference_mode():
    diffs = {"image": float(np.abs(net.encode_image(torch_pixels).cpu().numpy()
                                   - np.asarray(encode_image(params, pixels))).max()),
             "text": float(np.abs(net.encode_text(torch_ids).cpu().numpy()
                                  - np.asarray(encode_text(params, ids))).max())}
  if not max(diffs.values()) <= _TOLERANCE:
    raise AssertionError(f"Flax and PyTorch embeddings differ: {diffs} > {_TOLERANCE}")

  def torch_rate(fn, x):
    def step():
      with torch.inference_mode():
        fn(x)
      sync()
    return timing.steps_per_second(step, steps=_STEPS.value, warmup=_WARMUP.value)

  torch_rates = {"images": torch_rate(net.encode_image, torch_pixels), "texts": torch_rate(net.encode_text, torch_ids)}
  jax_pixels, jax_ids = jax.device_put(pixels), jax.device_put(ids)
  flax_rates = {
      "images": timing.steps_per_second(lambda: jax.block_until_ready(encode_image(params, jax_pixels)),
                                        steps=_STEPS.value, warmup=_WARMUP.value),
      "texts": timing.steps_per_second(lambda: jax.block_until_ready(encode_text(params, jax_ids)),
                                       steps=_STEPS.value, warmup=_WARMUP.value)}
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  print(f"config={_CONFIG.value} ({num_params / 1e6:.1f}M params, {config.image_size} px / patch "
        f"{config.patch_size}, context {config.context_length}) batch={_BATCH.value} threads={threads} "
        f"device={jax.devices()[0].device_kind} torch={device} max |flax - torch| image {diffs['image']:.1e} "
        f"text {diffs['text']:.1e}")
  print(f"{'':8s} {'flax /s':>10s} {'torch /s':>10s} {'flax / torch':>13s}")
  for name in ("images", "texts"):
    flax_per_s, torch_per_s = flax_rates[name] * _BATCH.value, torch_rates[name] * _BATCH.value
    print(f"{name:8s} {flax_per_s:10.1f} {torch_per_s:10.1f} {flax_per_s / torch_per_s:12.2f}x")
  ours, peer = ({name: rate * _BATCH.value for name, rate in rates.items()} for rates in (flax_rates, torch_rates))
  timing.write_result(_JSON.value, ours=ours["images"], peer=peer["images"], unit="images/s",
                      texts=timing.result(ours=ours["texts"], peer=peer["texts"], unit="texts/s"))


if __name__ == "__main__":
  app.run(main)
