r"""Forward+backward throughput of the Flax model vs Hugging Face's PyTorch ``LxmertModel``.

  python scripts/benchmarks/bench_model.py --config small --batch 8 --steps 10 --threads 2
  python scripts/benchmarks/bench_model.py --config paper --batch 64 --dtype bfloat16 --peak_tflops 989

Both frameworks run the encoders (no heads) at the same config, batch and thread count, on random inputs,
in training mode (dropout 0.1), and take gradients of the same loss (mean of squared language and vision
outputs) w.r.t. all parameters (no optimiser update). Warm-up steps (compilation included) are excluded;
a rate is 1 / the median step time. PyTorch runs first, before JAX starts its thread pool. Prints steps/s
of both and their ratio, and the model FLOP/s (analytic count, ``bigen_jax.models.flops``) with MFU when
``--peak_tflops`` is given (on a GPU: H100 SXM bf16 dense ~989). On a CPU shared with other processes use
``--threads 1``: PyTorch's OpenMP threads slow down erratically when cores are oversubscribed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

import timing  # pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_enum("config", "small", ["tiny", "small", "paper"], "Model config (configs/model.py).")
_BATCH = flags.DEFINE_integer("batch", 8, "Examples per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps first (compilation, allocation).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of the device, for MFU.")
_SCAN = flags.DEFINE_bool("scan_layers", None, "Override config.scan_layers.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise layers (Flax).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch.")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")


# The parameters of Hugging Face's ``LxmertModel`` (embeddings, the three stacks): gradients are taken of these
# alone, as PyTorch allocates none for parameters a loss does not reach (the heads; JAX would fill zeros for them).
ENCODER = ("text_embed", "visual_embed", "language", "vision", "cross")


def _inputs(config, batch: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return dict(text_ids=rng.integers(1, config.vocab_size, (batch, config.max_len)).astype(np.int32),
              text_mask=np.ones((batch, config.max_len), np.int32),
              visual_feats=rng.normal(size=(batch, config.num_cells, config.visual_feat_dim)).astype(np.float32),
              boxes=rng.uniform(size=(batch, config.num_cells, 4)).astype(np.float32))


def bench_flax(config, inputs) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  model = lxmert.build_model(config)
  params = jax.jit(lambda k: nn.unbox(lxmert.init_params(model, config, k)))(jax.random.key(0))
  inputs = jax.device_put(inputs)

  encoder = {k: v for k, v in params.items() if k in ENCODER}
  heads = {k: v for k, v in params.items() if k not in ENCODER}

  @jax.jit
  def grad_step(p, x, rng):
    def loss(p):
      out = model.apply({"params": {**p, **heads}}, **x, deterministic=False, rngs={"dropout": rng})
      return (jnp.mean(out.language.astype(jnp.float32) ** 2) + jnp.mean(out.vision.astype(jnp.float32) ** 2))
    return jax.grad(loss)(p)

  rng = jax.random.key(1)
  return timing.steps_per_second(lambda: jax.block_until_ready(grad_step(encoder, inputs, rng)),
                                 steps=_STEPS.value, warmup=_WARMUP.value)


def bench_torch(config, inputs) -> tuple[float, str]:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LxmertModel  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import lxmert as convert  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = LxmertModel(convert.hf_config(config)).to(device).train()
  x = {k: torch.tensor(v, device=device) for k, v in inputs.items()}
  x["text_ids"], x["text_mask"] = x["text_ids"].long(), x["text_mask"].long()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
      out = model(input_ids=x["text_ids"], attention_mask=x["text_mask"], visual_feats=x["visual_feats"],
                  visual_pos=x["boxes"])
      loss = out.language_output.float().pow(2).mean() + out.vision_output.float().pow(2).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    sync()

  return timing.steps_per_second(step, steps=_STEPS.value, warmup=_WARMUP.value), device


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  import jax  # pylint: disable=g-import-not-at-top  (no computation before the torch run)
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import flops  # pylint: disable=g-import-not-at-top
  config = model_configs.get_config(_CONFIG.value)
  config.dtype = _DTYPE.value
  config.remat = _REMAT.value
  if _SCAN.value is not None:
    config.scan_layers = _SCAN.value
  inputs = _inputs(config, _BATCH.value)
  torch_rate, torch_device = bench_torch(config, inputs) if _TORCH.value else (None, None)  # before JAX's threads
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  print(f"config={_CONFIG.value} ({lxmert.count_params(config) / 1e6:.1f}M params with heads) batch={_BATCH.value} "
        f"dtype={_DTYPE.value} threads={threads} jax device={jax.devices()[0].device_kind}")
  flax_rate = bench_flax(config, inputs)
  model_flops = flops.train_flops(config) * _BATCH.value
  line = f"flax:  {flax_rate:8.3f} steps/s  {flax_rate * _BATCH.value:9.1f} examples/s  " \
         f"{flax_rate * model_flops / 1e12:8.3f} model TFLOP/s"
  if _PEAK_TFLOPS.value:
    line += f"  MFU {100 * flax_rate * model_flops / (_PEAK_TFLOPS.value * 1e12):.1f}%"
  print(line)
  if torch_rate is not None:
    print(f"torch: {torch_rate:8.3f} steps/s  {torch_rate * _BATCH.value:9.1f} examples/s  "
          f"{torch_rate * model_flops / 1e12:8.3f} model TFLOP/s  ({torch_device})")
    print(f"flax / torch = {flax_rate / torch_rate:.2f}x")
  timing.write_result(_JSON.value, ours=flax_rate, peer=torch_rate, unit="steps/s")

if __name__ == "__main__":
  app.run(main)
