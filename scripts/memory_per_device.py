r"""Memory and collective bytes per device of a training step at a config's scale, for several mesh layouts,
without data or accelerators.

  python scripts/memory_per_device.py --devices 8,16 --out memory.md     # configs/coco.py, its batch (256)
  python scripts/memory_per_device.py --devices 8,64,256 --model 1b --tasks i2t --out memory_1b.md
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

Collectives (``bigen_jax/collectives.py``): the bytes one device sends in one step by the ring algorithms' formulas
(all-gather (n-1) S of its shard S, reduce-scatter (n-1)/n S, all-reduce 2 (n-1)/n S, all-to-all (n-1)/n S,
collective-permute S; n the replica group), each op counted as often as it runs (the scanned layers' loops).
``sent`` reads the step as the SPMD partitioner writes it, before any backend pass (the same on CPU, GPU and TPU;
XLA dumps it during the compile), with each all-reduce whose users all take a 1/n dynamic slice counted as the
reduce-scatter GPU and TPU compilers make of it; its columns split it by kind. ``XLA:CPU program``: the same
count over the compiled CPU program (``compiled.as_text()``), which widens bf16 collectives to f32 and keeps
those all-reduces whole.

Sizes the data decides (vocabulary, caption length, feature width, clusters; -1 in the config) are taken from
``configs/model.py``'s paper model, COCO's: no records, tokenizer or vocabulary are read. ``--model`` swaps in
another variant of ``configs/model.py`` (e.g. ``1b``): its fields that differ from the paper model's replace the
config's, and ``--config.model.*`` flags apply over them.
"""

import dataclasses
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top

from bigen_jax import cli  # pylint: disable=g-import-not-at-top
from bigen_jax import collectives  # pylint: disable=g-import-not-at-top
from bigen_jax import errors  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", "configs/coco.py", "Training configuration file.",
                                          lock_config=False)
_DEVICES = flags.DEFINE_list("devices", ["8", "16"], "Simulated device counts, each in its own process.")
_LAYOUTS = flags.DEFINE_list("layouts", [], "Meshes as DATAxFSDPxTENSOR (e.g. 1x4x2); default for N devices: "
                             "Nx1x1, 1xNx1, 1x(N/2)x2, 1x(N/4)x4.")
