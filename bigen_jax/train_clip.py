r"""``train_clip(config, workdir)``: trains a CLIP (``bigen_jax.models.clip``) contrastively on the records' real
(image, caption) pairs, for worlds without pretrained weights (``configs/clip.py``; COCO converts OpenAI's or
open_clip's instead, tools/convert_clip.py). It sees the train split only, with its own seed: independent of the
scene recogniser and of the feature detector.

  python -m bigen_jax.train_clip --config configs/clip.py:demo --workdir demo_out/clip \
      --config.data.records_dir=demo_out/records

Input: each record's stored image (decoded and squared to ``data.image_size`` on the host, uint8; the step's
``clip.preprocess`` resizes and normalises it as every CLIP scorer does) and all its captions, tokenised once with
open_clip's tokenizer; the step draws one caption per image with its own rng. Loss: CLIP's symmetric InfoNCE over
the batch (image -> text and text -> image cross-entropy of exp(logit_scale) x cosine), ``logit_scale`` learnt and
clamped to [0, log 100] after each update as open_clip does. State, shardings (``bigen_jax.parallel``, the
model's logical axis names through ``config.axis_rules``) and the step are this module's; the loop (progress,
metrics, checkpoints, exact resume) is ``bigen_jax.loop``'s. A finished run's held-out numbers are its
``workdir/report.json`` (``clip_scorer.evaluate_clip`` on held-out pairs); ``load_or_train`` is the cached entry
point of ``make demo``; ``load_clip`` reads a trained run or a converted params file.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice would precede one-line errors

import json  # pylint: disable=g-import-not-at-top
import math  # pylint: disable=g-import-not-at-top
import time  # pylint: disable=g-import-not-at-top
from typing import Any  # pylint: disable=g-import-not-at-top

from absl import logging  # pylint: disable=g-import-not-at-top
from etils import epath  # pylint: disable=g-import-not-at-top
import flax  # pylint: disable=g-import-not-at-top
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from bigen_jax import checkpoint  # pylint: disable=g-import-not-at-top
from bigen_jax import cli  # pylint: disable=g-import-not-at-top
from bigen_jax import config_checks  # pylint: disable=g-import-not-at-top
from bigen_jax import errors  # pylint: disable=g-import-not-at-top
from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
from bigen_jax import loop  # pylint: disable=g-import-not-at-top
from bigen_jax import optim  # pylint: disable=g-import-not-at-top
from bigen_jax import parallel  # pylint: disable=g-import-not-at-top
from bigen_jax import run_config  # pylint: disable=g-import-not-at-top
from bigen_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
from bigen_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
from bigen_jax.eval import clip_scorer  # pylint: disable=g-import-not-at-top
from bigen_jax.eval import eval_set  # pylint: disable=g-import-not-at-top
from bigen_jax.models import clip  # pylint: disable=g-import-not-at-top

TASK = "clip"  # the loop's name of the step: metrics are logged as clip/<metric>
REPORT_NAME = "report.json"  # the held-out numbers of a finished run, in its workdir
MAX_LOGIT_SCALE = math.log(100.0)


@flax.struct.dataclass
class CLIPState:
  """step int32 []; params (the CLIP's); opt_state (AdamW's); rng uint32 [2] (raw key data)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


_require = config_checks.require


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the flag for a config that cannot run on this job's devices."""
  config_checks.check_loop_fields(config)
  if not config.data.records_dir:
    raise errors.ConfigError("--config.data.records_dir is empty: point it at records with images "
                             "(tools/extract_features.py --store_images, or make demo's)")
  _require(config.optimizer.lr > 0, "optimizer.lr", config.optimizer.lr, "must be positive")
  _require(config.data.image_size >= 0, "data.image_size", config.data.image_size, "must be >= 0 (0: model's)")
  _require(config.eval.num_negatives > 0, "eval.num_negatives", config.eval.num_negatives, "must be positive")
  _require(config.eval.num_examples >= 0, "eval.num_examples", config.eval.num_examples, "must be >= 0 (0: all)")
  _require(config.eval.batch_size > 0, "eval.batch_size", config.eval.batch_size, "must be positive")
  m = config.model
  _require(m.image_size % m.patch_size == 0, "model.patch_size", m.patch_size,
           f"must divide model.image_size={m.image_size}")
  for tower in ("vision", "text"):
    _require(m[f"{tower}_width"] % m[f"{tower}_heads"] == 0, f"model.{tower}_heads", m[f"{tower}_heads"],
             f"must divide model.{tower}_width={m[f'{tower}_width']}")
  _require(m.context_length >= 3, "model.context_length", m.context_length, "must hold SOT, a word and EOT")
  wanted = int(config.mesh.get("num_devices") or 0)
  _require(0 <= wanted <= jax.device_count(), "mesh.num_devices", wanted,
           f"there are {jax.device_count()} devices (0 uses all of them)")
  try:
    shape = parallel.mesh_shape(config, wanted or jax.device_count())
  except ValueError as e:
    raise errors.ConfigError(f"--config.mesh ({dict(config.mesh)}): {e}") from None
  data_parallel = shape[0] * shape[1]
  _require(config.batch_size % data_parallel == 0 and config.batch_size % jax.process_count() == 0, "batch_size",
           config.batch_size, f"must be a multiple of the {data_parallel} data-parallel devices (mesh data x fsdp) "
           f"and of the {jax.process_count()} processes")


