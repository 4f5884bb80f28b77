r"""Export bundles: one directory with everything ``bigen_jax.pipeline.Pipeline`` needs to caption images and draw
captions, without the run, its records or its vocabulary directory.

  python -m bigen_jax.export --workdir demo_out/train --out demo_out/bundle [--step N] [--bf16] \
      [--generator_dir RUN] [--backbone_weights FILE]

A bundle (a local directory or a URL, ``fileio``):
  bundle.json          format_version, the bigen_jax / jax / flax versions that wrote it, the run and step, the
                       params' dtype, the feature extractor's identity (the records' manifest: backbone, its
                       config with the weights' sha256 and layer) and which optional parts it holds
  config.json          the run's resolved config (``run_config``): the model is built from its ``model`` block
  params/              the model's params (orbax; ``--bf16``: floating-point leaves cast to bfloat16)
  vocab.txt            the tokenizer's vocabulary
  codebook.npy         the visual vocabulary's centroids float32 [K, D]
  generator/           the frozen SPADE generator, when the run has one (``--generator_dir``, by default the run's
                       ``eval.generation.generator_dir``): its run's config.json and variables/ (orbax: G's params
                       and spectral vectors)
  preview_patches.npy  without a generator: the preview decoder's patches uint8 [K, 16, 16, 3] (``sampling.preview``)
  backbone/<file>      the feature extractor's weights file (``--backbone_weights``), when it has one
  sha256.json          the sha256 and size of every other file (``checkpoint.file_digests``)

The write is atomic: the bundle is written into a temporary sibling (``<out>.tmp<pid>``), fsynced, then renamed
to ``out``; an existing bundle there is replaced only once the new one is complete, and an export that fails
leaves it as it was. On an object store (no rename) the complete temporary bundle is copied over the old one,
``sha256.json`` last, so a reader never accepts a half-copied bundle.

``load_bundle(path)`` checks the format version, every file against ``sha256.json``, and the tokenizer, codebook,
params and generator against the model of the bundled config; any mismatch or corruption is a ``BundleError``
(a ``UserError``) naming the file.
"""

import dataclasses
import importlib.metadata
import os
from typing import Any, Callable

from absl import logging
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigen_jax import checkpoint
from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax import parallel
from bigen_jax import run_config
from bigen_jax.data import records
from bigen_jax.data import tokenizer as tokenizer_lib
from bigen_jax.data import vocab as vocab_lib
from bigen_jax.experiment import Context
from bigen_jax.models import lxmert

FORMAT_VERSION = 1
META_NAME = "bundle.json"
RECORD_NAME = checkpoint.RECORD_NAME
PARAMS_DIR = "params"
VOCAB_NAME = "vocab.txt"
CODEBOOK_NAME = "codebook.npy"
GENERATOR_DIR = "generator"
GENERATOR_VARIABLES = "generator/variables"
PREVIEW_NAME = "preview_patches.npy"
BACKBONE_DIR = "backbone"


class BundleError(errors.UserError):
  """A bundle that cannot be used: missing, corrupt, of another format version, or not fitting its model; the
  message names the file."""


@dataclasses.dataclass
class Bundle:
  """A loaded bundle: ``meta`` (bundle.json), the resolved ``config``, ``params`` (numpy), the tokenizer, the
  codebook float32 [K, D], the generator's variables {"params", "spectral"} or None, the preview patches uint8
  [K, 16, 16, 3] or None."""
  path: str
  meta: dict[str, Any]
  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  codebook: np.ndarray
  generator: dict[str, Any] | None = None
  preview_table: np.ndarray | None = None

  def file(self, rel: str) -> str:
    return fileio.join(self.path, rel)


def versions() -> dict[str, str]:
  """The versions a bundle records: bigen_jax's (its package metadata), jax's and flax's."""
  try:
    own = importlib.metadata.version("bigen_jax")
  except importlib.metadata.PackageNotFoundError:
    own = "unknown"
  return {"bigen_jax": own, "jax": jax.__version__, "flax": flax.__version__}