_MODEL = flags.DEFINE_string("model", None, "A variant of configs/model.py (e.g. 1b) in place of the config's model.")
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
  """(data, fsdp, tensor): pure data, fsdp, fsdp x tensor over 2 and over 4 devices (those N allows)."""
  layouts = [(num_devices, 1, 1), (1, num_devices, 1)]
  for tensor in (2, 4):
    if num_devices % tensor == 0 and num_devices >= 2 * tensor:
      layouts.append((1, num_devices // tensor, tensor))
  return list(dict.fromkeys(layouts))


def parse_layout(text: str) -> tuple[int, int, int]:
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(f"--layouts: {text!r} is not DATAxFSDPxTENSOR (e.g. 1x4x2)")
  return tuple(int(p) for p in parts)


def layout_name(layout: tuple[int, int, int]) -> str:
  names = [name for name, size in zip(("data", "fsdp", "tensor"), layout) if size > 1]
  return " x ".join(names) or "one device"


def resolve_sizes(config: ml_collections.ConfigDict, *, batch_size: int | None = None, layers: int | None = None,
                  model: str | None = None, model_overrides: dict | None = None) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the data's sizes (-1) filled from the paper model, and the overrides applied:
  ``model``, a variant of ``configs/model.py`` whose fields that differ from the paper model's replace the
  config's, then ``model_overrides`` (the command line's ``--config.model.*``) over them; ``layers``, the
  language, vision and cross layer counts each."""
  from configs import model as model_configs  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  paper = model_configs.get_config("paper")
  if model:
    variant = model_configs.get_config(model)
    config.model.update({k: v for k, v in variant.items() if v != paper[k]})
    config.model.update(model_overrides or {})
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


def compile_with_partitioned_hlo(lowered) -> tuple[Any, str]:
  """(the compiled program, the HLO text right after SPMD partitioning) of a lowered jitted function: XLA dumps the
  module after its ``spmd-partitioning`` pass into a temporary directory during this compile."""
  with tempfile.TemporaryDirectory() as tmp:
    compiled = lowered.compile(compiler_options={"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"})
    paths = glob.glob(os.path.join(tmp, "*after_spmd-partitioning*.txt"))
    if len(paths) != 1:
      raise RuntimeError(f"expected one HLO dump after SPMD partitioning, XLA wrote {len(paths)}: "
                         f"{sorted(os.listdir(tmp))[:10]}")
    with open(paths[0]) as f:
      return compiled, f.read()


def collective_fields(partitioned_hlo: str, compiled_hlo: str) -> dict:
  """Row fields: bytes one device sends per step, in total and by kind (``collective_bytes``,
  ``<kind>_bytes``) from the partitioned HLO, and in total from XLA:CPU's compiled program
  (``cpu_collective_bytes``); ``collective_ops``: collectives executed per step (partitioned)."""
  sent = collectives.summarise(collectives.parse(partitioned_hlo, all_reduce_slices=True))
  cpu = collectives.summarise(collectives.parse(compiled_hlo))
  fields = {f"{kind.replace('-', '_')}_bytes": sent[kind]["sent_bytes"] for kind in collectives.KINDS}
  return {"collective_bytes": sent["total"]["sent_bytes"], "collective_ops": sent["total"]["ops"], **fields,
          "cpu_collective_bytes": cpu["total"]["sent_bytes"]}


def step_kinds(config: ml_collections.ConfigDict) -> list[str]:
  """The distinct step kinds of ``config``'s task schedule, in schedule order."""
  from bigen_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  cycle = tasks_lib.task_cycle(config.tasks, config.get("task_schedule", "cycle"), config.get("task_order", ()),
                               seed=config.seed, num_steps=config.total_steps)
  return list(dict.fromkeys(cycle))


@dataclasses.dataclass
class Setup:
  """One mesh layout's abstract training inputs: the context, optimizer, abstract state (shardings) and batch."""
  ctx: Any
  tx: Any
  schedule: Any
  abstract: Any
  shardings: Any
  batch: dict


def setup_layout(config: ml_collections.ConfigDict, layout: tuple[int, int, int]) -> Setup:
  """The train state and batch of ``config`` (data sizes resolved) as abstract arrays laid out on a
  (data, fsdp, tensor) = ``layout`` mesh over the first data x fsdp x tensor devices; nothing is allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bigen_jax import experiment, optim, parallel  # pylint: disable=g-import-not-at-top
  from bigen_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import lxmert  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.mesh.update(dict(zip(parallel.MESH_AXES, layout), num_devices=layout[0] * layout[1] * layout[2]))
  cfg.init_from = ""  # where the params start from does not change their layout
  if cfg.batch_size % (layout[0] * layout[1]):
    raise errors.ConfigError(f"batch {cfg.batch_size} does not divide over data x fsdp = {layout[0] * layout[1]}")
  mesh = parallel.make_mesh(cfg, jax.devices()[:cfg.mesh.num_devices])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  codebook = jax.ShapeDtypeStruct((cfg.model.num_clusters, cfg.model.visual_feat_dim), jnp.float32,
                                  sharding=replicated)
  ctx = experiment.Context(config=cfg, model=lxmert.build_model(cfg.model), frozen={"codebook": codebook},
                           mesh=mesh, rules=parallel.axis_rules(cfg), task_cfgs=experiment.task_configs(cfg, BERT_IDS),
                           tokenizer=BERT_IDS)
  tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.total_steps)
  abstract, shardings, _ = state_lib.create_state(ctx, tx, codebook)
  return Setup(ctx, tx, schedule, abstract, shardings, _batch_spec(cfg, ctx.batch_sharding()))


def compile_step(setup: Setup, task: str) -> tuple[Any, str]:
  """(XLA's compiled program, its HLO right after SPMD partitioning) of ``task``'s training step on ``setup``."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax import train  # pylint: disable=g-import-not-at-top
  ctx = setup.ctx
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    step = train.make_train_step(ctx, task, setup.tx, setup.schedule, setup.shardings)
    return compile_with_partitioned_hlo(step.lower(setup.abstract, setup.batch, ctx.frozen))


def measure(config: ml_collections.ConfigDict, layouts, tasks=()) -> list[dict]:
  """One row per (layout, step kind) over this process's devices: the state's and XLA's bytes per device, and
  the collective bytes each device sends per step.

  ``config`` has its data sizes resolved (``resolve_sizes``); ``layouts`` are (data, fsdp, tensor) whose product
  is the device count; ``tasks`` default to the config's schedule. Compiles, never runs, each step."""
  import jax  # pylint: disable=g-import-not-at-top
  from bigen_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  tasks = list(tasks) or step_kinds(config)
  trained = {t for t in config.tasks if config.tasks[t].weight > 0} | set(tasks) - {tasks_lib.JOINT}
  needs_data = sorted(trained - set(DATA_FREE_TASKS))
  if needs_data:
    raise errors.ConfigError(f"tasks {needs_data} read frozen inputs from the data (CIDEr tables, CLIP, answers): "
                             f"this script measures {DATA_FREE_TASKS} only")
  rows = []
  for layout in layouts:
    setup = setup_layout(config, layout)
    abstract = setup.abstract
    params, params_total, params_whole = _bytes_per_device(abstract.params)
    opt, opt_total, _ = _bytes_per_device(abstract.opt_state)
    state, _, _ = _bytes_per_device(abstract)
    base = {"devices": setup.ctx.mesh.size, "mesh": "x".join(map(str, layout)), "layout": layout_name(layout),
            "data": layout[0], "fsdp": layout[1], "tensor": layout[2], "batch_size": setup.ctx.config.batch_size,
            "num_params": sum(int(x.size) for x in jax.tree.leaves(abstract.params)),
            "params_bytes": params, "params_bytes_total": params_total, "params_bytes_replicated": params_whole,
            "opt_bytes": opt, "opt_bytes_total": opt_total, "state_bytes": state}
    for task in tasks:
      start = time.perf_counter()
      compiled, partitioned = compile_step(setup, task)
      compile_s = time.perf_counter() - start
      analysis = compiled.memory_analysis()
      xla = {"argument_bytes": analysis.argument_size_in_bytes, "output_bytes": analysis.output_size_in_bytes,
             "alias_bytes": analysis.alias_size_in_bytes, "temp_bytes": analysis.temp_size_in_bytes,
             "code_bytes": analysis.generated_code_size_in_bytes}
      xla["total_bytes"] = xla["argument_bytes"] + xla["output_bytes"] + xla["temp_bytes"] - xla["alias_bytes"]
      xla.update(collective_fields(partitioned, compiled.as_text()))
      rows.append({**base, "task": task, **xla, "compile_s": round(compile_s, 1),
                   "measure_s": round(time.perf_counter() - start, 1)})
      print(format_row(rows[-1], _columns(rows)), flush=True)
  return rows


MEMORY_COLUMNS = (("params / device", "params_bytes"), ("optimizer / device", "opt_bytes"),
                  ("XLA temporaries", "temp_bytes"), ("generated code", "code_bytes"),
                  ("total / device", "total_bytes"))
COLLECTIVE_COLUMNS = (("sent / device / step", "collective_bytes"), ("all-gather", "all_gather_bytes"),
                      ("reduce-scatter", "reduce_scatter_bytes"), ("all-reduce", "all_reduce_bytes"),
                      ("all-to-all", "all_to_all_bytes"), ("collective-permute", "collective_permute_bytes"),
                      ("XLA:CPU program sends", "cpu_collective_bytes"))
BOLD = ("total_bytes", "collective_bytes")
# Optional columns: shown only where a row has a nonzero value (XLA's CPU compiler reports no generated code).
OPTIONAL = ("code_bytes", "all_to_all_bytes", "collective_permute_bytes")


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
  """The byte columns of ``rows``: memory, then collectives; optional ones only where some row has them."""
  return [(name, key) for name, key in MEMORY_COLUMNS + COLLECTIVE_COLUMNS
          if key not in OPTIONAL or any(r.get(key) for r in rows)]


def format_row(row: dict, columns=MEMORY_COLUMNS + COLLECTIVE_COLUMNS) -> str:
  cells = [str(row["devices"]), row["layout"], row["mesh"], row["task"]]
  for _, key in columns:
    cell = f"{row[key] / MIB:,.1f} MiB"
    cells.append(f"**{cell}**" if key in BOLD else cell)
  return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict], command: str, model: str = "") -> str:
  """The rows as a markdown table under the command, the model's size and each worker process's time."""
  first, columns = rows[0], _columns(rows)
  header = ["devices", "layout", "mesh (data x fsdp x tensor)", "step"] + [name for name, _ in columns]
  workers = {r["devices"]: r for r in rows if "worker_s" in r}
  lines = [f"`{command}`", "",
           f"Model{f' {model}' if model else ''}: {first['num_params'] / 1e6:,.1f}M parameters "
           f"({first['params_bytes_total'] / MIB:,.1f} MiB; optimizer state {first['opt_bytes_total'] / MIB:,.1f} "
           f"MiB); global batch {first['batch_size']}. Memory per device; collectives: bytes one device sends per "
           "step (partitioned HLO, reduce-scatters as GPU/TPU form them; last column: XLA:CPU's compiled program).",
           "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += [format_row(r, columns) for r in rows]
  if workers:
    lines += ["", "Worker processes (one per device count; time, peak resident memory): " + "; ".join(
        f"{n} devices {r['worker_s']:.0f} s, {r['worker_rss_bytes'] / 2**30:.1f} GiB" for n, r in workers.items())
              + "."]
  return "\n".join(lines) + "\n"


def _run_workers(device_counts: list[int]) -> list[dict]:
  """Re-runs this script with ``--worker`` once per device count, each with its simulated devices; adds each
  worker's wall time (``worker_s``) to its rows."""
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
      elapsed = time.perf_counter() - start
      with open(out) as f:
        rows += [{**row, "worker_s": round(elapsed, 1)} for row in json.load(f)]
      print(f"{n} devices: {elapsed:.0f} s", flush=True)
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
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    config = resolve_sizes(_CONFIG.value, batch_size=_BATCH_SIZE.value, layers=_LAYERS.value, model=_MODEL.value,
                           model_overrides={k[len("model."):]: v for k, v in overrides.items()
                                            if k.startswith("model.")})
    mine = [l for l in layouts if l[0] * l[1] * l[2] == n]
    rows = measure(config, mine or default_layouts(n), _TASKS.value)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rows = [{**row, "worker_rss_bytes": peak} for row in rows]
    with open(_JSON.value, "w") as f:
      json.dump(rows, f)
    return
  sizes = {l[0] * l[1] * l[2] for l in layouts}
  if layouts and sizes != set(counts):
    raise app.UsageError(f"--layouts {_LAYOUTS.value} are meshes of {sorted(sizes)} devices, --devices "
                         f"{_DEVICES.value}: give each device count its layouts, and no other")
  rows = _run_workers(counts)
  command = "python scripts/memory_per_device.py " + " ".join(sys.argv[1:])
  table = markdown(rows, command.strip(), _MODEL.value or "")
  print(table)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(table)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
