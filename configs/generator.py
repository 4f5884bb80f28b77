r"""Training X-LXMERT's SPADE image generator (METHOD.md §6, ``bigen_jax/train_generator.py``) on (image, centroid
grid) pairs of the records: hinge + ACGAN + feature matching + ResNet-50 perceptual loss, Adam b=(0, 0.999),
lr G 4e-4 / D 1e-4, batch 96, 60 epochs.

  python -m bigen_jax.train_generator --config configs/generator.py:coco --workdir runs/generator \
      --config.data.records_dir=data/coco_frcnn --config.data.vocab_dir=data/coco_frcnn/vocab10k \
      --config.perceptual.weights=data/resnet50.npz

Variants: ``coco`` (256 px, the paper's widths and recipe; records extracted with ``--store_images``, the ResNet-50
of ``tools/convert_resnet.py``), ``demo`` (64 px, make demo's: see below), ``tiny`` (32 px, seconds;
tests). The mesh, checkpoint, logging, profile and distributed fields are ``configs/base.py``'s. The feature
dimension and the cluster count are -1: the visual vocabulary decides them (a value set explicitly must agree).
"""

import ml_collections

from bigen_jax.models import spade
from configs import base

# Fields the trainers share, taken from configs/base.py with its defaults.
SHARED = ("seed", "stop_at_step", "allow_config_change", "mesh", "axis_rules", "checkpoint", "profile",
          "peak_flops_per_device", "distributed")
# Fields of spade.spade_config that describe the networks (the rest is the training recipe).
MODEL_FIELDS = ("image_size", "feature_dim", "bottleneck", "gen_width", "spade_hidden", "disc_width",
                "num_clusters", "power_iterations")
COCO_TRAIN_IMAGES = 113_287  # Karpathy train + restval


def get_config(arg: str = "coco") -> ml_collections.ConfigDict:
  if arg not in ("coco", "demo", "tiny"):
    raise ValueError(f"configs/generator.py: unknown variant {arg!r}: expected 'coco', 'demo' or 'tiny'")
  gan = spade.spade_config({"coco": "paper"}.get(arg, arg))
  shared = base.get_config()
  config = ml_collections.ConfigDict({field: shared[field] for field in SHARED})
  config.data = ml_collections.ConfigDict(dict(
      records_dir="", vocab_dir="", train_split="train", eval_split="validation", shuffle_buffer=2000,
      verify_checksums=False, sharding="global"))
  config.model = ml_collections.ConfigDict({field: gan[field] for field in MODEL_FIELDS})
  config.model.update(dict(feature_dim=-1, num_clusters=-1))  # from the visual vocabulary
  config.loss_weights = ml_collections.ConfigDict(gan.loss_weights.to_dict())
  # schedule / warmup_fraction as configs/base.py's optimizer (bigen_jax/optim.py); eps is optax's default.
  config.optimizer = ml_collections.ConfigDict(dict(
      generator_lr=gan.gen_lr, discriminator_lr=gan.disc_lr, b1=gan.b1, b2=gan.b2, eps=1e-8, schedule="constant",
      warmup_fraction=0.0))
  # The perceptual loss's frozen ImageNet ResNet-50 (tools/convert_resnet.py); random: a randomly initialised one
  # (tests); neither: no perceptual loss. dtype: its compute dtype ("bfloat16" halves its cost on accelerators).
  config.perceptual = ml_collections.ConfigDict(dict(weights="", random=False, dtype="float32"))
  config.batch_size = gan.batch_size
  config.total_steps = gan.num_epochs * COCO_TRAIN_IMAGES // gan.batch_size
  config.log_every = 100
  config.checkpoint.every = 2000
  # Every eval.every steps: real | token map | generated for the first eval.num_examples records of
  # data.eval_split as workdir/samples/step_<step>.png, and their mean L1 distance (samples/l1); the same
  # picture at the end of the run. num_examples 0: none.
  config.eval = ml_collections.ConfigDict(dict(every=5000, num_examples=8))
  if arg == "coco":
    config.data.update(dict(records_dir="data/coco_frcnn", vocab_dir="data/coco_frcnn/vocab10k",
                            shuffle_buffer=10_000))
    config.perceptual.weights = "data/resnet50.npz"
  elif arg == "demo":
    # make demo's generator, sized for its budget on 2 CPU cores: 64 px (the evaluators resize to the world's
    # 128), widths 16, batch 16, about 3 steps/s. The paper's recipe at the world's 128 px takes ~17 s a step here
    # (an accelerator's job), so this one adds a pixel L1 reconstruction (weight 10) and a faster Adam (G 1e-3,
    # D 2.5e-4) that draw colours, places and backgrounds within a few hundred steps (README: what longer
    # training buys).
    config.data.update(dict(records_dir="demo_out/records", vocab_dir="demo_out/vocab"))
    config.model.update(dict(image_size=64, gen_width=16, spade_hidden=16, disc_width=16, bottleneck=32))
    config.loss_weights.reconstruction = 10.0
    config.optimizer.update(dict(generator_lr=1e-3, discriminator_lr=2.5e-4))
    config.batch_size = 16
    config.total_steps = 200
    config.log_every = 50
    config.checkpoint.every = 200
    config.eval.every = 0
  else:
    config.batch_size = 4
    config.total_steps = 4
    config.log_every = 1
    config.checkpoint.update(dict(every=2, async_save=False))
    config.eval.update(dict(every=0, num_examples=2))
  return config