def context(config: ml_collections.ConfigDict, tokenizer, codebook: np.ndarray) -> Context:
  """An ``experiment.Context`` of ``config``'s model on this process's first device (a 1-device mesh), with the
  frozen ``codebook`` [K, D]: what the evaluators' decoders and ``text_to_image`` read."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(dict(data=1, fsdp=1, tensor=1, num_devices=1))
  mesh = parallel.make_mesh(config, jax.local_devices()[:1])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return Context(config=config, model=lxmert.build_model(config.model), mesh=mesh, rules=parallel.axis_rules(config),
                 frozen={"codebook": jax.device_put(jnp.asarray(codebook, jnp.float32), replicated)}, task_cfgs={},
                 tokenizer=tokenizer)


def abstract_params(ctx: Context) -> Any:
  """The params' ``ShapeDtypeStruct``s of ``ctx``'s model, placed on its mesh."""
  from bigen_jax import state  # pylint: disable=g-import-not-at-top
  return state.param_layout(ctx)[0]


# ----------------------------------------------------------------------------------------------------- export


def export(workdir: str, out: str, *, step: int | None = None, bf16: bool = False, generator_dir: str | None = None,
           backbone_weights: str | None = None) -> str:
  """Writes the bundle of the run in ``workdir`` (checkpoint ``step``, default the newest good one) to ``out``
  atomically (see the module docstring); returns ``out``. ``generator_dir`` None: the run's
  ``eval.generation.generator_dir`` ("" for none). ``backbone_weights``: the feature extractor's weights file,
  needed when the records' backbone has one (checked against the manifest's sha256)."""
  from bigen_jax import experiment  # pylint: disable=g-import-not-at-top
  if not epath.Path(run_config.saved_path(workdir)).exists():
    raise errors.UserError(f"--workdir={workdir} has no {run_config.CONFIG_NAME}: is it a bigen_jax.train run's "
                           "directory?")
  config = run_config.get_config(workdir)
  if "tasks" not in config:
    raise errors.UserError(f"--workdir={workdir}: {run_config.saved_path(workdir)} is not a config of bigen_jax.train "
                           "(a captioning and generation model)")
  config, tok, vocab = experiment.resolve_config(config)
  manifest = records.read_manifest(config.data.records_dir)
  extractor, weights = feature_extractor(manifest, config.data.records_dir, backbone_weights)
  ctx = context(config, tok, vocab.codebook)
  params, step = restore_params(workdir, ctx, step)
  if bf16:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  source = "--generator_dir"
  if generator_dir is None:
    generator_dir, source = config.eval.generation.get("generator_dir", ""), "the run's eval.generation.generator_dir"
  generator = load_generator_run(generator_dir, vocab.codebook, source) if generator_dir else None
  table = None if generator else preview_table(vocab, config.data.records_dir)
  meta = {"format_version": FORMAT_VERSION, "versions": versions(), "run": {"workdir": workdir, "step": int(step)},
          "params_dtype": "bfloat16" if bf16 else "float32", "feature_extractor": extractor,
          "source": {k: v for k, v in manifest.get("source", {}).items() if k != "paths"},
          "generator": generator is not None, "preview": table is not None}

  def write(tmp: str) -> None:
    from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
    run_config.save(config, tmp)
    convert_io.save_params(params, fileio.join(tmp, PARAMS_DIR))
    fileio.write_atomic(fileio.join(tmp, VOCAB_NAME), epath.Path(config.data.tokenizer).read_bytes())
    vocab_lib.save_npy(fileio.join(tmp, CODEBOOK_NAME), np.asarray(vocab.codebook, np.float32))
    if generator is not None:
      run_config.save(generator[0], fileio.join(tmp, GENERATOR_DIR))
      convert_io.save_params(generator[1], fileio.join(tmp, GENERATOR_VARIABLES))
    if table is not None:
      vocab_lib.save_npy(fileio.join(tmp, PREVIEW_NAME), table)
    if weights:
      fileio.write_atomic(fileio.join(tmp, extractor["weights_file"]), epath.Path(weights).read_bytes())
    fileio.write_json_atomic(fileio.join(tmp, META_NAME), meta)
    fileio.write_json_atomic(fileio.join(tmp, RECORD_NAME), {"files": checkpoint.file_digests(tmp)})

  write_atomically(out, write)
  logging.info("exported step %d of %s to %s (generator: %s)", step, workdir, out, generator is not None)
  return out


def feature_extractor(manifest: dict[str, Any], records_dir: str, weights: str | None) -> tuple[dict[str, Any],
                                                                                                 str | None]:
  """(bundle.json's ``feature_extractor``: the records' backbone, feature_dim, image_size, backbone_config and the
  bundled weights file's path, the weights file to copy or None). The weights must be the file the records were
  extracted with (the manifest's ``backbone_config.weights_sha256``); ``UserError`` otherwise."""
  where = fileio.join(records_dir, records.MANIFEST_NAME)
  backbone_config = dict(manifest.get("backbone_config") or {})
  name, wanted = manifest["backbone"], backbone_config.get("weights")
  if wanted and not weights:
    raise errors.UserError(f"the records' features come from backbone {name!r} with the weights {wanted} ({where}: "
                           f"backbone_config, sha256 {str(backbone_config.get('weights_sha256'))[:16]}): pass "
                           "--backbone_weights=<that file> to bundle it")
  if weights and not wanted:
    raise errors.UserError(f"--backbone_weights={weights}: the records' backbone {name!r} takes no weights file "
                           f"({where}: backbone_config)")
  if weights:
    if not epath.Path(weights).is_file():
      raise errors.UserError(f"--backbone_weights={weights} does not exist")
    have, want = records.sha256_file(weights), backbone_config.get("weights_sha256")
    if want and have != want:
      raise errors.UserError(f"--backbone_weights={weights} (sha256 {have[:16]}) is not the file the records were "
                             f"extracted with ({where}: backbone_config.weights_sha256 {want[:16]})")
  return {"backbone": name, "feature_dim": int(manifest["feature_dim"]), "image_size": manifest.get("image_size"),
          "backbone_config": backbone_config,
          "weights_file": f"{BACKBONE_DIR}/{os.path.basename(wanted)}" if weights else None}, weights


def restore_params(workdir: str, ctx: Context, step: int | None) -> tuple[Any, int]:
  """(numpy params of checkpoint ``step`` of the run in ``workdir``, default the newest good one; the step).
  ``UserError`` when the run has no checkpoint or not ``step``."""
  directory = fileio.join(workdir, "checkpoints")
  if not epath.Path(directory).is_dir():
    raise errors.UserError(f"--workdir={workdir} has no checkpoints/: is it a training run's directory?")
  ckpt = checkpoint.Checkpointer(directory, save_every=1, async_save=False, create=False)
  try:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise errors.UserError(f"--step={step}: no such checkpoint in {directory}; its steps are {steps}" if steps else
                             f"no checkpoints in {directory}")
    params, step = ckpt.restore_params(abstract_params(ctx), step)
  finally:
    ckpt.close()
  return jax.device_get(params), step


def load_generator_run(generator_dir: str, codebook: np.ndarray, source: str) -> tuple[ml_collections.ConfigDict,
                                                                                       dict[str, Any]]:
  """(the generator run's config, G's frozen variables) of ``generator_dir`` (``source``: the flag or field that
  named it, for errors); its grid features must be the codebook's width."""
  from bigen_jax import train_generator  # pylint: disable=g-import-not-at-top
  if not epath.Path(run_config.saved_path(generator_dir)).exists():
    raise errors.UserError(f"{source}={generator_dir} is not a bigen_jax.train_generator run (no "
                           f"{run_config.CONFIG_NAME}): pass --generator_dir=RUN, or --generator_dir= for none")
  config = run_config.load(generator_dir)
  variables = train_generator.load_generator(generator_dir)
  width = config.model.feature_dim
  if width != codebook.shape[-1]:
    raise errors.UserError(f"{source}={generator_dir} draws {width}-wide grid features, but the run's visual "
                           f"vocabulary has {codebook.shape[-1]}")
  return config, variables


def preview_table(vocab: vocab_lib.Vocab, records_dir: str) -> np.ndarray | None:
  """The preview decoder's patches of ``vocab`` (``sampling.preview``), or None (with a warning) when the records
  hold no images to cut them from."""
  from bigen_jax.sampling import preview  # pylint: disable=g-import-not-at-top
  try:
    return preview.load_or_build_patch_table(vocab, records_dir)
  except records.DataError as e:
    logging.warning("the bundle has no generator and no preview patches (%s): it captions, but draws nothing", e)
    return None


def write_atomically(out: str, write: Callable[[str], None]) -> None:
  """``write(tmp)`` into a temporary sibling of ``out``, then published as ``out`` (see the module docstring). A
  non-empty ``out`` that is not a bundle is never replaced (``UserError``)."""
  out = fileio.absolute(out).rstrip("/")
  target = epath.Path(out)
  if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / META_NAME).exists())):
    raise errors.UserError(f"--out={out} exists and is not a bundle (no {META_NAME}): choose another path")
  tmp = epath.Path(f"{out}.tmp{os.getpid()}")
  if tmp.exists():
    tmp.rmtree()
  try:
    write(os.fspath(tmp))
    if fileio.is_url(out):
      _copy_over(os.fspath(tmp), out)
    else:
      _fsync_tree(os.fspath(tmp))
      fileio.replace_directory(os.fspath(tmp), out)
  finally:
    if tmp.exists():
      tmp.rmtree()


