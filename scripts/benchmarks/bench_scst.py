r"""SCST step speed: the in-graph CIDEr-D reward (``bigen_jax/tasks/scst.py``) vs the same step with the reward
computed on the host by pycocoevalcap.

  python scripts/benchmarks/bench_scst.py
  python scripts/benchmarks/bench_scst.py --config_arg tiny --batch 8 --steps 3
  python scripts/benchmarks/bench_scst.py --batch 64 --num_samples 5 --steps 5 --threads 2

Model: ``configs/demo.py:<--config_arg>``'s (demo: 2/2/2 layers, hidden 128; tiny: 1/1/1, hidden 32) with
random params, the sizes the data would decide from flags (defaults: the demo's 1,000-word vocabulary, 1,024
clusters, 27-dim features, captions of 16 ids); SCST as the config sets it (sampling temperature 1, I2T's
layout) with ``--num_samples``. Data: random dense features and boxes, and a synthetic corpus of ``--images``
images with ``--refs`` references each (``[CLS] w.. [SEP] [PAD]..``, 2 to 13 Zipf-distributed words); a batch
is its first ``--batch`` images, and the CIDEr-D table (``scst.reference_table``) is built from the whole corpus.

A, in-graph: ``jax.value_and_grad(scst.loss_fn)`` and an Adam update in one jitted step, as the trainer runs it
(rollouts, reward, teacher-forced log-probabilities, all compiled). B, host reward: the jitted
``scst.rollouts`` -> ``jax.device_get`` -> captions as strings of word ids (after [CLS], up to [SEP]; the
references likewise) -> pycocoevalcap ``Cider().compute_score`` of the samples and of the greedy captions ->
the advantage back to the device -> a jitted step of the loss -mean(advantage * ``scst.sequence_log_probs``)
and the same Adam update: the compiled work of A but for the reward. pycocoevalcap takes its document
frequencies from the references it is given (the batch's; each image counted ``--num_samples`` times when
scoring the samples), the in-graph table from the corpus: the reward values differ, the work is comparable.

Both start from the same params; after ``--warmup`` untimed steps of each (compilation), ``--steps`` timed
steps alternate A and B (a shared machine slows both alike). A time is the median over the steps, of wall time
and of the process's CPU time (all threads, XLA's included). Prints both, the ratio B / A and the median split
of B's wall time into rollout (with the copy to the host), host CIDEr-D (with the strings) and gradient step.
Checks the strings B scores: the in-graph CIDEr-D of B's captions, its document frequencies from the same
references, equals pycocoevalcap's (printed: the largest difference).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import timing  # pylint: disable=g-import-not-at-top

_CONFIG_ARG = flags.DEFINE_enum("config_arg", "demo", ["demo", "tiny"], "Model of configs/demo.py:<arg>.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1000, "Word vocabulary (the demo's WordPiece: at most 1,000).")
_NUM_CLUSTERS = flags.DEFINE_integer("num_clusters", 1024, "Visual vocabulary (the image head's classes).")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 27, "Dense feature dimension (the demo's: 27).")
_MAX_LEN = flags.DEFINE_integer("max_len", 16, "Caption length in ids, [CLS] and [SEP] included.")
_REFS = flags.DEFINE_integer("refs", 5, "References per image.")
_IMAGES = flags.DEFINE_integer("images", 1000, "Images of the synthetic corpus (the CIDEr-D table's documents).")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per step.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Sampled captions per image.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps of each.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps of each first (compilation).")
_THREADS = flags.DEFINE_integer("threads", None, "CPU cores to run on (default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of params, features and corpus.")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # tokenizer.SPECIAL_TOKENS' order


def _corpus(rng: np.random.Generator, *, images: int, refs: int, vocab: int, max_len: int) -> np.ndarray:
  """int32 [images, refs, max_len]: ``[CLS] w.. [SEP] [PAD]..`` with Zipf-distributed words (ids >= 5)."""
  out = np.full((images, refs, max_len), PAD, np.int32)
  lengths = rng.integers(2, min(13, max_len - 2) + 1, (images, refs))
  p = 1.0 / np.arange(1, vocab - 4)
  for (i, r), m in np.ndenumerate(lengths):
    out[i, r, 0], out[i, r, m + 1] = CLS, SEP
    out[i, r, 1:m + 1] = 5 + rng.choice(vocab - 5, m, p=p / p.sum())
  return out


def _text(ids: np.ndarray) -> str:
  """The words of ``[CLS] w.. [SEP]..`` ids [L] as a string of ids, [CLS] and from [SEP] on left out."""
  words = ids[1:]
  end = np.flatnonzero(words == SEP)
  return " ".join(map(str, words[:end[0]] if len(end) else words))


def _host_rewards(samples: np.ndarray, greedy: np.ndarray, references: np.ndarray, k: int):
  """pycocoevalcap CIDEr-D of samples [B * k, L] and greedy captions [B, L] against references [B, R, L]."""
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  refs = [[_text(r) for r in image if r[0] != PAD] for image in references]
  _, reward_sample = Cider().compute_score({i: refs[i // k] for i in range(len(samples))},
                                           {i: [_text(s)] for i, s in enumerate(samples)})
  _, reward_greedy = Cider().compute_score(dict(enumerate(refs)), {i: [_text(g)] for i, g in enumerate(greedy)})
  return np.asarray(reward_sample), np.asarray(reward_greedy)


def _setup():
  """(model, task cfg, params, batch, frozen, model config) at the flags' sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.tasks import scst  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config(_CONFIG_ARG.value)
  model_config = config.model
  model_config.update(dict(vocab_size=_VOCAB_SIZE.value, max_len=_MAX_LEN.value,
                           visual_feat_dim=_FEATURE_DIM.value, num_clusters=_NUM_CLUSTERS.value))
  cfg = ml_collections.FrozenConfigDict({
      **config.tasks.scst.to_dict(), "weight": 1, "num_samples": _NUM_SAMPLES.value,
      "layout": config.tasks.i2t.layout, "pad_id": PAD, "unk_id": UNK, "cls_id": CLS, "sep_id": SEP,
      "mask_id": MASK})
  model = lxmert.build_model(model_config)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, model_config, jax.random.key(_SEED.value)))())
  rng = np.random.default_rng(_SEED.value)
  corpus = _corpus(rng, images=_IMAGES.value, refs=_REFS.value, vocab=_VOCAB_SIZE.value, max_len=_MAX_LEN.value)
  n, cells = _BATCH.value, model_config.num_cells
  batch = {"dense": rng.normal(size=(n, cells, _FEATURE_DIM.value)).astype(np.float32),
           "boxes": rng.uniform(size=(n, cells, 4)).astype(np.float32), "caption_ids": corpus[:n]}
  frozen = {"cider": scst.reference_table(list(corpus), pad_id=PAD, sep_id=SEP)}
  return model, cfg, params, jax.device_put(batch), frozen, model_config


