r"""Can T2I's masked cells learn to read one word of a caption? A synthetic probe of the demo model.

Each caption is [CLS], random filler words, one colour word (8) at a random position and, with
``--backgrounds`` > 1, a background word (one of N) at a fixed position, then [SEP]. Every cell is fully masked;
its target is the colour's code with probability ``--density``, else the background's code. A model that reads
the colour word puts P(named colour) = density on each cell; one that does not stays at density / 8.

  python scripts/t2i_word_probe.py --density 0.18 --backgrounds 4 --steps 400
  python scripts/t2i_word_probe.py --density 0.5 --backgrounds 1 --steps 300 [--caption_to_cells]

Prints, every ``--every`` steps, the training loss and P(named colour) per cell on a fixed batch of 64.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

_DENSITY = flags.DEFINE_float("density", 0.18, "Share of cells that take the colour (objects: 0.18 in the demo).")
_BACKGROUNDS = flags.DEFINE_integer("backgrounds", 4, "Background types; > 1 puts a background word in the caption.")
_STEPS = flags.DEFINE_integer("steps", 400, "AdamW steps (batch 32).")
_FIXED_BACKGROUND = flags.DEFINE_bool("fixed_background", True, "The background word at the last position before "
                                      "[SEP] (else at a random position other than the colour word's).")
_VARIABLE_LENGTH = flags.DEFINE_bool("variable_length", False, "Captions of 5 to 12 tokens (padding after [SEP]), "
                                     "the background word last before [SEP], as the demo's captions name it.")
_LR = flags.DEFINE_float("lr", 1e-3, "Learning rate (constant; the demo's peak is 1e-3).")
_CROSS_LR_SCALE = flags.DEFINE_float("cross_lr_scale", 1.0, "Learning rate multiplier of the cross layers alone.")
_EVERY = flags.DEFINE_integer("every", 100, "Report interval.")
_CAPTION_TO_CELLS = flags.DEFINE_bool("caption_to_cells", False, "model.caption_to_cells (the caption's mean "
                                      "added to every cell).")

LENGTH, COLOURS, CLS, SEP, PAD, MASK = 12, 8, 2, 3, 0, 4
COLOUR_WORD, BACKGROUND_WORD, FILLERS = 10, 30, (20, 60)


def make_batch(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
  """Captions, cell targets (colour c -> code c, background b -> code 8 + b) and random boxes."""
  colour = rng.integers(0, COLOURS, size)
  ids = rng.integers(*FILLERS, (size, LENGTH))
  length = rng.integers(5, LENGTH + 1, size) if _VARIABLE_LENGTH.value else np.full(size, LENGTH)
  rows = np.arange(size)
  ids[:, 0], ids[rows, length - 1] = CLS, SEP
  ids[np.arange(LENGTH)[None] >= length[:, None]] = PAD
  colour_at = rng.integers(1, length - 2)
  ids[rows, colour_at] = COLOUR_WORD + colour
  background = rng.integers(0, _BACKGROUNDS.value, size)
  if _BACKGROUNDS.value > 1:
    anywhere = (colour_at + rng.integers(1, length - 3) - 1) % (length - 2) + 1  # not the colour's place
    ids[rows, length - 2 if _FIXED_BACKGROUND.value else anywhere] = BACKGROUND_WORD + background
  cells = np.where(rng.uniform(size=(size, 64)) < _DENSITY.value, colour[:, None], COLOURS + background[:, None])
  return dict(text_ids=ids.astype(np.int32), text_mask=(ids != PAD).astype(np.int32),
              cluster_ids=cells.astype(np.int32), boxes=rng.uniform(size=(size, 64, 4)).astype(np.float32),
              colour=colour)


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import apply, lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.tasks import t2i  # pylint: disable=g-import-not-at-top
  from configs import demo as demo_configs  # pylint: disable=g-import-not-at-top

  config = demo_configs.get_config("demo")
  clusters = COLOURS + _BACKGROUNDS.value
  config.model.update(dict(vocab_size=64, max_len=LENGTH, visual_feat_dim=8, num_clusters=clusters, num_cells=64,
                           caption_to_cells=_CAPTION_TO_CELLS.value))
  model = lxmert.build_model(config.model)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config.model, jax.random.key(0)))())
  task = ml_collections.ConfigDict(config.tasks.t2i.to_dict())
  task.update(dict(mask_id=MASK, pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_schedule="count", min_masked=64,
                   caption_dropout=0.0))
  task = ml_collections.FrozenConfigDict(task)
  frozen = {"codebook": jnp.asarray(np.random.default_rng(0).normal(size=(clusters, 8)), jnp.float32)}
  labels = flax.traverse_util.path_aware_map(lambda path, _: "cross" if path[0] == "cross" else "rest", params)
  tx = optax.multi_transform({"cross": optax.adamw(_LR.value * _CROSS_LR_SCALE.value, weight_decay=0.01),
                              "rest": optax.adamw(_LR.value, weight_decay=0.01)}, labels)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    grads, metrics = jax.grad(lambda p: t2i.loss_fn(p, batch, rng, model=model, cfg=task, frozen=frozen),
                              has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def cell_probs(params, batch):
    logits = apply.apply_model(model, params, task="t2i", rng=None, head=lambda m, o: m.predict_image(o.vision),
                               text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"],
                               visual_mask=jnp.ones(batch["cluster_ids"].shape, bool),
                               cluster_ids=batch["cluster_ids"], codebook=frozen["codebook"])
    return jax.nn.softmax(logits, -1)

  fixed = make_batch(np.random.default_rng(99), 64)
  rng = np.random.default_rng(0)
  print(f"density {_DENSITY.value}, {_BACKGROUNDS.value} background(s), lr {_LR.value} (cross x{_CROSS_LR_SCALE.value}), "
        f"caption_to_cells "
        f"{_CAPTION_TO_CELLS.value}: P(named colour) is {_DENSITY.value / COLOURS:.4f} without reading the word, "
        f"{_DENSITY.value:.4f} when read")
  for i in range(_STEPS.value + 1):
    if i % _EVERY.value == 0:
      probs = np.asarray(cell_probs(params, {k: v for k, v in fixed.items() if k != "colour"}))
      named = probs[np.arange(64), :, fixed["colour"]].mean()
      loss = f"  loss {float(metrics['loss']):.4f}" if i else ""
      print(f"step {i}{loss}  P(named colour) per cell {named:.4f}", flush=True)
    batch = {k: v for k, v in make_batch(rng, 32).items() if k != "colour"}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))


if __name__ == "__main__":
  app.run(main)
