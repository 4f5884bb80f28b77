r"""``train_generator(config, workdir)``: trains X-LXMERT's SPADE image generator (METHOD.md §6) once on (image,
centroid grid) pairs of the records; it is then frozen (``spade.decode_image``).

  python -m bigen_jax.train_generator --config configs/generator.py:demo --workdir demo_out/generator \
      --config.data.records_dir=demo_out/records --config.data.vocab_dir=demo_out/vocab

Input: each record's stored image (decoded and resized to ``model.image_size`` as the evaluators do; uint8 on
the host, [-1, 1] in the step) and its cells' cluster ids. The generator reads the *quantised* grid,
codebook[cluster ids] [B, 8, 8, D], what T2I's tokens give it at generation time; the ACGAN target is each cell's
cluster id.

One jitted step (``make_train_step``): a D update (hinge and ACGAN on real and generated images; D's spectral
vectors advance), then a G update against the updated D (hinge, ACGAN, feature matching, and the perceptual loss
through the frozen ResNet-50 when ``config.perceptual`` gives one). G's spectral vectors advance in the forward
pass of the D update. Frozen inputs (the codebook, the ResNet-50) are jit arguments, replicated, never updated.
State, shardings (the mesh and logical-axis rules of ``bigen_jax.parallel`` and ``config.axis_rules``: data over
the batch axes, D's ACGAN head over ``tensor``, the rest replicated) and the step are this module's; the loop
(progress, metrics, checkpoints, exact resume, SIGTERM, profiler) is ``bigen_jax.loop``'s, as for stage 1.

``load_generator(workdir[, step])`` reads G back from a checkpoint, frozen, for ``spade.decode_image`` and
``bigen_jax.text_to_image``; ``load_or_train`` is make demo's cached, resumable step.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice would precede one-line errors

from typing import Any  # pylint: disable=g-import-not-at-top

from absl import logging  # pylint: disable=g-import-not-at-top
from etils import epath  # pylint: disable=g-import-not-at-top
import flax  # pylint: disable=g-import-not-at-top
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import flax.traverse_util  # pylint: disable=g-import-not-at-top
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
from bigen_jax import viz  # pylint: disable=g-import-not-at-top
from bigen_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
from bigen_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from bigen_jax.data import records  # pylint: disable=g-import-not-at-top
from bigen_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
from bigen_jax.eval import eval_set  # pylint: disable=g-import-not-at-top
from bigen_jax.models import resnet  # pylint: disable=g-import-not-at-top
from bigen_jax.models import spade  # pylint: disable=g-import-not-at-top
from bigen_jax.models import spade_losses  # pylint: disable=g-import-not-at-top

TASK = "gan"  # the loop's name of the step: metrics are logged as gan/<net>/<metric>
NETS = ("generator", "discriminator")


@flax.struct.dataclass
class GANState:
  """step int32 []; params, spectral (the spectral-norm vectors u) and opt_state (Adam), each
  {"generator", "discriminator"}; rng uint32 [2] (raw key data)."""
  step: jax.Array
  params: Any
  spectral: Any
  opt_state: Any
  rng: jax.Array


_require = config_checks.require


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the flag for a config that cannot run on this job's devices."""
  config_checks.check_loop_fields(config)
  _require(config.eval.num_examples >= 0, "eval.num_examples", config.eval.num_examples, "must be >= 0")
  for net in NETS:
    lr = config.optimizer[f"{net}_lr"]
    _require(lr > 0, f"optimizer.{net}_lr", lr, "must be positive")
  _require(not (config.perceptual.weights and config.perceptual.random), "perceptual.random",
           config.perceptual.random, "a random ResNet-50 or --config.perceptual.weights, not both")
  try:
    spade.num_blocks(config.model.image_size)
  except ValueError as e:
    raise errors.ConfigError(f"--config.model.image_size: {e}") from None
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


