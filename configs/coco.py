r"""Stage 1 on COCO at paper scale: batch 256, 100k steps, AdamW 5e-5 with 5% warm-up and cosine decay,
bf16 compute, label smoothing 0.2, strict I2T/T2I alternation.

  python -m bigen_jax.main --config configs/coco.py --workdir runs/coco \
      --config.data.records_dir=data/coco_frcnn --config.data.vocab_dir=data/coco_frcnn/vocab10k \
      --config.data.tokenizer=bert-base-uncased-vocab.txt --config.init_from=xlxmert_params.npz

``configs/coco.py:two_model`` is the "w/o unified" ablation (456M parameters).
"""

from configs import base


def get_config(arg: str = "paper"):
  if arg not in ("paper", "two_model"):
    raise ValueError(f"configs/coco.py: unknown variant {arg!r}: expected 'paper' or 'two_model'")
  config = base.get_config(arg)
  config.data.records_dir = "data/coco_frcnn"
  config.data.vocab_dir = "data/coco_frcnn/vocab10k"
  config.data.tokenizer = "data/bert-base-uncased-vocab.txt"
  config.mesh.fsdp = -1
  config.mesh.data = 1
  # Each process reads its contiguous 1/P of every epoch's files (bigen_jax/data/input_pipeline.py): the work of
  # a host shrinks with the pod; "global" (every host reads every record) keeps batches independent of P.
  config.data.sharding = "files"
  return config
