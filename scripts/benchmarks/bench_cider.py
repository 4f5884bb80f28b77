r"""CIDEr-D speed: pycocoevalcap's ``Cider`` vs the vectorised ``bigen_jax.eval.cider.CiderD``; the jitted form.

  python scripts/benchmarks/bench_cider.py --images 5000 --refs 5 --seed 0
  python scripts/benchmarks/bench_cider.py --corpus zipf --images 5000

The corpus is ``--images`` images with ``--refs`` references each: captioned-scenes captions (scene graphs and
captions only, no rendering) or, with ``--corpus zipf``, random sentences of Zipf-distributed words from a
10,000-word vocabulary (COCO-sized). Half the candidates are another caption of the same image, half a
caption of another image. Both scorers run ``--steps`` times after a warm-up; a time is the median, of wall
time and (steadier on a shared machine) of the process's CPU time. Checks that the scores agree (1e-9),
prints both times and their ratio (goal >= 20x), then times ``cider_d_ids`` under ``jax.jit`` (in-graph, on the
default device) on a batch of ``--batch`` candidates (document frequencies from the whole corpus), checks it
against ``CiderD(df=...)`` on that batch and times that too (the JSON's ``in_graph`` result: seconds per batch,
jitted vs host).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import timing  # pylint: disable=g-import-not-at-top

_IMAGES = flags.DEFINE_integer("images", 5000, "Images in the corpus.")
_REFS = flags.DEFINE_integer("refs", 5, "References per image.")
_SEED = flags.DEFINE_integer("seed", 0, "Corpus seed.")
_CORPUS = flags.DEFINE_enum("corpus", "scenes", ["scenes", "zipf"], "Caption source.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed repetitions of each scorer.")
_BATCH = flags.DEFINE_integer("batch", 250, "Candidates per batch of the jitted id form (0: skip it).")
_JSON = flags.DEFINE_string("json", None, "Also write the result (ours, peer, ratio, unit) as JSON to this file.")


def _corpus(images: int, refs: int, seed: int, kind: str) -> list[list[str]]:
  """``images`` lists of refs + 1 distinct-ish captions (the last is a spare for candidates)."""
  if kind == "zipf":
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(10_000)])
    lengths = rng.integers(5, 16, images * (refs + 1))
    p = 1.0 / np.arange(1, len(vocab) + 1)
    words = iter(vocab[rng.choice(len(vocab), lengths.sum(), p=p / p.sum())])
    sentences = iter(" ".join(next(words) for _ in range(m)) for m in lengths)
    return [[next(sentences) for _ in range(refs + 1)] for _ in range(images)]
  from bigen_jax.worlds.scenes import world as scenes  # pylint: disable=g-import-not-at-top
  cfg = scenes.SceneConfig(seed=seed)
  out = []
  for i in range(images):
    rng = scenes.example_rng(cfg.seed, "validation", i)
    out.append(scenes.captions(scenes.sample_scene(rng, cfg), rng, n=refs + 1))
  return out


def _time(fn, steps: int) -> float:
  """Median seconds of ``fn()`` over ``steps`` calls after one warm-up."""
  return 1.0 / timing.steps_per_second(fn, steps=steps, warmup=1)


def _cpu_time(fn, steps: int) -> float:
  """Median CPU seconds of this process for ``fn()`` over ``steps`` calls (steadier than wall time when
  other processes share the cores)."""
  times = []
  for _ in range(steps):
    start = time.process_time()
    fn()
    times.append(time.process_time() - start)
  return sorted(times)[len(times) // 2]


def _bench_ids(gts: dict, res: dict, batch: int, steps: int) -> dict:
  """Times the jitted ``cider_d_ids`` per batch, checks it against ``CiderD(df=...)`` and times that: the
  ``timing.result`` of seconds per batch (ours: jitted, peer: ``CiderD(df=...)`` on the host)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax.eval import cider  # pylint: disable=g-import-not-at-top
  keys = list(gts)
  vocab = {w: i + 1 for i, w in enumerate(dict.fromkeys(
      w for k in keys for s in gts[k] + res[k] for w in s.split()))}  # 0 is the pad id
  length = max(len(s.split()) for k in keys for s in gts[k] + res[k])
  refs = max(len(gts[k]) for k in keys)

  def ids(sentences: list[str]) -> np.ndarray:
    out = np.zeros((len(sentences), length), np.int32)
    for row, s in zip(out, sentences):
      row[:len(s.split())] = [vocab[w] for w in s.split()]
    return out

  df = cider.document_frequencies([gts[k] for k in keys])
  df_ids = cider.document_frequencies_from_ids([ids(gts[k]) for k in keys], pad_id=0)
  table = cider.cider_table(df_ids)
  part = keys[:batch]
  cands = ids([res[k][0] for k in part])
  references = np.stack([ids(gts[k] + [""] * (refs - len(gts[k]))) for k in part])
  score = jax.jit(lambda c, r, t: cider.cider_d_ids(c, r, t, pad_id=0))
  got = np.asarray(score(cands, references, table))
  _, want = cider.CiderD(df=df).compute_score({k: gts[k] for k in part}, {k: res[k] for k in part})
  seconds = _time(lambda: jax.block_until_ready(score(cands, references, table)), steps=max(steps, 5))
  host = _time(lambda: cider.CiderD(df=df).compute_score({k: gts[k] for k in part}, {k: res[k] for k in part}),
               steps=max(steps, 5))
  print(f"jitted cider_d_ids: {1e3 * seconds:.2f} ms per batch of {len(part)} ({refs} refs, length {length}, "
        f"{sum(len(p) for p in table.prefix)} table n-grams, {jax.devices()[0].platform}); "
        f"CiderD(df) on the host {1e3 * host:.2f} ms; max |ids - CiderD(df)| = {np.abs(got - want).max():.2e}")
  return timing.result(ours=seconds, peer=host, unit="s/batch", lower_is_better=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from bigen_jax.eval import cider  # pylint: disable=g-import-not-at-top
  caps = _corpus(_IMAGES.value, _REFS.value, _SEED.value, _CORPUS.value)
  n = len(caps)
  gts = {i: c[:-1] for i, c in enumerate(caps)}
  res = {i: [c[-1] if i % 2 else caps[(i * 7 + 1) % n][0]] for i, c in enumerate(caps)}
  print(f"corpus={_CORPUS.value} images={n} refs={_REFS.value} "
        f"words={sum(len(s.split()) for c in caps for s in c)}")
  want, want_each = Cider().compute_score(gts, res)
  got, got_each = cider.CiderD().compute_score(gts, res)
  diff = max(abs(want - got), float(np.abs(want_each - got_each).max()))
  if diff > 1e-9:
    raise AssertionError(f"scores differ: pycocoevalcap {want} vs CiderD {got} (max diff {diff:.2e})")
  slow = _time(lambda: Cider().compute_score(gts, res), _STEPS.value)
  fast = _time(lambda: cider.CiderD().compute_score(gts, res), max(_STEPS.value, 5))
  slow_cpu = _cpu_time(lambda: Cider().compute_score(gts, res), _STEPS.value)
  fast_cpu = _cpu_time(lambda: cider.CiderD().compute_score(gts, res), max(_STEPS.value, 5))
  print(f"CIDEr-D = {got:.6f} (max |diff| vs pycocoevalcap {diff:.1e})")
  for name, a, b in (("wall", slow, fast), ("cpu ", slow_cpu, fast_cpu)):
    print(f"{name}: pycocoevalcap Cider {a:.3f} s   CiderD {b:.4f} s   speed-up {a / b:.1f}x")
  extra = {"in_graph": _bench_ids(gts, res, _BATCH.value, _STEPS.value)} if _BATCH.value else {}
  timing.write_result(_JSON.value, ours=fast, peer=slow, unit="s", lower_is_better=True,
                      cpu=timing.result(ours=fast_cpu, peer=slow_cpu, unit="s", lower_is_better=True), **extra)


if __name__ == "__main__":
  app.run(main)