def resolve_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, vocab_lib.Vocab]:
  """(config with ``model.feature_dim`` and ``model.num_clusters`` from the visual vocabulary, the vocabulary);
  errors name the flag or the file."""
  config = ml_collections.ConfigDict(config.to_dict())
  for flag in ("records_dir", "vocab_dir"):
    if not config.data[flag]:
      raise errors.ConfigError(f"--config.data.{flag} is empty: point it at the output of tools/ (see README)")
  if not records.read_manifest(config.data.records_dir).get("store_images"):
    raise records.DataError(f"the records in {config.data.records_dir} hold no images: extract them with "
                            "tools/extract_features.py --store_images to train the image generator")
  vocab = vocab_lib.load_vocab(config.data.vocab_dir, records_dir=config.data.records_dir)
  for field, value in {"feature_dim": int(vocab.codebook.shape[1]), "num_clusters": vocab.k}.items():
    if config.model[field] == -1:
      config.model[field] = value
    elif config.model[field] != value:
      raise errors.ConfigError(f"--config.model.{field}={config.model[field]} but the visual vocabulary "
                               f"{config.data.vocab_dir} has {value}")
  return config, vocab


def make_optimizers(config: ml_collections.ConfigDict) -> dict[str, tuple[optax.GradientTransformation,
                                                                          optax.Schedule]]:
  """{net: (Adam, its learning-rate schedule)}: ``config.optimizer``'s b1, b2, eps and ``<net>_lr``, scheduled
  as ``optim.learning_rate_schedule`` (``schedule``, ``warmup_fraction``) over ``config.total_steps``."""
  cfg = config.optimizer
  out = {}
  for net in NETS:
    schedule = optim.learning_rate_schedule(ml_collections.ConfigDict(dict(
        schedule=cfg.schedule, lr=cfg[f"{net}_lr"], warmup_fraction=cfg.warmup_fraction)), config.total_steps)
    out[net] = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), schedule
  return out


def create_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules,
                 optimizers: dict[str, tuple[Any, optax.Schedule]]):
  """(abstract ``GANState`` with shardings, the shardings, ``init(rng)`` placing a new state on the mesh).

  optimizers: ``make_optimizers``' {net: (Adam, schedule)}. Param and spectral shardings follow the logical-axis
  names of ``spade`` through ``rules``; each Adam state is sharded like its params.
  """
  model = config.model
  txs = {net: tx for net, (tx, _) in optimizers.items()}

  def boxed_variables(rng):
    g_rng, d_rng = jax.random.split(rng)
    return {"generator": spade.init_generator(model, g_rng), "discriminator": spade.init_discriminator(model, d_rng)}

  boxed = jax.eval_shape(boxed_variables, jax.random.key(0))
  plain = nn.unbox(boxed)
  var_sh = parallel.param_shardings(boxed, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params_sh = {net: var_sh[net]["params"] for net in NETS}
  opt_sh = {net: parallel.opt_state_shardings(txs[net], plain[net]["params"], params_sh[net], mesh) for net in NETS}
  shardings = GANState(step=replicated, params=params_sh, spectral={net: var_sh[net]["spectral"] for net in NETS},
                       opt_state=opt_sh, rng=replicated)

  def init(rng):
    var_rng, state_rng = jax.random.split(rng)
    variables = nn.unbox(boxed_variables(var_rng))
    params = {net: variables[net]["params"] for net in NETS}
    return GANState(step=jnp.zeros((), jnp.int32), params=params,
                    spectral={net: variables[net]["spectral"] for net in NETS},
                    opt_state={net: txs[net].init(params[net]) for net in NETS}, rng=jax.random.key_data(state_rng))

  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          jax.eval_shape(init, jax.random.key(0)), shardings)
  return abstract, shardings, jax.jit(init, out_shardings=shardings)


def _halves(out: spade.DiscriminatorOutput, n: int) -> tuple[spade.DiscriminatorOutput, spade.DiscriminatorOutput]:
  """D's outputs on [real; fake] (2n images) -> (on real, on fake)."""
  return jax.tree.map(lambda x: x[:n], out), jax.tree.map(lambda x: x[n:], out)


