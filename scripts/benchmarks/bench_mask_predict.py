r"""Text-to-image decoding speed: the compiled ``parallel_decode`` vs the same mask-predict loop in PyTorch
with Hugging Face ``LxmertModel`` at the same config.

  python scripts/benchmarks/bench_mask_predict.py --config small --batch 16 --num_steps 4 --threads 2
  python scripts/benchmarks/bench_mask_predict.py --config paper --batch 64 --num_clusters 10000
  python scripts/benchmarks/bench_mask_predict.py --config paper --batch 256 --num_clusters 10000 --dtype bfloat16

Both decode ``--batch`` captions into an 8x8 grid of cluster ids with mask-predict-K (linear schedule,
argmax, re-mask the least confident cells of the whole grid): K forward passes of the cross-modality encoder
and the image head (transform, 768 -> D, D -> K clusters), the decided cells fed as codebook rows, masked
ones as the learned mask feature. PyTorch runs its loop eagerly under ``torch.inference_mode`` (on CUDA when
available; ``--dtype bfloat16``: under ``torch.autocast``); JAX runs one jitted ``lax.scan`` in the model's compute
dtype. Prints decodes/s (one decode: ``--batch`` grids) of both (1 / median time, compilation excluded) and the
ratio; the JSON also holds token grids/s.
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

_CONFIG = flags.DEFINE_enum("config", "small", ["tiny", "small", "paper"], "Model config (configs/model.py).")
_BATCH = flags.DEFINE_integer("batch", 16, "Captions per decode.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 4, "Mask-predict passes K.")
_NUM_CLUSTERS = flags.DEFINE_integer("num_clusters", 1000, "Visual vocabulary size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed decodes.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed decodes first (compilation).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch.")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")


def _inputs(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
  return {"text_ids": rng.integers(5, config.vocab_size, (batch, config.max_len)).astype(np.int32),
          "text_mask": np.ones((batch, config.max_len), np.int32),
          "boxes": np.broadcast_to(records.grid_boxes(), (batch, 64, 4)).copy(),
          "codebook": rng.normal(size=(config.num_clusters, config.visual_feat_dim)).astype(np.float32)}


def bench_torch(config, x) -> tuple[float, str]:
  """(decodes/s, device) of the mask-predict loop in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LxmertModel  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import lxmert as convert  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = LxmertModel(convert.hf_config(config)).to(device).eval()
  h, d = config.hidden_size, config.visual_feat_dim
  head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.GELU(), torch.nn.LayerNorm(h, eps=1e-12),
                             torch.nn.Linear(h, d), torch.nn.Linear(d, config.num_clusters)).to(device).eval()
  mask_feature = torch.randn(d, device=device)
  t = {k: torch.from_numpy(v).to(device) for k, v in x.items()}
  batch, cells, k = t["boxes"].shape[0], t["boxes"].shape[1], _NUM_STEPS.value
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def decode():
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16"):
      ids = torch.zeros(batch, cells, dtype=torch.long, device=device)
      masked = torch.ones(batch, cells, dtype=torch.bool, device=device)
      confidence = torch.zeros(batch, cells, device=device)
      for step in range(k):
        feats = torch.where(masked[..., None], mask_feature, t["codebook"][ids])
        out = model(input_ids=t["text_ids"].long(), attention_mask=t["text_mask"].long(), visual_feats=feats,
                    visual_pos=t["boxes"])
        prob, guess = head(out.vision_output).float().softmax(-1).max(-1)
        ids = torch.where(masked, guess, ids)
        confidence = torch.where(masked, prob, confidence)
        remask = cells * (k - 1 - step) // k
        ranks = confidence.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
        masked = ranks < remask
    sync()

  rate = timing.steps_per_second(decode, steps=_STEPS.value, warmup=_WARMUP.value)
  if device == "cuda":
    del model, head, t
    torch.cuda.empty_cache()  # before JAX allocates its share of the GPU
  return rate, device


def bench_jax(config, x) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import image_tokens  # pylint: disable=g-import-not-at-top
  model = lxmert.build_model(config)
  params = jax.jit(lambda key: nn.unbox(lxmert.init_params(model, config, key)))(jax.random.key(0))
  x = jax.device_put(x)
  decode = jax.jit(lambda p, x: image_tokens.parallel_decode(p, jax.random.key(0), model=model,
                                                             num_steps=_NUM_STEPS.value, **x)[0])
  return timing.steps_per_second(lambda: jax.block_until_ready(decode(params, x)), steps=_STEPS.value,
                                 warmup=_WARMUP.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  config = model_configs.get_config(_CONFIG.value)
  config.update(dict(dtype=_DTYPE.value, num_clusters=_NUM_CLUSTERS.value, vocab_size=1000, max_len=17,
                     num_cells=64, dropout_rate=0.0, attention_dropout_rate=0.0))
  if _CONFIG.value == "tiny":
    config.update(dict(max_position_embeddings=32))
  x = _inputs(config, _BATCH.value)
  torch_rate, torch_device = bench_torch(config, x) if _TORCH.value else (None, None)  # before JAX starts
  import jax  # pylint: disable=g-import-not-at-top
  jax_rate = bench_jax(config, x)
  batch = _BATCH.value
  print(f"config={_CONFIG.value} batch={batch} K={_NUM_STEPS.value} clusters={_NUM_CLUSTERS.value} "
        f"dtype={_DTYPE.value} threads={threads} device={jax.devices()[0].device_kind}")
  print(f"jax:   {jax_rate:8.3f} decodes/s  {jax_rate * batch:8.1f} images/s")
  if torch_rate is not None:
    print(f"torch: {torch_rate:8.3f} decodes/s  {torch_rate * batch:8.1f} images/s  ({torch_device})")
    print(f"jax / torch = {jax_rate / torch_rate:.2f}x")
  peer_grids = None if torch_rate is None else torch_rate * batch
  timing.write_result(_JSON.value, ours=jax_rate, peer=torch_rate, unit="decodes/s",
                      grids=timing.result(ours=jax_rate * batch, peer=peer_grids, unit="token grids/s"))


if __name__ == "__main__":
  app.run(main)
