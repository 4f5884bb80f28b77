"""The train state and how it is made on the mesh: ``TrainState``, ``param_layout`` (abstract params and their
shardings, from the logical-axis rules) and ``create_state`` (a jitted init whose large inputs, ``init_from``'s
params and the codebook, are sharded arguments, never compiled-in constants). ``bigen_jax.train`` creates or
restores a state with them; ``bigen_jax.evaluate`` restores only its params into ``param_layout``. Converted
``init_from`` params are first checked against the data by their provenance (``check_init_provenance``).
"""

from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax import parallel
from bigen_jax.data import records
from bigen_jax.data import vocab as vocab_lib
from bigen_jax.experiment import Context
from bigen_jax.models import heads
from bigen_jax.models import lxmert


@flax.struct.dataclass
class TrainState:
  """step int32 []; params; opt_state; rng uint32 [2] (raw key data: checkpointable as a plain array)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def load_init_params(path: str, abstract: Any, scan_layers: bool) -> Any:
  """Converted params (tools/convert_lxmert.py) checked against the model's parameter tree."""
  from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
  params = convert_io.load_params(path)
  flat = flax.traverse_util.flatten_dict(params)
  if scan_layers and not any("layers" in k for k in flat):
    params = lxmert.stack_layers(params)
  missing, extra, bad = convert_io.param_tree_mismatches(abstract, params)
  if missing or extra or bad:
    raise errors.ConfigError(f"--config.init_from={path} does not fit the model: missing {missing[:5]}, unexpected "
                     f"{extra[:5]}, shape mismatch {bad[:5]}")
  return params


def reads_codebook(config) -> bool:
  """Whether training from ``config`` uses the vocabulary's clusters through the model: a task on that predicts
  them (T2I, the CLIP loss's decoding) or reads them as input (``visual_input="discrete"``), or the generation
  evaluator."""
  for name, task in config.tasks.items():
    if task.weight > 0 and (name in ("t2i", "clip") or task.get("visual_input") == "discrete"):
      return True
  evaluation = config.get("eval")
  return bool(evaluation and evaluation.every and "generation" in evaluation.evaluators)


def check_init_provenance(init_from: str, *, records_dir: str, vocab: vocab_lib.Vocab, uses_codebook: bool) -> None:
  """Converted params ``init_from`` against the data, by their provenance file (``convert/provenance.py``).

  The records' manifest ``backbone`` must be the checkpoint's ``feature_extractor`` and, when ``uses_codebook``
  and the provenance has a codebook sha256, ``vocab``'s codebook [K, D] must be the checkpoint's centroids; else
  a ``ConfigError`` names the flag, both files and both values. Params without a provenance file (converted
  before it existed) only log a warning. Reads two small JSON files and hashes the loaded codebook; the params
  file is not opened.
  """
  from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
  from bigen_jax.convert import provenance  # pylint: disable=g-import-not-at-top
  flag, source = f"--config.init_from={init_from}", provenance.provenance_path(init_from)
  try:
    record = provenance.read_provenance(init_from)
  except convert_io.ConversionError as e:
    raise errors.ConfigError(f"{flag}: {e}") from None
  if record is None:
    logging.warning("%s has no provenance file %s (converted before tools/convert_lxmert.py wrote one): the "
                    "records' backbone and the vocabulary's codebook are not checked against the checkpoint; "
                    "convert it again to check them", flag, source)
    return
  manifest = fileio.join(records_dir, records.MANIFEST_NAME)
  backbone, extractor = records.read_manifest(records_dir)["backbone"], record["feature_extractor"]
  if backbone != extractor:
    raise errors.ConfigError(
        f"{flag} was trained on {extractor!r} features ({source}: feature_extractor) but "
        f"--config.data.records_dir={records_dir} holds {backbone!r} features ({manifest}: backbone): extract "
        f"features with the checkpoint's backbone ({extractor!r}) and train on those records")
  want = record["codebook_sha256"]
  if not (want and uses_codebook):
    return
  have = vocab_lib.codebook_sha256(vocab.codebook)
  if have != want:
    kind = vocab.codebook_source.get("path") or "k-means"
    codebook_file = fileio.join(vocab.dir, vocab_lib.CODEBOOK_NAME)
    raise errors.ConfigError(
        f"{flag}: the codebook of --config.data.vocab_dir={vocab.dir} ({codebook_file}, from {kind}, sha256 "
        f"{have[:16]}) is not the checkpoint's ({source}: codebook_sha256 {want[:16]}): build "
        f"the vocabulary with tools/build_vocab.py --records {records_dir} --out <vocab_dir> --codebook "
        f"{record.get('codebook_file') or '<codebook.npy>'} (written by tools/convert_lxmert.py --codebook_out)")


