r"""Stage 1 on COCO at paper scale: batch 256, 100k steps, AdamW 5e-5 with 5% warm-up and cosine decay,
bf16 compute, label smoothing 0.2, strict I2T/T2I alternation.

  python -m bigen_jax.main --config configs/coco.py --workdir runs/coco \
      --config.data.records_dir=data/coco_frcnn --config.data.vocab_dir=data/coco_frcnn/vocab10k \
      --config.data.tokenizer=bert-base-uncased-vocab.txt --config.init_from=xlxmert_params.npz

``configs/coco.py:two_model`` is the "w/o unified" ablation (456M parameters). ``configs/coco.py:two_stage`` trains
stage 1 and then stage 2 (``configs/base.py:stage2_fields``: SCST, CLIP loss, lr 1e-6, batch 160) into
WORKDIR/stage1 and WORKDIR/stage2; its CLIP loss reads the frozen generator and CLIP:

  python -m bigen_jax.main --config configs/coco.py:two_stage --workdir runs/coco ... \
      --config.stage2.tasks.clip.generator_dir=runs/spade_coco --config.stage2.tasks.clip.clip_path=clip_b32 \
      --config.stage2.tasks.clip.clip_variant=ViT-B-32-quickgelu

``configs/coco.py:stage2`` is stage 2 alone, from a finished stage 1 (``--config.init_from=runs/coco``).
"""

from configs import base


def get_config(arg: str = "paper"):
  variants = ("paper", "two_model", "two_stage", "stage2")
  if arg not in variants:
    raise ValueError(f"configs/coco.py: unknown variant {arg!r}: expected one of {variants}")
  config = base.get_config("two_model" if arg == "two_model" else "paper")
  config.data.records_dir = "data/coco_frcnn"
  config.data.vocab_dir = "data/coco_frcnn/vocab10k"
  config.data.tokenizer = "data/bert-base-uncased-vocab.txt"
  # Scanned layers on pods: one compiled layer body per stack (compile time across many hosts) and per-layer
  # remat when memory asks for it; unrolled (configs/model.py's default) is faster on one CPU.
  config.model.scan_layers = True
  config.mesh.fsdp = -1
  config.mesh.data = 1
  # Each process reads its contiguous 1/P of every epoch's files (bigen_jax/data/input_pipeline.py): the work of
  # a host shrinks with the pod; "global" (every host reads every record) keeps batches independent of P.
  config.data.sharding = "files"
  if arg == "two_stage":
    config.stage2 = base.stage2_fields()
  elif arg == "stage2":
    config.update(base.stage2_fields())
  return config