def _steps(model, cfg, tx):
  """(in-graph step, rollout, teacher-forced gradient step), each jitted."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bigen_jax.tasks import scst  # pylint: disable=g-import-not-at-top

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def in_graph(params, opt_state, batch, rng, frozen):
    loss = lambda p: scst.loss_fn(p, batch, rng, model=model, cfg=cfg, frozen=frozen)
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return *update(params, opt_state, grads), metrics

  @jax.jit
  def rollout(params, batch, rng):
    return scst.rollouts(params, batch, rng, model=model, cfg=cfg, frozen={})

  @jax.jit
  def gradient(params, opt_state, batch, samples, advantage):
    k = cfg.num_samples
    visual = {"visual_feats": jnp.repeat(batch["dense"], k, axis=0)}
    boxes = jnp.repeat(batch["boxes"], k, axis=0)

    def loss(p):
      log_probs = scst.sequence_log_probs(p, samples, model=model, visual=visual, boxes=boxes,
                                          tokens=scst.decode_tokens(cfg), layout=cfg.layout,
                                          temperature=cfg.temperature)
      return -jnp.mean(advantage * log_probs)

    return update(params, opt_state, jax.grad(loss)(params))

  return in_graph, rollout, gradient


def _check_strings(samples, greedy, references, k: int) -> float:
  """max |in-graph CIDEr-D - pycocoevalcap's| of samples and greedy captions, the in-graph table built from the
  references pycocoevalcap sees (a check of the strings B scores)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax.tasks import scst  # pylint: disable=g-import-not-at-top
  want = _host_rewards(samples, greedy, references, k)
  diff = 0.0
  for ids, refs, host in zip((samples, greedy), (np.repeat(references, k, axis=0), references), want):
    table = scst.reference_table(list(refs), pad_id=PAD, sep_id=SEP)
    got = jax.jit(lambda c, r, t: scst.rewards(c, r, t, pad_id=PAD, sep_id=SEP))(ids, refs, table)
    diff = max(diff, float(np.abs(np.asarray(got) - host).max()))
  return diff


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = timing.limit_threads(_THREADS.value)
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  model, cfg, params, batch, frozen, model_config = _setup()
  tx = optax.adam(1e-5)
  in_graph, rollout, gradient = _steps(model, cfg, tx)
  references, k = np.asarray(batch["caption_ids"]), cfg.num_samples
  key = jax.random.key(_SEED.value + 1)
  state = {"a": (params, tx.init(params)), "b": (params, tx.init(params))}
  rewards = {}

  def step_a(i):
    p, o, metrics = in_graph(*state["a"], batch, jax.random.fold_in(key, i), frozen)
    state["a"] = jax.block_until_ready((p, o))
    rewards["a"] = (metrics["reward_sample"], metrics["reward_greedy"])
    return {}

  def step_b(i):
    start = time.perf_counter()
    drawn = rollout(state["b"][0], batch, jax.random.fold_in(key, i))
    samples, greedy = jax.device_get(drawn)
    rolled = time.perf_counter()
    reward_sample, reward_greedy = _host_rewards(samples, greedy, references, k)
    advantage = jax.device_put((reward_sample - np.repeat(reward_greedy, k)).astype(np.float32))
    scored = time.perf_counter()
    state["b"] = jax.block_until_ready(gradient(*state["b"], batch, drawn[0], advantage))
    rewards["b"] = (reward_sample.mean(), reward_greedy.mean())
    return {"rollout": rolled - start, "host CIDEr-D": scored - rolled, "gradient step": time.perf_counter() - scored}

  for i in range(_WARMUP.value):
    step_a(i)
    step_b(i)
  runs = {"a": [], "b": []}
  for i in range(_WARMUP.value, _WARMUP.value + _STEPS.value):
    for name, step in (("a", step_a), ("b", step_b)):
      wall, cpu = time.perf_counter(), time.process_time()
      parts = step(i)
      runs[name].append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, **parts})
  diff = _check_strings(*jax.device_get(rollout(params, batch, key)), references, k)
  median = lambda name, field: float(np.median([r[field] for r in runs[name]]))

  layers = f"{model_config.num_language_layers}/{model_config.num_vision_layers}/{model_config.num_cross_layers}"
  print(f"config=demo.py:{_CONFIG_ARG.value} ({layers} layers, hidden {model_config.hidden_size}, "
        f"layout {cfg.layout}) batch={_BATCH.value} num_samples={k} max_len={_MAX_LEN.value} refs={_REFS.value} "
        f"vocab={_VOCAB_SIZE.value} corpus={_IMAGES.value} images threads={threads} "
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} steps={_STEPS.value}")
  (a_sample, a_greedy), (b_sample, b_greedy) = (map(float, rewards[name]) for name in "ab")
  print(f"mean rewards sample / greedy (last step): in-graph {a_sample:.3f} / {a_greedy:.3f} (corpus df)   "
        f"pycocoevalcap {b_sample:.3f} / {b_greedy:.3f} (batch df); in-graph with the batch's df: "
        f"max |diff| {diff:.1e}")
  for field, name in (("wall", "wall"), ("cpu", "cpu ")):
    a, b = median("a", field), median("b", field)
    print(f"{name}: A in-graph {a:.3f} s   B host pycocoevalcap {b:.3f} s   B / A {b / a:.2f}x")
  phases = ("rollout", "host CIDEr-D", "gradient step")
  split = "   ".join(f"{phase} {median('b', phase):.3f} s" for phase in phases)
  print(f"B wall split: {split}")
  timing.write_result(_JSON.value, ours=median("a", "wall"), peer=median("b", "wall"), unit="s", lower_is_better=True,
                      cpu=timing.result(ours=median("a", "cpu"), peer=median("b", "cpu"), unit="s",
                                        lower_is_better=True))


if __name__ == "__main__":
  app.run(main)
