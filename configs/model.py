r"""Model configurations of the unified LXMERT transformer.

  get_config("paper")      9/5/5 layers, 768 hidden, 12 heads, FFN 3072, 10,000 clusters (~231M parameters:
                           the paper reports 228M)
  get_config("two_model")  the "w/o unified" ablation: one such model per task (~2x)
  get_config("tiny")       a few-thousand-parameter model for tests (float32)
  get_config("small")      2/2/2 layers, 256 hidden: benchmarks and quick runs
  get_config("1b")         10/6/7 layers, 1536 hidden, 12 heads, FFN 6144 (~998M parameters): memory at scale

Use from a command line as ``--config configs/model.py:paper --config.scan_layers=True``. ``AXIS_RULES`` maps
the model's logical axis names to mesh axes (``bigen_jax.parallel``); the training config (``configs/base.py``)
holds it with the mesh as ``config.axis_rules`` and ``config.mesh``.
"""

import ml_collections

# Logical axis name -> mesh axes. Parameters: vocab/embed/mlp/heads/kv/... ; activations: act_*.
AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_clusters", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("hidden", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("clusters", "tensor"),
    ("visual_feat", "fsdp"),  # where "embed" has not taken fsdp already (the image head's classifier)
    ("visual_feat", None),
    ("box", None),
    ("position", None),
    ("token_type", None),
    ("classes", None),
    ("answers", None),
    ("norm", None),
    ("layers", None),
    ("conv_height", None),  # conv kernels [height, width, in, out] (the SPADE GAN, bigen_jax/models/spade.py)
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
)


def _paper() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=30522,
      max_len=17,
      max_position_embeddings=512,
      type_vocab_size=2,
      num_cells=64,
      visual_feat_dim=2048,
      shared_cross_attention=True,  # one cross-attention module for both directions (LXMERT's code)
      image_head_dim=0,  # the image head's bottleneck before the cluster logits (0: visual_feat_dim, the paper's)
      caption_to_cells=False,  # the caption's mean added to every cell's input (not in LXMERT)
      code_bag_head="",  # "codes" / "features": a dense head on the cells for tasks.t2i.code_bag (not in LXMERT)
      num_answers=0,  # > 0: LXMERT's QA head on the pooled output over this many answers (tasks.qa); 0: none
      visual_pos_dim=4,
      num_clusters=10000,
      hidden_size=768,
      num_heads=12,
      mlp_dim=3072,
      num_language_layers=9,
      num_vision_layers=5,
      num_cross_layers=5,
      dropout_rate=0.1,
      attention_dropout_rate=0.1,
      # The generator of dropout masks: "threefry" (JAX's default; each device draws only its shard of a mask,
      # identical for any mesh) or "rbg" (XLA's RngBitGenerator: 13% faster training steps of the demo model on
      # CPU, where threefry's bits cost more than the model's matmuls; masks drawn whole on every device).
      dropout_rng="threefry",
      layer_norm_eps=1e-12,
      init_std=0.02,
      dtype="bfloat16",
      param_dtype="float32",
      remat=False,
      remat_policy="nothing",  # with remat: what each layer keeps for the backward pass (layers.REMAT_POLICIES)
      attention="xla",  # "cudnn": cuDNN flash attention on NVIDIA GPUs where no attention dropout applies
      # q, k, v of each self-attention as one matmul (k, v of each cross-attention): fewer, larger kernels for
      # accelerators; 3% slower on CPU at the paper config (README, Benchmarks). Same parameters as unfused.
      fused_projections=False,
      # Unrolled layers: the paper config's training step is 1.2x faster on CPU than with nn.scan (README,
      # Benchmarks); configs/coco.py scans them (one compiled body per stack for pods, remat per layer).
      scan_layers=False,
      two_model=False,
  ))


def get_config(arg: str = "paper") -> ml_collections.ConfigDict:
  """Returns the model config named ``arg`` (paper, two_model, small, 1b, tiny)."""
  config = _paper()
  if arg == "paper":
    pass
  elif arg == "two_model":
    config.two_model = True
  elif arg == "small":
    config.update(dict(hidden_size=256, num_heads=4, mlp_dim=1024, num_language_layers=2,
                       num_vision_layers=2, num_cross_layers=2))
  elif arg == "1b":
    config.update(dict(hidden_size=1536, num_heads=12, mlp_dim=6144, num_language_layers=10,
                       num_vision_layers=6, num_cross_layers=7))
  elif arg == "tiny":
    config.update(dict(vocab_size=64, max_len=8, max_position_embeddings=32, num_cells=16, visual_feat_dim=16,
                       num_clusters=12, hidden_size=32, num_heads=4, mlp_dim=64, num_language_layers=2,
                       num_vision_layers=2, num_cross_layers=2, dtype="float32", scan_layers=False))
  else:
    raise ValueError(f"configs/model.py: unknown variant {arg!r}: expected 'paper', 'two_model', 'small', '1b' or "
                     "'tiny'")
  return config