def check_records(config: ml_collections.ConfigDict) -> None:
  """``records.DataError`` naming the directory unless its records hold images."""
  if not records.read_manifest(config.data.records_dir).get("store_images"):
    raise records.DataError(f"the records in {config.data.records_dir} hold no images: extract them with "
                            "tools/extract_features.py --store_images to train a CLIP")


def read_records(records_dir: str, split: str, *, with_images: bool, num_examples: int = 0) -> list[dict[str, Any]]:
  """The first ``num_examples`` (0: all) records of ``split`` in file order, one dict each (index, captions
  bytes [N] padded with b"", image bytes when ``with_images``), read by the input pipeline's evaluation mode."""
  it = input_pipeline.create_iterator(
      records_dir=records_dir, split=split, global_batch_size=256, train=False, with_images=with_images,
      process_index=0, process_count=1, shuffle_buffer=1, num_examples=num_examples)
  fields = ("index", "captions", "image") if with_images else ("index", "captions")
  return [{k: batch[k][row] for k in fields} for batch in it for row in np.flatnonzero(batch["valid"])]


def caption_table(records_dir: str, split: str, context_length: int, prompt: str = ""
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [N, C, T], counts int32 [N]): the captions of record ``index`` of ``split`` in row ``index``,
  each after ``prompt``, tokenised (``clip.tokenize``, T = ``context_length``) and zero padded to C, the most any
  record has."""
  rows = {int(r["index"]): [prompt + c.decode("utf-8") for c in r["captions"] if c]
          for r in read_records(records_dir, split, with_images=False)}
  empty = sorted(i for i, caps in rows.items() if not caps)
  if not rows or empty:
    raise records.DataError(f"split {split!r} of {records_dir} has records without captions "
                            f"({'none at all' if not rows else f'indices {empty[:5]}'}): CLIP trains on pairs")
  width = max(len(caps) for caps in rows.values())
  texts = [c for i in sorted(rows) for c in rows[i]]
  flat = iter(clip.tokenize(texts, context_length=context_length))
  tokens = np.zeros((max(rows) + 1, width, context_length), np.int32)
  counts = np.zeros((max(rows) + 1,), np.int32)
  for i in sorted(rows):
    counts[i] = len(rows[i])
    for j in range(counts[i]):
      tokens[i, j] = next(flat)
  return tokens, counts


def host_image_size(config: ml_collections.ConfigDict) -> int:
  """The side S of the host's square images (``data.image_size``, 0: the model's)."""
  return config.data.image_size or config.model.image_size


def train_pairs(batch: dict[str, np.ndarray], table: tuple[np.ndarray, np.ndarray], image_size: int
                ) -> dict[str, np.ndarray]:
  """A pipeline batch (``with_images``) -> {"image": uint8 [B, S, S, 3] (``eval_set.square_image``), "captions":
  int32 [B, C, T] and "num_captions": int32 [B] of each image (``caption_table`` rows)}."""
  images = [eval_set.square_image(images_lib.decode_image(png, name=f"the image of record {i}"), image_size)
            for i, png in zip(batch["index"], batch["image"])]
  index = np.asarray(batch["index"])
  return {"image": np.stack(images).astype(np.uint8), "captions": table[0][index], "num_captions": table[1][index]}


def create_state(model: clip.CLIP, mesh: jax.sharding.Mesh, rules, tx: optax.GradientTransformation):
  """(abstract ``CLIPState`` with shardings, the shardings, ``init(rng)`` placing a new state on the mesh).
  Param shardings follow the model's logical axis names through ``rules``; AdamW's state is sharded like them."""
  boxed = clip.abstract_params(model)
  params_sh = parallel.param_shardings(boxed, mesh, rules)
  opt_sh = parallel.opt_state_shardings(tx, nn.unbox(boxed), params_sh, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = CLIPState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated)

  def init(rng):
    param_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(clip.init_params(model, param_rng))
    return CLIPState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(state_rng))

  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          jax.eval_shape(init, jax.random.key(0)), shardings)
  return abstract, shardings, jax.jit(init, out_shardings=shardings)


def contrastive_loss(logits: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CLIP's symmetric InfoNCE of logits [B, B] (image i against text j; the pairs on the diagonal): the mean of
  the image -> text and text -> image cross-entropies; metrics with each direction's top-1 accuracy."""
  labels = jnp.arange(logits.shape[0])
  logits = logits.astype(jnp.float32)
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i,
                           "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
                           "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels)}