def is_run_directory(path: str) -> bool:
  """Whether ``path`` is a training run's directory (its checkpoints inside), not a converted params file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return (epath.Path(path) / "checkpoints").is_dir()


CROSS_ATTENTION, VISION_CROSS_ATTENTION = "cross_attention", "vision_cross_attention"


def param_sources(have: dict[tuple[str, ...], tuple[int, ...]], want: dict[tuple[str, ...], Any]
                  ) -> dict[tuple[str, ...], tuple[str, ...]]:
  """Which saved param each param of a model starts from: ``have`` {path: shape} of a run's params, ``want``
  {path: abstract array} of the model's -> {model path: run path}. A path the run has maps to itself; a
  ``vision_cross_attention`` module the run lacks (its one ``cross_attention`` module served both directions,
  ``model.shared_cross_attention``) maps to that layer's ``cross_attention``; other paths the run lacks map to
  nothing. A mapped param of another shape is a ``ValueError`` naming it."""
  out = {}
  for key, value in want.items():
    shared = tuple(CROSS_ATTENTION if part == VISION_CROSS_ATTENTION else part for part in key)
    source = key if key in have else shared if shared in have else None
    if source is None:
      continue
    if tuple(have[source]) != tuple(value.shape):
      raise ValueError(f"{'/'.join(source)} has shape {tuple(have[source])} in the run, {tuple(value.shape)} in "
                       f"this model ({'/'.join(key)})")
    out[key] = source
  return out


def _names(keys, limit: int = 8) -> str:
  keys = sorted("/".join(k) for k in keys)
  return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "none"


def restore_run_params(path: str, abstract_params: Any) -> Any:
  """The params of the newest good checkpoint of the run in ``path``, restored into the shapes and shardings of
  ``abstract_params``: stage 2 starts from stage 1's (the same model), a stage-1 model from a pretraining run's.

  Only the params this model shares with the run are read (``param_sources``): the run's params this model lacks
  (e.g. X-LXMERT's answer head, for a stage-1 model) are left in the checkpoint, and the result holds no entry
  for this model's params that the run lacks (e.g. the demo's code-bag head), which ``create_state`` keeps at
  their fresh init; a ``vision_cross_attention`` module starts from the run's shared ``cross_attention``. Each
  list is logged. A shared param of another shape, or a run that shares no param with this model, is a
  ``ConfigError``."""
  from bigen_jax import checkpoint, fileio  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(fileio.join(path, "checkpoints"), save_every=1, async_save=False, create=False)
  want = flax.traverse_util.flatten_dict(abstract_params)
  try:
    have = ckpt.param_shapes()
    sources = param_sources(have, want)
    if not sources:
      raise ValueError(f"it shares no param with this model (the run's: {_names(have, 4)})")
    target = flax.traverse_util.unflatten_dict({source: want[key] for key, source in sources.items()})
    restored, _ = ckpt.restore_params(target)
  except (ValueError, KeyError) as e:
    raise errors.ConfigError(f"--config.init_from={path}: its newest checkpoint does not fit this model "
                             f"({str(e).splitlines()[0][:300]}): init_from needs a run of this --config.model "
                             "(stage 2: stage 1's)") from None
  finally:
    ckpt.close()
  unused = set(have) - set(sources.values())
  missing = set(want) - set(sources)
  shared = {key for key, source in sources.items() if key != source}
  if unused or missing or shared:
    logging.warning("--config.init_from=%s: left out the run's params this model lacks (%s); fresh init for this "
                    "model's params the run lacks (%s); started from the run's %s: %s", path, _names(unused),
                    _names(missing), CROSS_ATTENTION, _names(shared))
  restored = flax.traverse_util.flatten_dict(restored)
  return flax.traverse_util.unflatten_dict({key: restored[source] for key, source in sources.items()})


def merge_params(params: Any, given: Any) -> Any:
  """``params`` with every leaf that ``given`` (a subtree of the same nesting) holds replaced by it, cast to the
  leaf's dtype."""
  given = flax.traverse_util.flatten_dict(given)
  return flax.traverse_util.unflatten_dict({
      key: given[key].astype(value.dtype) if key in given else value
      for key, value in flax.traverse_util.flatten_dict(params).items()})


