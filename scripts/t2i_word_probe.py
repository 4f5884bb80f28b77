r"""Can T2I's masked cells learn to read one word of a caption? A synthetic probe of the demo model.

Each caption is [CLS], random filler words, one colour word (8) at a random position and, with
``--backgrounds`` > 1, a background word (one of N) at a fixed position, then [SEP]. Every cell is fully masked;
its target is the colour's code with probability ``--density``, else the background's code. A model that reads
the colour word puts P(named colour) = density on each cell; one that does not stays at density / 8.

  python scripts/t2i_word_probe.py --density 0.18 --backgrounds 4 --steps 400
  python scripts/t2i_word_probe.py --density 0.5 --backgrounds 1 --steps 300 [--caption_to_cells]
  python scripts/t2i_word_probe.py --density 0.18 --backgrounds 1 --steps 400 --code_bag 1

Trains with the demo's optimiser (warm-up, cosine, clipping) unless ``--nodemo_optimizer``; ``--model`` overrides
the demo model's numeric fields; ``--word_aux`` / ``--code_bag`` add auxiliary losses.

Prints, every ``--every`` steps, the training loss, P(named colour) per cell on a fixed batch of 64, and how much
the encoders' outputs vary between its captions.
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
_WORD_AUX = flags.DEFINE_float("word_aux", 0.0, "Weight of an auxiliary loss: every masked cell predicts, with "
                                "the text head, the bag of the caption's words (cross-entropy to the uniform "
                                "distribution over its non-special tokens).")
_OVERRIDES = flags.DEFINE_string("model", "", "Comma-separated model config overrides, e.g. "
                                 "'dropout_rate=0,attention_dropout_rate=0,num_heads=8' (numbers only).")
_DEMO_OPTIMIZER = flags.DEFINE_bool("demo_optimizer", True, "The demo's optimiser (configs/demo.py: AdamW with "
                                     "linear warm-up, cosine decay and global-norm clipping at 1.0); else AdamW "
                                     "at a constant --lr without clipping.")
_WARMUP = flags.DEFINE_float("warmup_fraction", 0.05, "Warm-up share of --steps (the demo's: 0.05).")
_CODE_BAG = flags.DEFINE_float("code_bag", 0.0, "tasks.t2i.code_bag: every masked cell also predicts which "
                                "codes the image contains (model.code_bag_head).")
_B2 = flags.DEFINE_float("b2", 0.999, "Adam's second-moment decay (the demo's: 0.999).")
_SCALES = flags.DEFINE_bool("scales", False, "Print the mean |scale| of the vision stream's LayerNorms.")
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


def dict_with(config, **updates):
  """A copy of a ConfigDict with ``updates``."""
  config = config.copy_and_resolve_references()
  config.update(updates)
  return config


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bigen_jax import optim  # pylint: disable=g-import-not-at-top
  from bigen_jax.models import apply, lxmert  # pylint: disable=g-import-not-at-top
  from bigen_jax.tasks import t2i  # pylint: disable=g-import-not-at-top
  from configs import demo as demo_configs  # pylint: disable=g-import-not-at-top

  config = demo_configs.get_config("demo")
  clusters = COLOURS + _BACKGROUNDS.value
  config.model.update(dict(vocab_size=64, max_len=LENGTH, visual_feat_dim=8, num_clusters=clusters, num_cells=64,
                           caption_to_cells=_CAPTION_TO_CELLS.value,
                           code_bag_head="codes" if _CODE_BAG.value else ""))
  for item in filter(None, _OVERRIDES.value.split(",")):
    key, value = item.split("=")
    config.model[key] = type(config.model[key])(float(value))
  model = lxmert.build_model(config.model)
  params = nn.unbox(jax.jit(lambda: lxmert.init_params(model, config.model, jax.random.key(0)))())
  task = ml_collections.ConfigDict(config.tasks.t2i.to_dict())
  task.update(dict(mask_id=MASK, pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_schedule="count", min_masked=64,
                   caption_dropout=0.0, code_bag=_CODE_BAG.value))
  task = ml_collections.FrozenConfigDict(task)
  frozen = {"codebook": jnp.asarray(np.random.default_rng(0).normal(size=(clusters, 8)), jnp.float32)}
  labels = flax.traverse_util.path_aware_map(lambda path, _: "cross" if path[0] == "cross" else "rest", params)
  optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
  optimizer.warmup_fraction = _WARMUP.value
  optimizer.b2 = _B2.value
  if not _DEMO_OPTIMIZER.value:
    optimizer.update(dict(schedule="constant", clip_norm=0.0))
  tx = optax.multi_transform(
      {"cross": optim.make_optimizer(dict_with(optimizer, lr=_LR.value * _CROSS_LR_SCALE.value), _STEPS.value)[0],
       "rest": optim.make_optimizer(dict_with(optimizer, lr=_LR.value), _STEPS.value)[0]}, labels)
  opt_state = tx.init(params)

  def loss_fn(p, batch, rng):
    loss, metrics = t2i.loss_fn(p, batch, rng, model=model, cfg=task, frozen=frozen)
    if _WORD_AUX.value:
      words = apply.apply_model(model, p, task="t2i", rng=rng, head=lambda m, o: m.predict_text(o.vision),
                                text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"],
                                visual_mask=jnp.ones(batch["cluster_ids"].shape, bool),
                                cluster_ids=batch["cluster_ids"], codebook=frozen["codebook"])
      ids = batch["text_ids"]
      content = (ids > MASK).astype(jnp.float32)
      bag = (jax.nn.one_hot(ids, words.shape[-1]) * content[..., None]).sum(1)
      bag = bag / jnp.maximum(bag.sum(-1, keepdims=True), 1.0)
      aux = optax.softmax_cross_entropy(words, bag[:, None, :]).mean()
      loss = loss + _WORD_AUX.value * aux
      metrics = dict(metrics, word_aux=aux)
    return loss, metrics

  @jax.jit
  def step(params, opt_state, batch, rng):
    grads, metrics = jax.grad(lambda p: loss_fn(p, batch, rng), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def cell_probs(params, batch):
    logits = apply.apply_model(model, params, task="t2i", rng=None, head=lambda m, o: m.predict_image(o.vision),
                               text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"],
                               visual_mask=jnp.ones(batch["cluster_ids"].shape, bool),
                               cluster_ids=batch["cluster_ids"], codebook=frozen["codebook"])
    return jax.nn.softmax(logits, -1)

  @jax.jit
  def diversity(params, batch):
    """How much the encoders' outputs differ between captions: std over the batch, mean over positions/units."""
    def head(m, o):
      return o.language_encoder, o.language, o.vision
    outs = apply.apply_model(model, params, task="t2i", rng=None, head=head,
                             text_ids=batch["text_ids"], text_mask=batch["text_mask"], boxes=batch["boxes"],
                             visual_mask=jnp.ones(batch["cluster_ids"].shape, bool),
                             cluster_ids=batch["cluster_ids"], codebook=frozen["codebook"])
    return [x.std(0).mean() for x in outs]

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
      if i and _CODE_BAG.value:
        loss += f"  code_bag {float(metrics['code_bag']):.4f}"
      if i and _WORD_AUX.value:
        loss += f"  word_aux {float(metrics['word_aux']):.4f}"
      spread = " ".join(f"{float(x):.3f}" for x in diversity(params, fixed))
      print(f"step {i}{loss}  P(named colour) per cell {named:.4f}  spread lang_enc/lang/vision {spread}",
            flush=True)
      if _SCALES.value:
        flat = flax.traverse_util.flatten_dict(params)
        print("   ", {"/".join(k[-4:-1]): round(float(jnp.abs(v).mean()), 3) for k, v in flat.items()
                      if k[-1] == "scale" and ("vision" in "/".join(k) or "image_head" in k)})
    batch = {k: v for k, v in make_batch(rng, 32).items() if k != "colour"}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))


if __name__ == "__main__":
  app.run(main)