def make_train_step(model: clip.CLIP, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    shardings: CLIPState, mesh: jax.sharding.Mesh):
  """One jitted update: (state, batch) -> (state, metrics); donates the old state. batch: ``train_pairs``'
  arrays (sharded over the batch axes). metrics: loss, its parts, logit_scale (exp), grad_norm, lr."""

  def step(state: CLIPState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    b = batch["captions"].shape[0]
    pick = jax.random.randint(rng, (b,), 0, jnp.maximum(batch["num_captions"], 1))
    ids = batch["captions"][jnp.arange(b), pick]
    pixels = clip.preprocess(batch["image"], image_size=model.image_size)

    def objective(params):
      return contrastive_loss(model.apply({"params": params}, pixels, ids).logits)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)
    metrics.update({"loss": loss, "logit_scale": jnp.exp(params["logit_scale"]),
                    "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  data = parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, None), donate_argnums=(0,))


def heldout_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The first ``eval.num_examples`` (0: all) records of ``data.eval_split``: images uint8 [N, S, S, 3] (S: the
  host size of training), their first captions, and the world's hard negatives (``clip_scorer.world_negatives``)."""
  split = config.data.eval_split
  rows = read_records(config.data.records_dir, split, with_images=True, num_examples=config.eval.num_examples)
  if not rows:
    raise records.DataError(f"split {split!r} of {config.data.records_dir} has no examples to evaluate")
  size = host_image_size(config)
  images = np.stack([eval_set.square_image(images_lib.decode_image(
      r["image"], name=f"the image of record {r['index']} of split {split!r}"), size) for r in rows])
  captions = [r["captions"][0].decode("utf-8") for r in rows]
  negatives_fn, contexts, source = clip_scorer.world_negatives(config.data.records_dir, split,
                                                               [int(r["index"]) for r in rows])
  return {"images": images, "captions": captions, "negatives_fn": negatives_fn, "contexts": contexts,
          "negatives_source": source}


def heldout_metrics(model: clip.CLIP, params: Any, config: ml_collections.ConfigDict,
                    data: dict[str, Any]) -> dict[str, Any]:
  """``clip_scorer.evaluate_clip`` on ``heldout_data``; fewer than 1 + ``eval.num_negatives`` distinct captions
  lower the easy R-precision's negatives to what there is (the report says how many)."""
  negatives = min(config.eval.num_negatives, len(set(data["captions"])) - 1)
  scorer = clip_scorer.ClipScorer(model, params, batch_size=config.eval.batch_size)
  scores = clip_scorer.evaluate_clip(scorer, data["images"], data["captions"], negatives_fn=data["negatives_fn"],
                                     contexts=data["contexts"], num_negatives=negatives, seed=config.seed)
  return {**scores, "hard_negatives": data["negatives_source"]}


def train_clip(config: ml_collections.ConfigDict, workdir: str) -> CLIPState:
  """Trains ``config.total_steps`` steps (resuming from ``workdir``); returns the final state."""
  check_config(config)
  check_records(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.get("num_devices") else None
  mesh, rules = parallel.make_mesh(config, devices), parallel.axis_rules(config)
  model = clip.build_model(config.model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract, shardings, init = create_state(model, mesh, rules, tx)
  table = caption_table(config.data.records_dir, config.data.train_split, config.model.context_length)

  ckpt = loop.open_run(config, workdir)
  data = input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, with_images=True, shuffle_buffer=config.data.shuffle_buffer,
      verify_checksums=config.data.verify_checksums, sharding=config.data.sharding)
  state, start = loop.restore_or_init(ckpt, abstract, lambda: init(jax.random.key(config.seed)), data)
  batch_sharding = parallel.data_sharding(mesh)
  size = host_image_size(config)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in train_pairs(batch, table, size).items()}

  evaluate = None
  if config.eval.every:
    heldout = heldout_data(config)

    def evaluate(state, step):
      del step
      scores = heldout_metrics(model, state.params, config, heldout)
      return {f"heldout/{k}": v for k, v in scores.items() if isinstance(v, float)}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = make_train_step(model, tx, schedule, shardings, mesh)
    logging.info("CLIP: %d parameters; starting at step %d",
                 sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)), start)
    return loop.run(config, workdir, state=state, start=start, steps={TASK: step_fn}, cycle=[TASK], data=data,
                    to_global=to_global, ckpt=ckpt, evaluate=evaluate)


