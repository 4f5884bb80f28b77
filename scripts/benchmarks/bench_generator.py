r"""Image generation speed: the frozen Flax SPADE generator (``spade.decode_image``) vs its PyTorch twin
(``torch_spade.TorchGenerator``) holding the same weights.

  python scripts/benchmarks/bench_generator.py --config demo --batch 8 --steps 10 --threads 1
  python scripts/benchmarks/bench_generator.py --config paper --batch 2 --steps 5 --threads 1

Both turn ``--batch`` random centroid grids (8x8 cells of D features) into images at the config's size
(``spade.spade_config``: tiny 32 px, demo 128 px, paper 256 px), each in its native layout (JAX NHWC, PyTorch
NCHW), with the noise maps drawn inside the call (``jax.random.normal`` / ``torch.randn``). The weights are
one Flax init, copied into the twin (``torch_spade.from_flax``, spectral norm baked in); the noise scales
stay at their init, zero, so both compute the same images whatever noise they draw, and the outputs must
agree within 1e-3 before anything is timed. PyTorch runs under ``torch.inference_mode``, JAX one jitted
``decode_image``. Prints batches/s and images/s of both (1 / median call time, warm-up and compilation
excluded) and the ratio. JAX's init and the check come first; its thread pool is idle while PyTorch is timed.
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

_CONFIG = flags.DEFINE_enum("config", "demo", ["tiny", "demo", "paper"], "GAN config (spade.spade_config).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls.")
flags.DEFINE_alias("repeats", "steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (compilation, allocation).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")
_TOLERANCE = 1e-3


def bench_torch(net, grid: np.ndarray) -> tuple[float, str]:
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = net.to(device)
  x = torch.from_numpy(grid).permute(0, 3, 1, 2).contiguous().to(device)  # NCHW
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    with torch.inference_mode():
      net(x)
    sync()

  return timing.steps_per_second(step, steps=_STEPS.value, warmup=_WARMUP.value), device


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import spade  # pylint: disable=g-import-not-at-top
  import torch_spade  # pylint: disable=g-import-not-at-top
  config = spade.spade_config(_CONFIG.value)
  grid = np.random.default_rng(0).normal(size=(_BATCH.value, 8, 8, config.feature_dim)).astype(np.float32)
  variables = spade.init_generator(config, jax.random.key(0))
  decode = jax.jit(spade.decode_image)
  rng = jax.random.key(1)
  want = np.asarray(decode(variables, grid, rng))
  net = torch_spade.from_flax(variables)
  with torch.inference_mode():
    got = net(torch.from_numpy(grid).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  diff = float(np.abs(got - want).max())
  if not diff <= _TOLERANCE:
    raise AssertionError(f"Flax and PyTorch images differ by {diff:.2e} > {_TOLERANCE}")
  torch_rate, torch_device = bench_torch(net, grid)
  jax_grid = jax.device_put(grid)
  flax_rate = timing.steps_per_second(lambda: jax.block_until_ready(decode(variables, jax_grid, rng)),
                                      steps=_STEPS.value, warmup=_WARMUP.value)
  print(f"config={_CONFIG.value} ({spade.param_counts(config)['generator'] / 1e6:.2f}M params, "
        f"{config.image_size} px) batch={_BATCH.value} threads={threads} device={jax.devices()[0].device_kind} "
        f"max |flax - torch| = {diff:.1e} (mean |image| {float(np.abs(want).mean()):.2f})")
  print(f"flax:  {flax_rate:8.3f} batches/s  {flax_rate * _BATCH.value:8.2f} images/s")
  print(f"torch: {torch_rate:8.3f} batches/s  {torch_rate * _BATCH.value:8.2f} images/s  ({torch_device})")
  print(f"flax / torch = {flax_rate / torch_rate:.2f}x")
  timing.write_result(_JSON.value, ours=flax_rate * _BATCH.value, peer=torch_rate * _BATCH.value, unit="images/s")


if __name__ == "__main__":
  app.run(main)
