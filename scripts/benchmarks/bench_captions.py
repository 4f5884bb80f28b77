r"""Caption decoding speed: the compiled ``greedy_captions`` vs the same greedy loop in PyTorch with Hugging Face
``LxmertModel`` and its tied text head, at the same config and weights.

  python scripts/benchmarks/bench_captions.py --config small --batch 16 --threads 1
  python scripts/benchmarks/bench_captions.py --config paper --batch 256 --dtype bfloat16   # one GPU

Both decode ``--batch`` images (``num_cells`` cells of random dense features, grid boxes) into greedy captions of
the config's ``max_len`` (17 ids) in the paper's "mask" layout: step l = 1..max_len-1 puts [MASK] at l after the
words so far, hides the later positions, runs the language and cross-modality layers and reads the text head
(transform, decoder tied to the word embeddings, bias) at position l alone; the log-softmax never produces
[CLS]/[MASK]/[PAD], only [SEP] at the last position, and ended captions get [PAD]. Both run every step (no early
exit once all captions have ended: the compiled scan has none).

Each side computes the images' vision stream (visual embedding + vision layers) once per decode, as it depends on
the image alone. JAX: ``captions.encode_vision`` before one jitted ``lax.scan``. PyTorch: ``LxmertModel.forward``
takes no precomputed vision stream, so the loop calls its public submodules in ``LxmertEncoder.forward``'s order
(``encoder.visn_fc`` and ``encoder.r_layers`` once; ``embeddings``, ``encoder.layer`` and ``encoder.x_layers``
each step; ``cls.predictions`` of ``LxmertForPreTraining`` as the text head), eagerly under
``torch.inference_mode`` on CUDA when available, with ``torch.autocast`` to bfloat16 for ``--dtype bfloat16``
(JAX: the model's compute dtype, float32 params). The weights are HF's random initialisation converted with
``bigen_jax.convert.lxmert``, so both decode the same captions up to float rounding at near-ties; the fraction
of identical captions is printed and written. Prints captions/s (batch / median decode time, compilation
excluded) and the ratio.
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
_BATCH = flags.DEFINE_integer("batch", 16, "Images per decode.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed decodes.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed decodes first (compilation, allocation).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU threads of both frameworks (default: all cores).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch.")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")

CLS, SEP, MASK, PAD = 2, 3, 4, 0


def _inputs(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Dense features [B, M, D] ~ N(0, 1) and the boxes [B, M, 4] of a sqrt(M) x sqrt(M) grid."""
  from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  grid = records.grid_boxes(round(config.num_cells ** 0.5))
  return {"feats": rng.normal(size=(batch, config.num_cells, config.visual_feat_dim)).astype(np.float32),
          "boxes": np.broadcast_to(grid, (batch, *grid.shape)).copy()}