def _plain_abstract_params(model: clip.CLIP) -> Any:
  """``clip.abstract_params`` without their logical-axis boxes, read as they are: ``nn.unbox`` would constrain
  them to the sharding of an active mesh (evaluators load the scorer inside one)."""
  return jax.tree.map(lambda x: getattr(x, "value", x), clip.abstract_params(model),
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _restore_params(workdir: str, model: clip.CLIP) -> Any:
  """The newest good checkpoint's params of the run in ``workdir`` (on the default device)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          _plain_abstract_params(model))
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=1, async_save=False, create=False)
  try:
    return ckpt.restore_params(abstract)[0]
  finally:
    ckpt.close()


def train_and_report(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, dict[str, Any]]:
  """(params, report) of the run in ``workdir``: a finished run's (its ``report.json`` at ``total_steps``, same
  config) is read back, nothing trained; otherwise it is trained (resumed from its checkpoint), then scored on
  held-out pairs (``heldout_metrics``) and the report written. A run stopped early (``stop_at_step``) gets no
  report: (params, {})."""
  path = fileio.join(workdir, REPORT_NAME)
  if epath.Path(path).exists():
    report = fileio.read_json(path)
    if report.get("step") == config.total_steps:
      run_config.check_resume(config, workdir)
      return _restore_params(workdir, clip.build_model(config.model)), report
  t0 = time.time()
  state = train_clip(config, workdir)
  seconds = time.time() - t0
  params = jax.device_get(state.params)
  if int(state.step) < config.total_steps:
    return params, {}
  model = clip.build_model(config.model)
  report = {"step": int(state.step), "train_seconds": round(seconds, 1), "split": config.data.eval_split,
            **heldout_metrics(model, params, config, heldout_data(config))}
  if jax.process_index() == 0:
    fileio.write_json_atomic(path, report)
  return params, report


def load_or_train(directory: str, *, records_dir: str, variant: str = "demo", **overrides: Any
                  ) -> tuple[Any, dict[str, Any]]:
  """The CLIP of ``configs/clip.py:<variant>`` on ``records_dir`` (``overrides``: dotted config fields, e.g.
  ``{"total_steps": 500}``) trained in ``directory``: reused when finished, resumed when interrupted
  (``train_and_report``); make demo's step. Returns (params, report)."""
  from configs import clip as clip_configs  # pylint: disable=g-import-not-at-top
  config = clip_configs.get_config(variant)
  config.data.records_dir = records_dir
  config.update_from_flattened_dict(overrides)
  return train_and_report(config, directory)


def load_clip(path: str, variant: str = "") -> tuple[clip.CLIP, Any, ml_collections.ConfigDict]:
  """(model, params, model config) of ``path``: a run directory of this trainer (its saved config and newest
  checkpoint; ``variant`` ignored), or params converted by tools/convert_clip.py (``.npz`` or orbax directory)
  with ``variant``, the ``clip_config`` name they were converted as (e.g. ``ViT-B-32-quickgelu``)."""
  if epath.Path(run_config.saved_path(path)).exists():
    config = run_config.load(path)
    if "model" not in config or "embed_dim" not in config.model:
      raise errors.ConfigError(f"{run_config.saved_path(path)} is not a config of bigen_jax.train_clip")
    model_config = clip.clip_config("vit_b32", **config.model)
    model = clip.build_model(model_config)
    return model, _restore_params(path, model), model_config
  if not epath.Path(path).exists():
    raise errors.UserError(f"{path} does not exist: give a bigen_jax.train_clip run directory or params of "
                           "tools/convert_clip.py")
  if not variant:
    raise errors.UserError(f"{path} holds converted params: name the clip_config variant they were converted as "
                           "(e.g. 'ViT-B-32-quickgelu')")
  model_config = clip.clip_config(variant)
  model = clip.build_model(model_config)
  from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
  params = convert_io.load_params(path)
  bad = sorted("/".join(k) for keys in convert_io.param_tree_mismatches(_plain_abstract_params(model), params)
               for k in keys)
  if bad:
    raise errors.UserError(f"{path} does not hold params of CLIP {variant!r}: {len(bad)} names or shapes differ "
                           f"(e.g. {bad[:3]})")
  return model, params, model_config


def main() -> None:
  """The command line (see the module docstring); user errors are one line on stderr (``cli.run``)."""
  def train(config, workdir):
    _, report = train_and_report(config, workdir)
    if report and jax.process_index() == 0:
      print(json.dumps(report, indent=2), flush=True)

  cli.run_trainer(train, config_help="CLIP training configuration (configs/clip.py).",
                  workdir_help="Checkpoints, metrics and the report go here.")


if __name__ == "__main__":
  main()
