r"""Training a small CLIP contrastively on the records' (image, caption) pairs (``bigen_jax/train_clip.py``): the
image-text scorer of worlds that have no pretrained one (COCO converts OpenAI's / open_clip's weights with
tools/convert_clip.py instead).

  python -m bigen_jax.train_clip --config configs/clip.py:demo --workdir demo_out/clip \
      --config.data.records_dir=demo_out/records

Variants: ``demo`` (the 128-px scenes of ``make demo`` resized to 64 px in 16-px patches, two 2-layer 128-wide
towers, 300 steps of 64 pairs: about a minute on 2 CPU cores, make demo's budget; at 500 steps, held out, R@1
among 100 captions 0.18 and hard negatives 0.68: colour and number are learnt, shape, size and relations not
yet), ``tiny`` (32 px, seconds; tests). The mesh, checkpoint, profile and distributed fields are
``configs/base.py``'s. ``model`` is a ``bigen_jax.models.clip.clip_config`` (open_clip's BPE vocabulary; its
context_length is the tokenizer's too).
"""

import ml_collections

from bigen_jax.models import clip
from configs import base

# Fields the trainers share, taken from configs/base.py with its defaults.
SHARED = ("seed", "stop_at_step", "allow_config_change", "mesh", "axis_rules", "checkpoint", "profile",
          "peak_flops_per_device", "distributed")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  if arg not in ("demo", "tiny"):
    raise ValueError(f"configs/clip.py: unknown variant {arg!r}: expected 'demo' or 'tiny'")
  shared = base.get_config()
  config = ml_collections.ConfigDict({field: shared[field] for field in SHARED})
  # image_size: the side the host squares each stored image to (eval_set.square_image) before the step's
  # clip.preprocess resizes it to model.image_size; 0: model.image_size (the host does the whole resize).
  config.data = ml_collections.ConfigDict(dict(
      records_dir="", train_split="train", eval_split="validation", shuffle_buffer=2000, verify_checksums=False,
      sharding="global", image_size=0))
  config.model = clip.clip_config("tiny", context_length=16)
  # AdamW (bigen_jax/optim.py) with CLIP's b2 and eps; no decay on biases, norms and logit_scale.
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="warmup_cosine", warmup_fraction=0.05, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
      clip_norm=1.0))
  config.batch_size = 64
  config.total_steps = 300
  config.log_every = 50
  config.checkpoint.every = 150
  # Held-out numbers (train_clip.evaluate_clip) on the first eval.num_examples images of data.eval_split (0: all),
  # every eval.every steps (0: only the final report); R@1 among 1 + eval.num_negatives captions.
  config.eval = ml_collections.ConfigDict(dict(every=0, num_examples=0, num_negatives=99, batch_size=64))
  if arg == "demo":
    config.data.update(dict(records_dir="demo_out/records", image_size=128))
    config.model.update(dict(embed_dim=128, image_size=64, patch_size=16, vision_width=128, vision_layers=2,
                             vision_heads=4, text_width=128, text_layers=2, text_heads=4, context_length=20))
  else:
    config.batch_size = 8
    config.total_steps = 4
    config.log_every = 1
    config.checkpoint.update(dict(every=2, async_save=False))
    config.eval.update(dict(num_negatives=4, batch_size=8))
  return config