def make_train_step(config: ml_collections.ConfigDict, optimizers: dict[str, tuple[Any, optax.Schedule]],
                    shardings: GANState, mesh: jax.sharding.Mesh):
  """One jitted GAN update (see the module docstring): (state, batch, frozen) -> (state, metrics); donates the
  old state. optimizers: ``make_optimizers``' {net: (Adam, schedule)}.

  batch: image uint8 [B, S, S, 3], cluster_ids int32 [B, 64] (sharded over the batch axes). frozen: codebook
  [K, D], and resnet ({"params", "batch_stats"}) for the perceptual loss. metrics: loss (D's + G's: the loop stops
  on a non-finite one), discriminator/* and generator/* (``spade_losses``' metrics, grad_norm, lr).
  """
  generator, discriminator = spade.build_generator(config.model), spade.build_discriminator(config.model)
  txs = {net: tx for net, (tx, _) in optimizers.items()}
  schedules = {net: schedule for net, (_, schedule) in optimizers.items()}
  weights = dict(config.loss_weights)
  perceptual_dtype = jnp.dtype(config.perceptual.dtype)

  def step(state: GANState, batch, frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    real = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    ids = batch["cluster_ids"]
    grid = spade.centroid_grid(frozen["codebook"], ids)
    n = real.shape[0]
    fake, g_spectral = generator.apply(
        {"params": state.params["generator"], "spectral": state.spectral["generator"]}, grid, update_stats=True,
        mutable=["spectral"], rngs={"noise": rng})
    g_spectral = nn.unbox(g_spectral["spectral"])
    fake = jax.lax.stop_gradient(fake)

    def d_objective(params):
      out, spectral = discriminator.apply({"params": params, "spectral": state.spectral["discriminator"]},
                                          jnp.concatenate([real, fake]), update_stats=True, mutable=["spectral"])
      real_out, fake_out = _halves(out, n)
      loss, metrics = spade_losses.discriminator_loss(real=real_out, fake=fake_out, cluster_ids=ids,
                                                      weights=weights)
      return loss, (metrics, nn.unbox(spectral["spectral"]))

    (d_loss, (d_metrics, d_spectral)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(
        state.params["discriminator"])
    updates, d_opt = txs["discriminator"].update(d_grads, state.opt_state["discriminator"],
                                                 state.params["discriminator"])
    d_params = optax.apply_updates(state.params["discriminator"], updates)
    d_variables = {"params": d_params, "spectral": d_spectral}

    perceptual_fn = None
    if "resnet" in frozen:
      def perceptual_fn(x, y):
        return resnet.perceptual_loss(frozen["resnet"], x, y, dtype=perceptual_dtype)

    def g_objective(params):
      images = generator.apply({"params": params, "spectral": g_spectral}, grid, rngs={"noise": rng})
      real_out, fake_out = _halves(discriminator.apply(d_variables, jnp.concatenate([real, images])), n)
      return spade_losses.generator_loss(fake=fake_out, real=real_out, cluster_ids=ids, weights=weights,
                                         perceptual_fn=perceptual_fn, fake_images=images, real_images=real)

    (g_loss, g_metrics), g_grads = jax.value_and_grad(g_objective, has_aux=True)(state.params["generator"])
    updates, g_opt = txs["generator"].update(g_grads, state.opt_state["generator"], state.params["generator"])
    g_params = optax.apply_updates(state.params["generator"], updates)

    metrics = {"loss": d_loss + g_loss}
    for net, net_metrics, grads in (("discriminator", d_metrics, d_grads), ("generator", g_metrics, g_grads)):
      metrics.update({f"{net}/{k}": v for k, v in net_metrics.items()})
      metrics[f"{net}/grad_norm"] = optax.tree.norm(grads)
      metrics[f"{net}/lr"] = schedules[net](state.step)
    return state.replace(step=state.step + 1, params={"generator": g_params, "discriminator": d_params},
                         spectral={"generator": g_spectral, "discriminator": d_spectral},
                         opt_state={"generator": g_opt, "discriminator": d_opt}), metrics

  data = parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(shardings, data, None), out_shardings=(shardings, None), donate_argnums=(0,))


def load_perceptual_net(cfg: ml_collections.ConfigDict, seed: int) -> dict[str, Any] | None:
  """The frozen ResNet-50's variables ({"params", "batch_stats"}, numpy or on the default device) that
  ``cfg`` (``config.perceptual``) asks for: converted weights, a random initialisation, or None."""
  if cfg.weights:
    if not epath.Path(cfg.weights).exists():
      raise errors.ConfigError(f"--config.perceptual.weights={cfg.weights} does not exist: convert torchvision's "
                               "ResNet-50 with tools/convert_resnet.py")
    from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
    variables = convert_io.load_params(cfg.weights)
    want = flax.traverse_util.flatten_dict(resnet.abstract_variables(resnet.ResNet50(
        num_classes=resnet.num_classes_of(variables))))
    have = flax.traverse_util.flatten_dict(variables)
    if {k: tuple(v.shape) for k, v in want.items()} != {k: tuple(np.shape(v)) for k, v in have.items()}:
      raise errors.ConfigError(f"--config.perceptual.weights={cfg.weights} is not a ResNet-50 of "
                               "tools/convert_resnet.py (its variables' names or shapes differ)")
    return variables
  if cfg.random:
    net = resnet.ResNet50()
    return jax.jit(lambda: net.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32)))()
  return None