def _torch_model(config):
  """HF's ``LxmertForPreTraining`` at ``config`` (no object or QA heads), randomly initialised, eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LxmertForPreTraining  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import lxmert as convert  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return LxmertForPreTraining(convert.hf_config(config, task_obj_predict=False, task_qa=False)).eval()


def bench_torch(hf, config, x) -> tuple[float, np.ndarray, str]:
  """(decodes/s, the captions int [B, L], device) of the greedy loop in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = hf.to(device)
  model, head, enc = hf.lxmert, hf.cls.predictions, hf.lxmert.encoder
  feats, boxes = (torch.from_numpy(x[k]).to(device) for k in ("feats", "boxes"))
  batch, length = feats.shape[0], config.max_len
  positions = torch.arange(length, device=device)
  never = torch.tensor([CLS, MASK, PAD], device=device)
  only_sep = torch.full((config.vocab_size,), -torch.inf, device=device)
  only_sep[SEP] = 0.0
  min_value = torch.finfo(torch.float32).min
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  out = []

  def decode():
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16"):
      vision = enc.visn_fc(feats, boxes)
      for layer in enc.r_layers:
        vision = layer(vision, None)[0]
      ids = torch.full((batch, length), PAD, dtype=torch.long, device=device)
      ids[:, 0] = CLS
      done = torch.zeros(batch, dtype=torch.bool, device=device)
      for l in range(1, length):
        inputs = ids.clone()
        inputs[:, l] = MASK
        keys = (1.0 - (positions <= l).float())[None, None, None, :] * min_value  # HF's extended mask [1, 1, 1, L]
        lang = model.embeddings(inputs, torch.zeros_like(inputs))
        for layer in enc.layer:
          lang = layer(lang, keys)[0]
        v = vision
        for layer in enc.x_layers:
          lang, v = layer(lang, keys, v, None)[:2]
        logits = head(lang[:, l]).float()
        logits[:, never] = -torch.inf
        if l == length - 1:
          logits = only_sep.expand_as(logits)
        word = torch.log_softmax(logits, dim=-1).argmax(-1)
        word = torch.where(done, PAD, word)
        ids[:, l] = word
        done |= word == SEP
    sync()
    out[:] = [ids]

  rate = timing.steps_per_second(decode, steps=_STEPS.value, warmup=_WARMUP.value)
  return rate, out[0].cpu().numpy(), device


def bench_jax(params, config, x) -> tuple[float, np.ndarray]:
  """(decodes/s, the captions int32 [B, L]) of the jitted ``captions.greedy_captions``."""
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.sampling import captions  # pylint: disable=g-import-not-at-top
  model = lxmert.build_model(config)
  tokens = captions.Tokens(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD)
  params, x = jax.device_put((params, x))
  decode = jax.jit(lambda p, feats, boxes: captions.greedy_captions(
      p, model=model, visual={"visual_feats": feats}, boxes=boxes, max_len=config.max_len, tokens=tokens))
  rate = timing.steps_per_second(lambda: jax.block_until_ready(decode(params, x["feats"], x["boxes"])),
                                 steps=_STEPS.value, warmup=_WARMUP.value)
  return rate, np.asarray(decode(params, x["feats"], x["boxes"]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  config = model_configs.get_config(_CONFIG.value)
  config.update(dict(dtype=_DTYPE.value, dropout_rate=0.0, attention_dropout_rate=0.0))
  x = _inputs(config, _BATCH.value)
  hf = _torch_model(config)
  from bigen_jax.convert import lxmert as convert  # pylint: disable=g-import-not-at-top
  params = convert.params_from_torch(hf.state_dict(), config, init_missing_heads=True)
  torch_rate, torch_ids, torch_device = bench_torch(hf, config, x) if _TORCH.value else (None, None, None)
  del hf
  if torch_device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.empty_cache()  # before JAX allocates its share of the GPU
  import jax  # pylint: disable=g-import-not-at-top
  jax_rate, jax_ids = bench_jax(params, config, x)
  batch = _BATCH.value
  print(f"config={_CONFIG.value} batch={batch} max_len={config.max_len} vocab={config.vocab_size} "
        f"dtype={_DTYPE.value} threads={threads} device={jax.devices()[0].device_kind}")
  print(f"jax:   {jax_rate * batch:9.1f} captions/s  ({jax_rate:.3f} decodes/s)")
  equal = None
  if torch_rate is not None:
    equal = float(np.mean(np.all(jax_ids == torch_ids, axis=1)))
    print(f"torch: {torch_rate * batch:9.1f} captions/s  ({torch_rate:.3f} decodes/s, {torch_device})")
    print(f"jax / torch = {jax_rate / torch_rate:.2f}x; identical captions {100 * equal:.1f}%")
  timing.write_result(_JSON.value, ours=jax_rate * batch, peer=None if torch_rate is None else torch_rate * batch,
                      unit="captions/s", captions_equal=equal)


if __name__ == "__main__":
  app.run(main)
