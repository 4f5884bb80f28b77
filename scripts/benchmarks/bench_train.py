r"""Training steps/s of the project's trainer step vs an equivalent PyTorch step of Hugging Face LXMERT.

  python scripts/benchmarks/bench_train.py --config small --batch 16 --steps 10 --threads 2
  python scripts/benchmarks/bench_train.py --config paper --batch 64 --dtype bfloat16 --peak_tflops 989 --fsdp

Flax: the I2T update of ``bigen_jax/train.py`` itself (``make_train_step``: one [MASK] per caption, text head
at that position, label-smoothed cross-entropy, global-norm clipping, AdamW, sharded state, donation).
PyTorch: ``LxmertModel`` + a tied text head at the same position, the same loss, clipping and
``torch.optim.AdamW``, same config, batch, dropout and thread count. Prints steps/s of both and the ratio;
with ``--peak_tflops`` the model FLOPs utilisation (analytic FLOPs, ``bigen_jax.models.flops``); on a GPU the
peak memory of the JAX step, and on any backend XLA's compiled per-device footprint (arguments + outputs +
temporaries, ``Compiled.memory_analysis``), with parameters replicated or (``--fsdp``) sharded over the
devices. On CPU, simulate devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
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
_BATCH = flags.DEFINE_integer("batch", 16, "Examples per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation, allocation).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device, for MFU.")
_SCAN = flags.DEFINE_bool("scan_layers", None, "Override the model config's scan_layers.")
_REMAT = flags.DEFINE_enum("remat", None, ["nothing", "dots", "dots_all"],
                           "Rematerialise each layer with this policy (configs/model.py remat_policy).")
_FUSED = flags.DEFINE_bool("fused_projections", None, "Override the model config's fused_projections (q, k, v "
                           "as one matmul).")
_FSDP = flags.DEFINE_bool("fsdp", False, "Shard params and optimizer state over all devices (fsdp axis).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch.")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")

MASK_ID, PAD_ID = 4, 0


def _batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.vocab_size, (batch, config.max_len)).astype(np.int32)
  return {"text_ids": ids, "text_mask": np.ones_like(ids),
          "dense": rng.normal(size=(batch, config.num_cells, config.visual_feat_dim)).astype(np.float32),
          "boxes": rng.uniform(size=(batch, config.num_cells, 4)).astype(np.float32),
          "cluster_ids": rng.integers(0, config.num_clusters, (batch, config.num_cells)).astype(np.int32),
          "positions": rng.integers(1, config.max_len, batch).astype(np.int64)}


def _train_config(model_config):
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.model = model_config
  config.mesh.update(dict(data=1, fsdp=-1) if _FSDP.value else dict(data=-1, fsdp=1))
  return config


def bench_flax(config, batch):
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bigen_jax import experiment, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from bigen_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  mesh, rules = parallel.make_mesh(config), parallel.axis_rules(config)
  codebook = np.random.default_rng(1).normal(size=(config.model.num_clusters, config.model.visual_feat_dim))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  task_cfg = ml_collections.FrozenConfigDict({**config.tasks.i2t.to_dict(), "mask_id": MASK_ID, "pad_id": PAD_ID})
  ctx = experiment.Context(config=config, model=lxmert.build_model(config.model), mesh=mesh, rules=rules,
                           frozen={"codebook": jax.device_put(codebook.astype(np.float32), replicated)},
                           task_cfgs={"i2t": task_cfg}, tokenizer=None)
  tx, schedule = optim.make_optimizer(config.optimizer, 1000)
  _, shardings, init = state_lib.create_state(ctx, tx, codebook.astype(np.float32))
  state = [init(jax.random.key(0))]
  global_batch = ctx.batch_to_global(batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = train.make_train_step(ctx, "i2t", tx, schedule, shardings)

    def run():
      state[0], metrics = step(state[0], global_batch, ctx.frozen)
      jax.block_until_ready(metrics)

    analysis = step.lower(state[0], global_batch, ctx.frozen).compile().memory_analysis()
    rate = timing.steps_per_second(run, steps=_STEPS.value, warmup=_WARMUP.value)
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
  return rate, peak, analysis


def bench_torch(config, batch):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LxmertModel  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import lxmert as convert  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  m = config.model
  model = LxmertModel(convert.hf_config(m)).to(device).train()
  transform = torch.nn.Sequential(torch.nn.Linear(m.hidden_size, m.hidden_size), torch.nn.GELU(),
                                  torch.nn.LayerNorm(m.hidden_size, eps=1e-12)).to(device)
  bias = torch.nn.Parameter(torch.zeros(m.vocab_size, device=device))
  params = list(model.parameters()) + list(transform.parameters()) + [bias]
  opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
  x = {k: torch.tensor(v, device=device) for k, v in batch.items()}
  index = torch.arange(m.max_len, device=device)[None]
  l = x["positions"][:, None]
  ids = torch.where(index == l, MASK_ID, torch.where(index < l, x["text_ids"].long(), PAD_ID))
  mask = (index <= l).long()
  targets = x["text_ids"].long().gather(1, l)[:, 0]
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  rows = torch.arange(ids.shape[0], device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=m.dtype == "bfloat16"):
      out = model(input_ids=ids, attention_mask=mask, visual_feats=x["dense"], visual_pos=x["boxes"])
      hidden = transform(out.language_output[rows, x["positions"]])
      logits = hidden @ model.embeddings.word_embeddings.weight.T + bias
      loss = torch.nn.functional.cross_entropy(logits.float(), targets, label_smoothing=0.2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sync()

  return timing.steps_per_second(step, steps=_STEPS.value, warmup=_WARMUP.value), device


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  model_config = model_configs.get_config(_CONFIG.value)
  model_config.dtype = _DTYPE.value
  if _SCAN.value is not None:
    model_config.scan_layers = _SCAN.value
  if _REMAT.value:
    model_config.remat, model_config.remat_policy = True, _REMAT.value
  if _FUSED.value is not None:
    model_config.fused_projections = _FUSED.value
  config = _train_config(model_config)
  batch = _batch(model_config, _BATCH.value)
  torch_rate, torch_device = bench_torch(config, batch) if _TORCH.value else (None, None)  # before JAX starts
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  print(f"config={_CONFIG.value} batch={_BATCH.value} dtype={_DTYPE.value} threads={threads} "
        f"devices={jax.device_count()}x{jax.devices()[0].device_kind} fsdp={_FSDP.value}")
  flax_rate, peak, compiled = bench_flax(config, batch)
  step_flops = metrics_lib.model_flops_per_example(config, ["i2t"]) * _BATCH.value
  line = f"flax:  {flax_rate:8.3f} steps/s  {flax_rate * _BATCH.value:9.1f} examples/s"
  if _PEAK_TFLOPS.value:
    mfu = flax_rate * step_flops / (_PEAK_TFLOPS.value * 1e12 * jax.device_count())
    line += f"  MFU {100 * mfu:.1f}%"
  if peak:
    line += f"  peak memory {peak / 2**30:.2f} GiB/device"
  if compiled:
    state_bytes = compiled.argument_size_in_bytes
    total = state_bytes + compiled.output_size_in_bytes + compiled.temp_size_in_bytes - compiled.alias_size_in_bytes
    line += (f"  compiled per device: {total / 2**20:.1f} MiB "
             f"(arguments {state_bytes / 2**20:.1f}, temporaries {compiled.temp_size_in_bytes / 2**20:.1f})")
  print(line)
  if torch_rate is not None:
    print(f"torch: {torch_rate:8.3f} steps/s  {torch_rate * _BATCH.value:9.1f} examples/s  ({torch_device})")
    print(f"flax / torch = {flax_rate / torch_rate:.2f}x")
  timing.write_result(_JSON.value, ours=flax_rate, peer=torch_rate, unit="steps/s")


if __name__ == "__main__":
  app.run(main)