def image_pairs(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
  """A pipeline batch (``with_images``) -> {"image": uint8 [B, S, S, 3], "cluster_ids": int32 [B, 64]}: each
  stored image decoded and resized to S x S as the evaluators do (``eval_set.square_image``)."""
  images = [eval_set.square_image(images_lib.decode_image(png, name=f"the image of record {i}"), image_size)
            for i, png in zip(batch["index"], batch["image"])]
  return {"image": np.stack(images).astype(np.uint8), "cluster_ids": np.asarray(batch["cluster_ids"], np.int32)}


class Samples:
  """real | token map | generated for the first ``config.eval.num_examples`` records of ``data.eval_split``:
  ``samples(state, step)`` writes ``workdir/samples/step_<step>.png`` (process 0) and returns
  {"samples/l1": mean |generated - real|, images in [-1, 1]}. The noise is fixed, so pictures compare across
  steps. Every process reads the same records; the images are generated replicated."""

  def __init__(self, config: ml_collections.ConfigDict, vocab: vocab_lib.Vocab, mesh: jax.sharding.Mesh,
               workdir: str):
    n = config.eval.num_examples
    it = input_pipeline.create_iterator(
        records_dir=config.data.records_dir, split=config.data.eval_split, global_batch_size=n, seed=config.seed,
        vocab_dir=config.data.vocab_dir, train=False, with_images=True, process_index=0, process_count=1,
        shuffle_buffer=1, num_examples=n)
    batch = next(it)
    batch = {k: v[batch["valid"]] for k, v in batch.items()}
    pairs = image_pairs(batch, config.model.image_size)
    self.real, self.cluster_ids, self.k = pairs["image"], pairs["cluster_ids"], vocab.k
    self.captions = [row[0].decode("utf-8", "replace") for row in batch["captions"]]
    self.grid = np.asarray(spade.centroid_grid(jnp.asarray(vocab.codebook), jnp.asarray(self.cluster_ids)))
    self.rng = jax.random.key(config.seed)
    self.workdir = workdir
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._decode = jax.jit(spade.decode_image, out_shardings=replicated)

  def __call__(self, state: GANState, step: int) -> dict[str, float]:
    variables = {"params": state.params["generator"], "spectral": state.spectral["generator"]}
    fake = np.asarray(jax.device_get(self._decode(variables, self.grid, self.rng)))
    l1 = float(np.mean(np.abs(fake - (self.real.astype(np.float32) / 127.5 - 1.0))))
    if jax.process_index() == 0:
      pixels = np.asarray(spade.to_uint8(fake))
      tile = max(self.real.shape[1], 128)
      rows = [[real, viz.token_map(ids, self.k, size=tile), generated]
              for real, ids, generated in zip(self.real, self.cluster_ids, pixels)]
      viz.save_png(viz.captioned_grid(rows, self.captions, tile=tile),
                   fileio.join(self.workdir, "samples", f"step_{step:06d}.png"))
    return {"samples/l1": l1}


def train_generator(config: ml_collections.ConfigDict, workdir: str) -> GANState:
  """Trains the GAN ``config.total_steps`` steps (resuming from ``workdir``); returns the final state. G's
  frozen variables for ``spade.decode_image`` are {"params": state.params["generator"], "spectral":
  state.spectral["generator"]}."""
  check_config(config)
  config, vocab = resolve_config(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.get("num_devices") else None
  mesh, rules = parallel.make_mesh(config, devices), parallel.axis_rules(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  optimizers = make_optimizers(config)
  abstract, shardings, init = create_state(config, mesh, rules, optimizers)
  frozen = {"codebook": jax.device_put(jnp.asarray(vocab.codebook, jnp.float32), replicated)}
  perceptual = load_perceptual_net(config.perceptual, config.seed) if config.loss_weights.perceptual else None
  if perceptual is not None:
    frozen["resnet"] = jax.device_put(perceptual, replicated)
  elif config.loss_weights.perceptual:
    logging.warning("no perceptual loss: --config.perceptual.weights is empty and perceptual.random False")

  ckpt = loop.open_run(config, workdir)
  data = input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, vocab_dir=config.data.vocab_dir, with_images=True, shuffle_buffer=config.data.shuffle_buffer,
      verify_checksums=config.data.verify_checksums, sharding=config.data.sharding)
  state, start = loop.restore_or_init(ckpt, abstract, lambda: init(jax.random.key(config.seed)), data)
  batch_sharding = parallel.data_sharding(mesh)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in image_pairs(batch, config.model.image_size).items()}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = make_train_step(config, optimizers, shardings, mesh)
    counts = {net: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params[net])) for net in NETS}
    logging.info("GAN: G %d, D %d parameters; perceptual loss %s; starting at step %d", counts["generator"],
                 counts["discriminator"], "on" if perceptual is not None else "off", start)
    samples = Samples(config, vocab, mesh, workdir) if config.eval.num_examples else None
    state = loop.run(config, workdir, state=state, start=start,
                     steps={TASK: loop.BoundStep(step_fn, (frozen,))}, cycle=[TASK], data=data,
                     to_global=to_global, ckpt=ckpt, evaluate=samples)
    step = int(state.step)
    if samples is not None and step == config.total_steps and not (config.eval.every and
                                                                    step % config.eval.every == 0):
      samples(state, step)
  return state