def _fsync_tree(root: str) -> None:
  """fsyncs every file and folder under ``root`` (local)."""
  for folder, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        os.fsync(f.fileno())
    fileio.fsync_folder(folder)


def _copy_over(tmp: str, out: str) -> None:
  """Object stores: the old bundle removed, then every file of ``tmp`` copied to ``out``, its record last."""
  target = epath.Path(out)
  if target.exists():
    target.rmtree()
  for rel in [*fileio.read_json(fileio.join(tmp, RECORD_NAME))["files"], RECORD_NAME]:
    (target / rel).parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(tmp) / rel).copy(target / rel, overwrite=True)


# ------------------------------------------------------------------------------------------------------- load


def load_bundle(path: str, *, verify: bool = True) -> Bundle:
  """The bundle in ``path`` (local or a URL), checked (see the module docstring); ``verify`` False skips the
  sha256 of every file (the shapes are still checked). ``BundleError`` naming the file on any problem."""
  from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
  path = fileio.absolute(path).rstrip("/")
  meta = read_meta(path)
  if verify:
    try:
      why = checkpoint.verify_step(path)
    except FileNotFoundError:
      why = f"{RECORD_NAME} is missing (an unfinished export?)"
    if why:
      raise BundleError(f"bundle {path}: {why}")
  required = [run_config.CONFIG_NAME, PARAMS_DIR, VOCAB_NAME, CODEBOOK_NAME]
  required += [f"{GENERATOR_DIR}/{run_config.CONFIG_NAME}", GENERATOR_VARIABLES] if meta.get("generator") else []
  required += [PREVIEW_NAME] if meta.get("preview") else []
  required += [meta["feature_extractor"]["weights_file"]] if meta["feature_extractor"].get("weights_file") else []
  for rel in required:
    if not epath.Path(fileio.join(path, rel)).exists():
      raise BundleError(f"{fileio.join(path, rel)} is missing: bigen_jax.export writes it ({META_NAME} lists it)")
  config = run_config.with_added_fields(run_config.load(path))
  model = config.model
  vocab_file = fileio.join(path, VOCAB_NAME)
  tok = tokenizer_lib.load_tokenizer(vocab_file, expected_vocab_size=model.vocab_size)
  codebook = _read_npy(fileio.join(path, CODEBOOK_NAME), np.float32)
  if codebook.shape != (model.num_clusters, model.visual_feat_dim):
    raise BundleError(f"{fileio.join(path, CODEBOOK_NAME)} has shape {codebook.shape}, but the model of "
                      f"{run_config.saved_path(path)} reads {model.num_clusters} clusters of {model.visual_feat_dim} "
                      "features (model.num_clusters, model.visual_feat_dim)")
  params = _read_tree(fileio.join(path, PARAMS_DIR), abstract_params(context(config, tok, codebook)),
                      f"the model of {run_config.saved_path(path)}", convert_io)
  bundle = Bundle(path=path, meta=meta, config=config, params=params, tokenizer=tok, codebook=codebook)
  if meta.get("generator"):
    from bigen_jax.models import spade  # pylint: disable=g-import-not-at-top
    gen_config = run_config.load(fileio.join(path, GENERATOR_DIR))
    boxed = jax.eval_shape(lambda: spade.init_generator(gen_config.model, jax.random.key(0)))
    bundle.generator = _read_tree(fileio.join(path, GENERATOR_VARIABLES), nn.unbox(boxed),
                                  f"the generator of {run_config.saved_path(fileio.join(path, GENERATOR_DIR))}",
                                  convert_io)
    if gen_config.model.feature_dim != codebook.shape[1]:
      raise BundleError(f"{run_config.saved_path(fileio.join(path, GENERATOR_DIR))}: the generator draws "
                        f"{gen_config.model.feature_dim}-wide grid features, {CODEBOOK_NAME} has {codebook.shape[1]}")
  if meta.get("preview"):
    bundle.preview_table = _read_npy(fileio.join(path, PREVIEW_NAME), np.uint8)
    if bundle.preview_table.ndim != 4 or bundle.preview_table.shape[0] != codebook.shape[0]:
      raise BundleError(f"{bundle.file(PREVIEW_NAME)} has shape {bundle.preview_table.shape}: expected "
                        f"[{codebook.shape[0]}, patch, patch, 3], one patch per cluster of {CODEBOOK_NAME}")
  return bundle


