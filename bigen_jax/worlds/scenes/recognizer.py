"""The scene recogniser of the captioned-scenes world: training, I/O, and reading images back into scene graphs.

The recogniser (``recognizer_model``, a small CenterNet-style convnet) is trained on rendered scenes drawn from a
stream of its own (disjoint from the dataset's splits) and reads an image back into a scene graph
(``recognize``); ``semantic`` scores captions against what it reads. It is trained by its own step
(``python tools/train_scene_recognizer.py --out DIR``, stage 9 of ``make demo``: ``load_or_train``); evaluators
only ``load`` it.

Scene graphs are read with a lenient relation margin (``LENIENT_MARGIN``, see ``semantic``).
"""

import functools
import inspect
import json
import time
from typing import Any, Mapping, Sequence

from etils import epath
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax.data import batching
from bigen_jax.eval import fid
from bigen_jax.worlds.scenes import grammar as G
from bigen_jax.worlds.scenes import recognizer_model as R
from bigen_jax.worlds.scenes import world

LENIENT_MARGIN = 0.0  # pixels: relations read from recognised scenes (``semantic``'s module docstring)
_POOL_STREAM = 0x5CE4E  # the recogniser's training scenes: a generator stream no dataset split uses


# ----------------------------------------------------------------------------------------------- training

