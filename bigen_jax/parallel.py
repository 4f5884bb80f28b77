"""Device mesh, logical-axis sharding rules and multi-process start-up.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with sharded params)
and ``tensor`` (model parallelism over heads / FFN / vocabulary). Models name every parameter and main
activation with logical axes (``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``); the rules
table of the config (``configs/model.py: AXIS_RULES``) maps those names to mesh axes. Typical use::

  mesh = parallel.make_mesh(config)
  rules = parallel.axis_rules(config)
  shardings = parallel.param_shardings(boxed_abstract_params, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(init_fn, out_shardings=shardings)(rng)
"""

from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from bigen_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")


def axis_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules table of ``config`` as a tuple of (logical name, mesh axes or None)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.axis_rules)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor) from ``config.mesh``; at most one may be -1 (= the remaining devices)."""
  sizes = [int(config.mesh.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {num_devices}")
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default all), automatic (GSPMD) axis types."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (boxed) params or their ``jax.eval_shape`` (unnamed leaves: replicated)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings of boxed (abstract) params from their logical axis names, each fitted to its shape
  (``fit_shardings``): the layout every trainer's state starts from."""
  return fit_shardings(nn.unbox(boxed_params), logical_shardings(boxed_params, mesh, rules))


def opt_state_shardings(tx: Any, abstract_params: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of ``tx``'s state for params ``abstract_params``: moments sharded like their params
  (``params_shardings``), everything else (counts, schedule state) replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, abstract_params),
                                          params_shardings, transform_non_params=lambda _: replicated)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays: leading axis split over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def initialize_distributed(cfg: ml_collections.ConfigDict | None) -> None:
  """Starts multi-process JAX when ``cfg`` (``config.distributed``) asks for it.

  cfg fields: num_processes (> 1 to start), coordinator_address, process_id, local_device_ids (optional: this
  process's devices, e.g. "0,1", for several processes on one host), cpu_collectives ("gloo" for multi-process CPU
  runs). With no cfg, or one process, nothing happens (TPU pods and SLURM can call ``jax.distributed.initialize()``
  with no arguments by setting ``auto=True``).
  """
  if cfg is None:
    return
  local_device_ids = cfg.get("local_device_ids") or None
  if isinstance(local_device_ids, str):
    try:
      local_device_ids = [int(i) for i in local_device_ids.split(",")]
    except ValueError:
      raise errors.ConfigError(f"--config.distributed.local_device_ids={cfg.local_device_ids!r}: expected device "
                               "numbers separated by commas, e.g. 0,1") from None
  if cfg.get("auto"):
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return
  if int(cfg.get("num_processes") or 1) <= 1:
    return
  if cfg.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=int(cfg.num_processes),
                             process_id=int(cfg.process_id), local_device_ids=local_device_ids)
  logging.info("distributed: process %d of %d", jax.process_index(), jax.process_count())


def fit_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Drops mesh axes from dimensions they do not divide (e.g. a 30,522-word vocabulary over 8 tensor
  shards): those dimensions are replicated instead, and the rest of the layout is kept."""
  def fit(leaf, sharding):
    if not isinstance(sharding, NamedSharding):
      return sharding
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    for i, axes in enumerate(spec[:len(leaf.shape)]):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = int(np.prod([sharding.mesh.shape[n] for n in names])) if names else 1
      if leaf.shape[i] % size:
        logging.info("replicating dimension %d (size %d) of a %s parameter: %s does not divide it", i,
                     leaf.shape[i], leaf.shape, names)
        spec[i] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:len(leaf.shape)]))
  return jax.tree.map(fit, abstract_tree, shardings)