def read_meta(path: str) -> dict[str, Any]:
  """bundle.json of the bundle in ``path``, of this format version (``BundleError`` otherwise)."""
  where = fileio.join(path, META_NAME)
  if not epath.Path(where).exists():
    raise BundleError(f"{where} is missing: {path} is not a bundle, or its export did not finish "
                      "(python -m bigen_jax.export writes one)")
  try:
    meta = fileio.read_json(where)
  except ValueError as e:
    raise BundleError(f"{where} is not JSON (corrupt?): {e}") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("feature_extractor"), dict):
    raise BundleError(f"{where} is not a bundle's {META_NAME}: it has no feature_extractor")
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise BundleError(f"{where}: format_version {version!r}, but bigen_jax {versions()['bigen_jax']} reads format "
                      f"{FORMAT_VERSION}: export the run again with this version")
  return meta


def _read_npy(path: str, dtype) -> np.ndarray:
  try:
    array = vocab_lib.load_npy(path)
  except (ValueError, OSError, EOFError) as e:
    raise BundleError(f"{path} is not a readable .npy file ({type(e).__name__}: {e})") from None
  if array.dtype != dtype:
    raise BundleError(f"{path} holds {array.dtype} values, expected {np.dtype(dtype)}")
  return array


def _read_tree(path: str, abstract: Any, what: str, convert_io) -> Any:
  """The orbax tree in ``path`` (numpy), checked against ``abstract``'s paths and shapes (``what`` names it)."""
  try:
    tree = convert_io.load_params(path)
  except Exception as e:  # pylint: disable=broad-exception-caught  (orbax and tensorstore raise many kinds)
    raise BundleError(f"{path} cannot be read ({type(e).__name__}: {str(e).strip()[:300]})") from None
  missing, extra, bad = convert_io.param_tree_mismatches(abstract, tree)
  if missing or extra or bad:
    flat = flax.traverse_util.flatten_dict(tree)
    bad = [f"{'/'.join(k)} {np.shape(flat[k])}" for k in bad]
    raise BundleError(f"{path} does not fit {what}: missing {['/'.join(k) for k in missing][:5]}, unexpected "
                      f"{['/'.join(k) for k in extra][:5]}, shape mismatch {bad[:5]}")
  return tree


# ------------------------------------------------------------------------------------------------ command line


def main() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bigen_jax import cli  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string("workdir", None, "The training run's directory (config.json, checkpoints/).",
                                required=True)
  out = flags.DEFINE_string("out", None, "The bundle directory to write (local or a URL).", required=True)
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
  bf16 = flags.DEFINE_bool("bf16", False, "Store the params in bfloat16 (half the size).")
  generator_dir = flags.DEFINE_string("generator_dir", None, "A bigen_jax.train_generator run to bundle (default: "
                                      "the run's eval.generation.generator_dir; empty: none, the preview decoder).")
  weights = flags.DEFINE_string("backbone_weights", None, "The feature extractor's weights file, when the records' "
                                "backbone has one (its sha256 is checked against the records' manifest).")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(export(workdir.value, out.value, step=step.value, bf16=bf16.value, generator_dir=generator_dir.value,
                 backbone_weights=weights.value))

  cli.run(run)


if __name__ == "__main__":
  main()