def param_layout(ctx: Context) -> tuple[Any, Any]:
  """(abstract params, each a ``ShapeDtypeStruct`` with its sharding; the shardings) of ``ctx``'s model."""
  boxed = lxmert.abstract_params(ctx.model, ctx.config.model)
  abstract = nn.unbox(boxed)
  shardings = parallel.param_shardings(boxed, ctx.mesh, ctx.rules)
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                      shardings), shardings


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array every process holds whole, as a global array: each process puts only its own shards."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class _Init:
  """``init(rng)``: a new train state on the mesh; ``init.lower(rng)``: its program, for inspection.

  The large inputs (``init_from``'s params, the codebook) are read and placed on the devices at the call and
  passed to the jitted function as arguments, sharded like the params: closed over, they would be compiled into
  the program as constants (0.9 GB for the paper model).
  """

  def __init__(self, jitted, inputs: Callable[[], tuple[Any, Any]]):
    self._jitted, self._inputs = jitted, inputs

  def __call__(self, rng: jax.Array) -> TrainState:
    return self._jitted(rng, *self._inputs())

  def lower(self, rng: jax.Array):
    return self._jitted.lower(rng, *self._inputs())


def create_state(ctx: Context, tx: optax.GradientTransformation, codebook: np.ndarray):
  """Abstract train state and its shardings, and ``init(rng)`` (``_Init``) placing a new state on the mesh.

  codebook [K, D] (numpy) initialises the image head's last layer unless ``config.init_from`` is given. The
  ``init_from`` file is read only when ``init`` is called: evaluation, which restores, never needs it; converted
  params are checked against the data here first (``check_init_provenance``).
  """
  config, model = ctx.config, ctx.model
  abstract_params, param_sh = param_layout(ctx)
  opt_sh = parallel.opt_state_shardings(tx, abstract_params, param_sh, ctx.mesh)
  replicated = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
  shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
  use_codebook = not config.init_from and config.init_image_head_from_codebook
  if config.init_from and not is_run_directory(config.init_from):
    check_init_provenance(config.init_from, records_dir=config.data.records_dir, vocab=ctx.vocab,
                          uses_codebook=reads_codebook(config))

  def init(rng, init_params, codebook):
    params_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(lxmert.init_params(model, config.model, params_rng))
    if init_params is not None:
      params = merge_params(params, init_params)  # a run's: only the params it shares with this model
    elif codebook is not None:
      params = heads.init_image_head_from_codebook(params, codebook, config.get("image_head_codebook_std", 0.0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))

  def inputs():
    if config.init_from and is_run_directory(config.init_from):
      return restore_run_params(config.init_from, abstract_params), None
    if config.init_from:
      loaded = load_init_params(config.init_from, abstract_params, config.model.scan_layers)
      return jax.tree.map(_place, loaded, param_sh), None
    return None, _place(np.asarray(codebook, np.float32), replicated) if use_codebook else None

  codebook_spec = jax.ShapeDtypeStruct(np.shape(codebook), jnp.float32) if use_codebook else None
  abstract = jax.eval_shape(init, jax.random.key(0), abstract_params if config.init_from else None, codebook_spec)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                          shardings)
  return abstract, shardings, _Init(jax.jit(init, out_shardings=shardings), inputs)
