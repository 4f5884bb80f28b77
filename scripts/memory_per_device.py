r"""Memory per device of a training step at a config's scale, for several mesh layouts, without data or accelerators.

  python scripts/memory_per_device.py --devices 8,16 --out memory.md     # configs/coco.py, its batch (256)
  python scripts/memory_per_device.py --devices 8 --layers 1 --batch_size 32     # a quick check
  python scripts/memory_per_device.py --devices 8,16 --layouts 1x8x1,1x16x1 --batch_size 160 --tasks t2i

Each device count runs in its own process over simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``). For each mesh layout (data x fsdp x tensor) the train
state is laid out by the trainer's own code (``state.create_state`` under the config's logical-axis rules) and
each task's step (``train.make_train_step``) is compiled for the global batch, never run. Reported per device:
params and optimizer state from each leaf's shard shape x dtype size, and XLA's ``memory_analysis`` of the
compiled step: arguments (state, batch, frozen codebook), outputs, temporaries, generated code; ``total`` =
arguments + outputs + temporaries - aliased (the donated state is updated in place). Temporaries come from XLA's
CPU compiler: a GPU or TPU compiler fuses and schedules differently.

Sizes the data decides (vocabulary, caption length, feature width, clusters; -1 in the config) are taken from
``configs/model.py``'s paper model, COCO's: no records, tokenizer or vocabulary are read.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top
from bigen_jax import errors  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", "configs/coco.py", "Training configuration file.",
                                          lock_config=False)
_DEVICES = flags.DEFINE_list("devices", ["8", "16"], "Simulated device counts, each in its own process.")
_LAYOUTS = flags.DEFINE_list("layouts", [], "Meshes as DATAxFSDPxTENSOR (e.g. 1x4x2); default for N devices: "
                             "Nx1x1, 1xNx1, 1x(N/2)x2, 2x(N/4)x2.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's batch_size).")
_LAYERS = flags.DEFINE_integer("layers", None, "Language, vision and cross layers each (default: the config's).")
_TASKS = flags.DEFINE_list("tasks", [], "Step kinds to compile (default: those of the config's schedule).")
_OUT = flags.DEFINE_string("out", None, "Also write the table as markdown here.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as JSON here.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: measure in this process (its devices already set).")

MIB = 2 ** 20
# Sizes COCO's data gives the paper model (-1 in the training configs): BERT's word pieces, caption length,
# X-LXMERT's feature width, the visual vocabulary.
DATA_SIZES = ("vocab_size", "max_len", "visual_feat_dim", "num_clusters", "num_cells")
# Special token ids of BERT's uncased vocabulary ([PAD], [UNK], [CLS], [SEP], [MASK]); they do not change sizes.
BERT_IDS = types.SimpleNamespace(pad_id=0, unk_id=100, cls_id=101, sep_id=102, mask_id=103)
DATA_FREE_TASKS = ("i2t", "t2i", "ccc", "itm", "mlm")


def default_layouts(num_devices: int) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor): pure data, fsdp, fsdp x tensor, data x fsdp x tensor (those N allows)."""
  layouts = [(num_devices, 1, 1), (1, num_devices, 1)]
  if num_devices % 2 == 0 and num_devices >= 4:
    layouts.append((1, num_devices // 2, 2))
  if num_devices % 4 == 0 and num_devices >= 8:
    layouts.append((2, num_devices // 4, 2))
  return list(dict.fromkeys(layouts))


def parse_layout(text: str) -> tuple[int, int, int]:
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(f"--layouts: {text!r} is not DATAxFSDPxTENSOR (e.g. 1x4x2)")
  return tuple(int(p) for p in parts)


def layout_name(layout: tuple[int, int, int]) -> str:
  names = [name for name, size in zip(("data", "fsdp", "tensor"), layout) if size > 1]
  return " x ".join(names) or "one device"


def resolve_sizes(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
                  layers: int | None = None) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the data's sizes (-1) filled from the paper model, and the overrides applied."""
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  paper = model_configs.get_config("paper")
  for field in DATA_SIZES:
    if config.model[field] == -1:
      config.model[field] = paper[field]
  if batch_size:
    config.batch_size = batch_size
  if layers:
    config.model.update(dict(num_language_layers=layers, num_vision_layers=layers, num_cross_layers=layers))
  return config


def _bytes_per_device(tree) -> tuple[int, int, int]:
  """(bytes on one device, bytes of the whole tree, bytes of the leaves held whole on every device) of a tree of
  ``ShapeDtypeStruct``s with shardings."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  local = total = whole = 0
  for leaf in jax.tree.leaves(tree):
    size = np.dtype(leaf.dtype).itemsize
    full = int(np.prod(leaf.shape)) * size
    shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * size
    local, total = local + shard, total + full
    whole += full if shard == full else 0
  return local, total, whole


def _batch_spec(config, sharding) -> dict:
  """The training batch's fields (``bigen_jax/data/input_pipeline.py``) as abstract global arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b, m = config.batch_size, config.model
  shapes = {"text_ids": ((b, m.max_len), jnp.int32), "text_mask": ((b, m.max_len), jnp.int32),
            "dense": ((b, m.num_cells, m.visual_feat_dim), jnp.float16), "boxes": ((b, m.num_cells, 4), jnp.float32),
            "cluster_ids": ((b, m.num_cells), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def step_kinds(config: ml_collections.ConfigDict) -> list[str]:
  """The distinct step kinds of ``config``'s task schedule, in schedule order."""
  from bigen_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  cycle = tasks_lib.task_cycle(config.tasks, config.get("task_schedule", "cycle"), config.get("task_order", ()),
                               seed=config.seed, num_steps=config.total_steps)
  return list(dict.fromkeys(cycle))


def measure(config: ml_collections.ConfigDict, layouts, tasks=()) -> list[dict]:
  """One row per (layout, step kind) over this process's devices: the state's and XLA's bytes per device.

  ``config`` has its data sizes resolved (``resolve_sizes``); ``layouts`` are (data, fsdp, tensor) whose product
  is the device count; ``tasks`` default to the config's schedule. Compiles, never runs, each step."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bigen_jax import experiment, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from bigen_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  tasks = list(tasks) or step_kinds(config)
  trained = {t for t in config.tasks if config.tasks[t].weight > 0} | set(tasks) - {tasks_lib.JOINT}
  needs_data = sorted(trained - set(DATA_FREE_TASKS))
  if needs_data:
    raise errors.ConfigError(f"tasks {needs_data} read frozen inputs from the data (CIDEr tables, CLIP, answers): "
                             f"this script measures {DATA_FREE_TASKS} only")
  rows = []
  for layout in layouts:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.mesh.update(dict(zip(parallel.MESH_AXES, layout), num_devices=0))
    cfg.init_from = ""  # where the params start from does not change their layout
    mesh, rules = parallel.make_mesh(cfg), parallel.axis_rules(cfg)
    if cfg.batch_size % (layout[0] * layout[1]):
      raise errors.ConfigError(f"batch {cfg.batch_size} does not divide over data x fsdp = {layout[0] * layout[1]}")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    codebook = jax.ShapeDtypeStruct((cfg.model.num_clusters, cfg.model.visual_feat_dim), jnp.float32,
                                    sharding=replicated)
    ctx = experiment.Context(config=cfg, model=lxmert.build_model(cfg.model), frozen={"codebook": codebook},
                             mesh=mesh, rules=rules, task_cfgs=experiment.task_configs(cfg, BERT_IDS),
                             tokenizer=BERT_IDS)
    tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.total_steps)
    abstract, shardings, _ = state_lib.create_state(ctx, tx, codebook)
    params, params_total, params_whole = _bytes_per_device(abstract.params)
    opt, opt_total, _ = _bytes_per_device(abstract.opt_state)
    state, _, _ = _bytes_per_device(abstract)
    batch = _batch_spec(cfg, ctx.batch_sharding())
    base = {"devices": mesh.size, "mesh": "x".join(map(str, layout)), "layout": layout_name(layout),
            "data": layout[0], "fsdp": layout[1], "tensor": layout[2], "batch_size": cfg.batch_size,
            "num_params": sum(int(x.size) for x in jax.tree.leaves(abstract.params)),
            "params_bytes": params, "params_bytes_total": params_total, "params_bytes_replicated": params_whole,
            "opt_bytes": opt, "opt_bytes_total": opt_total, "state_bytes": state}
    for task in tasks:
      start = time.perf_counter()
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = train.make_train_step(ctx, task, tx, schedule, shardings)
        analysis = step.lower(abstract, batch, ctx.frozen).compile().memory_analysis()
      xla = {"argument_bytes": analysis.argument_size_in_bytes, "output_bytes": analysis.output_size_in_bytes,
             "alias_bytes": analysis.alias_size_in_bytes, "temp_bytes": analysis.temp_size_in_bytes,
             "code_bytes": analysis.generated_code_size_in_bytes}
      xla["total_bytes"] = xla["argument_bytes"] + xla["output_bytes"] + xla["temp_bytes"] - xla["alias_bytes"]
      rows.append({**base, "task": task, **xla, "compile_s": round(time.perf_counter() - start, 1)})
      print(format_row(rows[-1], _columns(rows)), flush=True)
  return rows


COLUMNS = (("params / device", "params_bytes"), ("optimizer / device", "opt_bytes"),
           ("XLA arguments", "argument_bytes"), ("XLA outputs", "output_bytes"), ("XLA temporaries", "temp_bytes"),
           ("generated code", "code_bytes"), ("total / device", "total_bytes"))


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
  """The byte columns; generated code only where XLA reports it (its CPU compiler reports 0)."""
  return [(name, key) for name, key in COLUMNS if key != "code_bytes" or any(r[key] for r in rows)]


def format_row(row: dict, columns=COLUMNS) -> str:
  cells = [str(row["devices"]), row["layout"], row["mesh"], row["task"]]
  cells += [f"{row[key] / MIB:,.1f} MiB" for _, key in columns]
  cells[-1] = f"**{cells[-1]}**"
  return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict], command: str) -> str:
  first, columns = rows[0], _columns(rows)
  header = ["devices", "layout", "mesh (data x fsdp x tensor)", "step"] + [name for name, _ in columns]
  lines = [f"`{command}`", "",
           f"Model: {first['num_params'] / 1e6:.1f}M parameters ({first['params_bytes_total'] / MIB:,.1f} MiB; "
           f"optimizer state {first['opt_bytes_total'] / MIB:,.1f} MiB); global batch {first['batch_size']}.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + [format_row(r, columns) for r in rows]) + "\n"


def _run_workers(device_counts: list[int]) -> list[dict]:
  """Re-runs this script with ``--worker`` once per device count, each with its simulated devices."""
  rows = []
  for n in device_counts:
    flags_env = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags_env + [f"--xla_force_host_platform_device_count={n}"]),
           "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "rows.json")
      start = time.perf_counter()
      result = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker",
                               f"--devices={n}", f"--json={out}", "--out="], env=env, check=False)
      if result.returncode:
        sys.exit(f"the {n}-device process failed (exit status {result.returncode}): see its error above")
      with open(out) as f:
        rows += json.load(f)
      print(f"{n} devices: {time.perf_counter() - start:.0f} s", flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  counts = [int(n) for n in _DEVICES.value]
  layouts = [parse_layout(text) for text in _LAYOUTS.value]
  if _WORKER.value:
    import jax  # pylint: disable=g-import-not-at-top
    (n,) = counts
    if jax.device_count() != n:
      raise errors.UserError(f"{jax.device_count()} devices, expected {n}: set XLA_FLAGS before JAX starts")
    config = resolve_sizes(_CONFIG.value, batch_size=_BATCH_SIZE.value, layers=_LAYERS.value)
    mine = [l for l in layouts if l[0] * l[1] * l[2] == n]
    rows = measure(config, mine or default_layouts(n), _TASKS.value)
    with open(_JSON.value, "w") as f:
      json.dump(rows, f)
    return
  sizes = {l[0] * l[1] * l[2] for l in layouts}
  if layouts and sizes != set(counts):
    raise app.UsageError(f"--layouts {_LAYOUTS.value} are meshes of {sorted(sizes)} devices, --devices "
                         f"{_DEVICES.value}: give each device count its layouts, and no other")
  rows = _run_workers(counts)
  command = "python scripts/memory_per_device.py " + " ".join(sys.argv[1:])
  table = markdown(rows, command.strip())
  print(table)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(table)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