def load_or_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """G's frozen variables (``load_generator``) of the run in ``workdir``: read back when its newest checkpoint is
  at ``config.total_steps`` (the config checked against the saved one), otherwise trained or resumed there
  first (``train_generator``); make demo's step."""
  directory, done = fileio.join(workdir, "checkpoints"), False
  if epath.Path(directory).exists():
    ckpt = checkpoint.Checkpointer(directory, save_every=1, async_save=False, create=False)
    try:
      done = ckpt.latest_step() == config.total_steps
    finally:
      ckpt.close()
  if done:
    run_config.check_resume(resolve_config(config)[0], workdir)
  else:
    train_generator(config, workdir)
  return load_generator(workdir)


def load_generator(workdir: str, step: int | None = None) -> dict[str, Any]:
  """G's frozen variables {"params", "spectral"} (numpy, on the host: a jit places them, inside a mesh or not) of
  the newest good checkpoint of the run in ``workdir`` (or of ``step``; its saved config gives the widths):
  ``spade.decode_image``'s ``gen_params``. D and the optimiser moments are not read."""
  config = run_config.load(workdir)
  if "loss_weights" not in config or "gen_width" not in config.get("model", {}):
    raise errors.ConfigError(f"{run_config.saved_path(workdir)} is not a config of bigen_jax.train_generator")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  boxed = jax.eval_shape(lambda: spade.init_generator(config.model, jax.random.key(0)))
  plain = jax.tree.map(lambda x: getattr(x, "value", x), boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), plain)
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), save_every=1, async_save=False, create=False)
  try:
    fields, _ = ckpt.restore_fields({field: {"generator": abstract[field]} for field in ("params", "spectral")},
                                    step)
  finally:
    ckpt.close()
  return jax.device_get({field: fields[field]["generator"] for field in ("params", "spectral")})


def main() -> None:
  """The command line (see the module docstring); user errors are one line on stderr (``cli.run``)."""
  cli.run_trainer(train_generator, config_help="GAN training configuration (configs/generator.py).",
                  workdir_help="Checkpoints, metrics and samples go here.")


if __name__ == "__main__":
  main()
