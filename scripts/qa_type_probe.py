r"""QA fine-tuning from scratch on a chosen subset of question types: which types the model learns alone, in pairs
and in the full mix (the diagnosis of issue 16's colour questions; README, X-LXMERT).

  python scripts/qa_type_probe.py --workdir DEMO_OUT/xlxmert/qa_from_scratch \
      --types colour_of,shape_of --steps 800 [--batch_size 32] [--lr 5e-4] [--config_override model.num_heads=8]

``--workdir`` is a finished QA run (its saved config names the records, vocabulary and model); its checkpoints are
not read: the model starts from a fresh initialisation (seed 0). Every training question of ``--types`` is kept in
memory and batches are drawn uniformly from them, on one device (not the trainer's one question per image per
epoch); AdamW with linear warm-up over the first tenth and cosine decay, the run's QA loss (``tasks.qa.loss``) and
visual input. After the first step and every fifth of the run it prints the loss over all training questions of
those types, the accuracy on the validation split's questions of those types (all of them) and per type, and the
seconds so far. Nothing is written.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bigen_jax import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax import run_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.data import qa_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.models import apply  # pylint: disable=g-import-not-at-top,wrong-import-position
from bigen_jax.tasks import qa  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("workdir", None, "a finished QA run whose saved config to use", required=True)
flags.DEFINE_list("types", None, "the question types to train and evaluate on", required=True)
flags.DEFINE_integer("steps", 800, "training steps")
flags.DEFINE_integer("batch_size", 32, "questions per step")
flags.DEFINE_float("lr", 5e-4, "peak learning rate")
flags.DEFINE_multi_string("config_override", [], "KEY=VALUE of the run's config (e.g. model.num_heads=8)")
FLAGS = flags.FLAGS
FIELDS = ("question_ids", "question_mask", "answer_target", "question_type", "boxes", "cluster_ids", "dense")


def questions_of(config, split: str, types: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
  """(the answer vocabulary's type names, every question of ``types`` in ``split`` as stacked arrays)."""
  data = qa_pipeline.QuestionEvalIterator(
      records_dir=config.data.records_dir, split=split, global_batch_size=256, vocab_dir=config.data.vocab_dir,
      answers_file=config.data.get("answers_file", ""), process_index=0, process_count=1)
  names = list(data.vocab.types)
  unknown = sorted(set(types) - set(names))
  if unknown:
    raise app.UsageError(f"--types {unknown}: the answer vocabulary's types are {names}")
  wanted = [names.index(t) for t in types]
  kept = {k: [] for k in FIELDS}
  for batch in data:
    rows = batch["valid"] & np.isin(batch["question_type"], wanted)
    for k in FIELDS:
      kept[k].append(batch[k][rows])
  return names, {k: np.concatenate(v) for k, v in kept.items()}


def main(argv):
  del argv
  config = run_config.get_config(FLAGS.workdir)
  for key, value in (kv.split("=", 1) for kv in FLAGS.config_override):
    node, *path = config, *key.split(".")
    for name in path[:-1]:
      node = node[name]
    old = node[path[-1]]
    node[path[-1]] = value.lower() == "true" if isinstance(old, bool) else type(old)(value)
  config.mesh.num_devices = 1  # one device: the probe's batches and evaluation slices need not divide a mesh
  ctx = experiment.build_context(config, FLAGS.workdir, training=False)
  names, train = questions_of(config, config.data.train_split, FLAGS.types)
  _, val = questions_of(config, config.data.eval_split, FLAGS.types)
  print(f"{len(train['question_type'])} training and {len(val['question_type'])} validation questions", flush=True)
  kind, cfg, model = config.tasks.qa.visual_input, config.tasks.qa, ctx.model

  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    first = {k: v[:2] for k, v in train.items()}
    params = nn.unbox(model.init(jax.random.key(0), text_ids=first["question_ids"], text_mask=first["question_mask"],
                                 boxes=first["boxes"], **apply.visual_input(first, kind, ctx.frozen))["params"])
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, FLAGS.steps // 10, FLAGS.steps),
                     weight_decay=config.optimizer.weight_decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, rng):
      grads, _ = jax.grad(qa.loss_fn, has_aux=True)(params, batch, rng, model=model, cfg=cfg, frozen=ctx.frozen)
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt

    predict = jax.jit(lambda params, batch: jnp.argmax(
        qa.answer_logits(model, params, batch, visual_input=kind, frozen=ctx.frozen), axis=-1))
    batch_loss = jax.jit(lambda params, batch: qa.loss_fn(params, batch, None, model=model, cfg=cfg,
                                                          frozen=ctx.frozen, deterministic=True)[0])

    def chunks(data):
      return [{k: v[i:i + 64] for k, v in data.items()} for i in range(0, len(data["question_type"]), 64)]

    def train_loss(params):
      """The mean loss over every training question of the chosen types."""
      parts = chunks(train)
      return sum(float(batch_loss(params, b)) * len(b["question_type"]) for b in parts) / len(train["question_type"])

    rng, n, start = np.random.default_rng(0), len(train["question_type"]), time.time()
    for s in range(1, FLAGS.steps + 1):
      rows = rng.choice(n, FLAGS.batch_size, replace=False)
      params, opt = step(params, opt, {k: v[rows] for k, v in train.items()}, jax.random.key(s))
      if s % max(FLAGS.steps // 5, 1) and s not in (1, FLAGS.steps):
        continue
      right = np.concatenate([np.asarray(predict(params, b)) for b in chunks(val)]) == val["answer_target"].argmax(-1)
      per_type = {t: round(float(right[val["question_type"] == names.index(t)].mean()), 3) for t in FLAGS.types}
      print(f"step {s} training loss {train_loss(params):.4f} validation accuracy {right.mean():.3f} {per_type} "
            f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