def render_pool(num: int, *, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """``num`` training scenes and their images [num, 128, 128, 3] uint8, from (seed, index) alone."""
  graphs = [world.sample_scene(np.random.default_rng([seed, _POOL_STREAM, i])) for i in range(num)]
  return np.stack([world.render(g) for g in graphs]), graphs


def stack_targets(graphs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """``R.scene_targets`` of each scene graph, stacked on a leading axis [N, ...]."""
  per = [R.scene_targets(g) for g in graphs]
  return {k: np.stack([t[k] for t in per]) for k in per[0]}


def init_params(seed: int = 0) -> Any:
  return R.SceneRecognizer().init(jax.random.key(seed), jnp.zeros((1, 128, 128, 3), jnp.uint8))["params"]


def _update(params, opt_state, images, flip, targets, *, tx):
  """One Adam step on a batch; images [B, S, S, 3] uint8 are mirrored where ``flip`` [B] is set."""
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)

  def loss_fn(p):
    return R.recognizer_loss(R.SceneRecognizer().apply({"params": p}, images), targets)

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, parts


def train_recognizer(*, steps: int = 600, seed: int = 0, batch_size: int = 32, learning_rate: float = 3e-3,
                     num_train_scenes: int = 4096, eval_scenes: int = 256, log_every: int = 50
                     ) -> tuple[Any, dict[str, Any]]:
  """Trains the recogniser from scratch; deterministic given the arguments. Returns (params, report).

  Batches are drawn with replacement from a pool of ``num_train_scenes`` rendered scenes, each mirrored
  left-right with probability 1/2. With ``eval_scenes`` > 0 the report holds ``evaluate_recognizer`` on
  that many validation scenes of the dataset.
  """
  t0 = time.time()
  images, graphs = render_pool(num_train_scenes, seed=seed)
  targets = [stack_targets(graphs), stack_targets([R.flip_scene(g) for g in graphs])]
  data_seconds = time.time() - t0
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 10 + 1), steps)
  tx = optax.adam(schedule)
  params = init_params(seed)
  opt_state = tx.init(params)
  update = jax.jit(functools.partial(_update, tx=tx), donate_argnums=(0, 1))
  rng = np.random.default_rng([seed, _POOL_STREAM + 1])  # batch order and flips
  losses, history = [], []
  t1 = time.time()
  for step in range(steps):
    idx = rng.integers(num_train_scenes, size=batch_size)
    flip = rng.random(batch_size) < 0.5
    batch = {k: np.where(flip.reshape((-1,) + (1,) * (v.ndim - 1)), targets[1][k][idx], v[idx])
             for k, v in targets[0].items()}
    params, opt_state, loss, parts = update(params, opt_state, images[idx], flip, batch)
    losses.append(loss)  # kept on device: the next batch is prepared while this step runs
    if log_every and (step % log_every == 0 or step == steps - 1):
      history.append({"step": step, "loss": float(loss), **{k: float(v) for k, v in parts.items()}})
  losses = [float(x) for x in jax.device_get(losses)]
  report = {"steps": steps, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
            "num_train_scenes": num_train_scenes, "data_seconds": round(data_seconds, 2),
            "train_seconds": round(time.time() - t1, 2), "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "history": history}
  if eval_scenes:
    report["heldout"] = evaluate_recognizer(params, num_scenes=eval_scenes, seed=seed)
  return params, report


def save_recognizer(path: str, params: Any, report: Mapping[str, Any] | None = None) -> None:
  """Writes params (and the report, as JSON) to one msgpack file, atomically (``fileio.write_atomic``)."""
  blob = flax.serialization.msgpack_serialize(
      {"params": flax.serialization.to_state_dict(jax.device_get(params)), "report": json.dumps(report or {})})
  fileio.write_atomic(path, blob)


def load_recognizer(path: str) -> tuple[Any, dict[str, Any]]:
  """(params, report) from ``save_recognizer``; raises ValueError if the file's shapes do not fit the model."""
  state = flax.serialization.msgpack_restore(epath.Path(path).read_bytes())
  template = jax.eval_shape(init_params)
  params = flax.serialization.from_state_dict(template, state["params"])
  fits = jax.tree.map(lambda t, p: tuple(t.shape) == np.shape(p), template, params)
  bad = [jax.tree_util.keystr(k) for k, ok in jax.tree_util.tree_flatten_with_path(fits)[0] if not ok]
  if bad:
    raise ValueError(f"{path}: parameter shapes do not fit SceneRecognizer at {bad}")
  return params, json.loads(state["report"])


def recognizer_path(directory: str, **train_kwargs) -> str:
  """Where ``load_or_train`` keeps the recogniser trained with these arguments (defaults filled in)."""
  args = inspect.signature(train_recognizer).bind(**train_kwargs)
  args.apply_defaults()
  key = "_".join(f"{k}{v}" for k, v in sorted(args.arguments.items()) if k not in ("eval_scenes", "log_every"))
  return fileio.join(directory, f"scene_recognizer_{key}.msgpack")


def load_or_train(directory: str, **train_kwargs) -> tuple[Any, dict[str, Any]]:
  """The cached recogniser for these training arguments (defaults filled in) under ``directory``, trained and
  saved on first use: the training step (``tools/train_scene_recognizer.py``, ``make demo``)."""
  path = recognizer_path(directory, **train_kwargs)
  if epath.Path(path).exists():
    return load_recognizer(path)
  params, report = train_recognizer(**train_kwargs)
  save_recognizer(path, params, report)
  return params, report


def load(directory: str) -> tuple[Any, dict[str, Any]]:
  """(params, report) of the default recogniser that ``load_or_train(directory)`` trained; never trains.
  ``UserError`` naming the directory and the command that trains it when it is not there."""
  path = recognizer_path(directory)
  if not epath.Path(path).exists():
    raise errors.UserError(
        f"no scene recogniser in {directory} ({epath.Path(path).name} is missing): train it once with "
        f"`python tools/train_scene_recognizer.py --out {directory}` (make demo's stage 9 does), or point "
        "--config.eval.generation.recognizer_dir at the directory that holds it")
  return load_recognizer(path)


# ----------------------------------------------------------------------------------------------- reading

@jax.jit
def _predict_batch(params, images):
  return R.probabilities(R.SceneRecognizer().apply({"params": params}, images))


def predict(params: Any, images: np.ndarray, *, batch_size: int = 64) -> dict[str, np.ndarray]:
  """Recogniser probabilities (``R.probabilities``) of uint8 images [N, 128, 128, 3], as numpy."""
  images = np.asarray(images, np.uint8)
  if images.ndim != 4 or images.shape[1:] != (R.IMAGE_SIZE, R.IMAGE_SIZE, 3):
    raise ValueError(f"expected uint8 images [N, {R.IMAGE_SIZE}, {R.IMAGE_SIZE}, 3], got {images.shape}")
  n = len(images)
  chunks = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    rows = batch_size if n > batch_size else n  # fixed shapes: one compile for every batch
    out = jax.device_get(_predict_batch(params, batching.pad_rows(chunk, rows)))
    chunks.append({k: v[:len(chunk)] for k, v in out.items()})
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def recognize(params: Any, images: np.ndarray, *, threshold: float = 0.3,
              relation_margin: float = LENIENT_MARGIN) -> list[dict[str, Any]]:
  """Scene graphs read from uint8 images [N, 128, 128, 3] (format of ``R.decode``, which ``check_claims``
  accepts); their ``relation_margin`` is the lenient one unless told otherwise."""
  return R.decode(predict(params, images), threshold=threshold, relation_margin=relation_margin)


@jax.jit
def _features_batch(params, images):
  return R.SceneRecognizer().apply({"params": params}, images)["features"]


def features(params: Any, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
  """Pooled recogniser features [N, 96] of uint8 images [N, 128, 128, 3] (FID in the scene world)."""
  return fid.compute_features(images, functools.partial(_features_batch, params), batch_size=batch_size)


# ----------------------------------------------------------------------------------------------- evaluation

def _match(pred: Sequence[Mapping[str, Any]], true: Sequence[Mapping[str, Any]], radius: float
           ) -> list[tuple[int, int]]:
  """Greedy closest-first pairs (pred index, true index) of centres within ``radius`` pixels."""
  pairs = sorted((np.hypot(p["x"] - t["x"], p["y"] - t["y"]), i, j)
                 for i, p in enumerate(pred) for j, t in enumerate(true))
  used_p, used_t, out = set(), set(), []
  for d, i, j in pairs:
    if d <= radius and i not in used_p and j not in used_t:
      used_p.add(i)
      used_t.add(j)
      out.append((i, j))
  return out


def evaluate_recognizer(params: Any, *, num_scenes: int = 256, seed: int = 0, split: str = "validation",
                        match_radius: float = 8.0, threshold: float = 0.3) -> dict[str, float]:
  """The recogniser's own accuracy on the dataset's rendered ``split`` scenes (``world.make_example``).

  Detection recall / precision (centres within ``match_radius`` px), attribute accuracy and centre error of
  matched objects, background accuracy, exact scenes (every object found with every attribute, nothing
  extra, right background), and caption-level: the fraction of the scenes' true captions judged true from the
  recognised scene (``caption_accuracy``, lenient relations; ``caption_accuracy_strict`` at the dataset's
  8 px) and of their hard negatives judged false (``negative_rejection``).
  """
  cfg = world.SceneConfig(seed=seed)
  examples = [world.make_example(i, cfg, split=split) for i in range(num_scenes)]
  graphs = recognize(params, np.stack([e["image"] for e in examples]), threshold=threshold)
  counts = {"true": 0, "pred": 0, "matched": 0, "shape": 0, "colour": 0, "size": 0, "bg": 0, "exact": 0}
  errors, caps, caps_strict, negs = [], [], [], []
  for ex, graph in zip(examples, graphs):
    truth = json.loads(ex["scene_graph"])
    pairs = _match(graph["objects"], truth["objects"], match_radius)
    counts["true"] += len(truth["objects"])
    counts["pred"] += len(graph["objects"])
    counts["matched"] += len(pairs)
    right = 0
    for i, j in pairs:
      p, t = graph["objects"][i], truth["objects"][j]
      errors.append(np.hypot(p["x"] - t["x"], p["y"] - t["y"]))
      oks = [p[k] == t[k] for k in ("shape", "colour", "size")]
      for k, ok in zip(("shape", "colour", "size"), oks):
        counts[k] += ok
      right += all(oks)
    bg_ok = graph["background"]["type"] == truth["background"]["type"]
    counts["bg"] += bg_ok
    counts["exact"] += bg_ok and right == len(truth["objects"]) == len(graph["objects"])
    caps += [G.check_caption(c, graph, margin=LENIENT_MARGIN) for c in ex["captions"]]
    caps_strict += [G.check_caption(c, graph, margin=truth["relation_margin"]) for c in ex["captions"]]
    negs += [not G.check_caption(h["negative"], graph, margin=LENIENT_MARGIN) for h in ex["hard_negatives"]]
  matched = max(counts["matched"], 1)
  return {"num_scenes": num_scenes, "recall": counts["matched"] / max(counts["true"], 1),
          "precision": counts["matched"] / max(counts["pred"], 1),
          **{f"{k}_accuracy": counts[k] / matched for k in ("shape", "colour", "size")},
          "centre_error_px": float(np.mean(errors)) if errors else float("nan"),
          "background_accuracy": counts["bg"] / max(num_scenes, 1),
          "exact_scene": counts["exact"] / max(num_scenes, 1),
          "caption_accuracy": float(np.mean(caps)), "caption_accuracy_strict": float(np.mean(caps_strict)),
          "negative_rejection": float(np.mean(negs))}
