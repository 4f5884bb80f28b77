r"""Stage 1 on the captioned-scenes world of ``make demo``: a small model (2/2/2 layers, 128 wide) that
trains in minutes on 2 CPU cores.

  python -m bigen_jax.main --config configs/demo.py --workdir demo_out/train

Variants: ``demo.py:tiny`` (seconds; tests), ``demo.py`` (the demo), ``demo.py:two_stage`` (the demo's stage 1,
then stage 2: SCST and the CLIP loss through the demo's generator and CLIP, ``stage2_fields``), ``demo.py:stage2``
(stage 2 alone, from the demo's stage-1 run). Paths are those ``make demo`` writes.
"""

from configs import base


def with_paths(config, out: str, detector: str = ""):
  """``config`` pointed at the files make demo writes under ``out``: data, the scene recogniser, the demo CLIP and
  generator (evaluation and stage 2), and the scenes detector's heads (``detector``: its weights path), which draw
  generated tokens. Returns ``config``."""
  from bigen_jax.worlds.scenes import scene_decoder  # pylint: disable=g-import-not-at-top
  config.data.update(dict(records_dir=f"{out}/records", vocab_dir=f"{out}/vocab",
                          tokenizer=f"{out}/tokenizer/vocab.txt"))
  config.eval.generation.update(dict(recognizer_dir=f"{out}/scene_recognizer", generator_dir=f"{out}/generator",
                                     scene_decoder_heads=detector + scene_decoder.HEADS_SUFFIX if detector else ""))
  config.eval.clip.path = f"{out}/clip"
  paths = dict(generator_dir=f"{out}/generator", clip_path=f"{out}/clip")
  if config.tasks.clip.weight > 0:
    config.tasks.clip.update(paths)
  if "clip" in config.get("stage2", {}).get("tasks", {}):
    config.stage2.tasks.clip.update(paths)
  return config


# The demo's guided decoder (eval.generation.variants["guidance"]): MaskGIT sampling, 8 passes, guidance w = 4.
GUIDED_SAMPLING = dict(order="maskgit", num_steps=8, temperature=1.0, choice_temperature=4.5, schedule="cosine",
                       guidance=4.0)


def stage2_fields(out: str = "demo_out"):
  """The paper's stage 2 (``base.stage2_fields``: SCST, CLIP loss, SCST, cross-entropy) at the demo's scale, chosen
  on the validation split (README, stage 2): 100 steps of 16 at a fixed lr 2e-5 (CIDEr-D over stage 1 in three runs
  on two machines: +0.007, +0.083, +0.040, the captions' truth kept; 4e-5: +0.041, -0.005, +0.083, truth 0.748 ->
  0.672 / 0.648; the paper's 1e-6 moves nothing in 200 steps; 1e-4 ruins the captions); SCST samples at temperature
  0.5 (at 1.0 the label-smoothed model's samples score 0.3 CIDEr-D against the greedy caption's 1.8, and SCST only
  pushes them down) and decodes as I2T trained
  (causal layout); the CLIP loss runs through the demo's guided decoder, straight-through (the paper's argmax
  mask-predict draws background only here: semantic accuracy 0), with make demo's generator and CLIP under ``out``
  and bare captions (the demo CLIP trained on them)."""
  fields = base.stage2_fields()
  fields.update(dict(batch_size=16, total_steps=100, log_every=10))
  fields.optimizer.update(dict(lr=2e-5))
  fields.tasks.scst = dict(weight=1, layout="causal", temperature=0.5)
  fields.tasks.clip = dict(weight=1, generator_dir=f"{out}/generator", clip_path=f"{out}/clip", prompt="", hard=True,
                           **GUIDED_SAMPLING)
  fields.checkpoint = dict(every=100)
  fields.eval = dict(every=0)
  return fields


def get_config(arg: str = "demo"):
  config = base.get_config("small")
  config.model.update(dict(hidden_size=128, num_heads=4, mlp_dim=512))
  config.data.records_dir = "demo_out/records"
  config.data.vocab_dir = "demo_out/vocab"
  config.data.tokenizer = "demo_out/tokenizer/vocab.txt"
  config.data.shuffle_buffer = 2000
  # No dropout: in 800 steps it only slows learning (without it, on the validation split: I2T gap 0.62 -> 0.74,
  # T2I gap 0.41 -> 0.53, CIDEr-D 2.02 -> 2.15, captions true 0.58 -> 0.74; README, recipe_study
  # demo_no_dropout), and its masks take 26% of the step on CPU (threefry's; 16% with model.dropout_rng="rbg").
  config.model.update(dict(dtype="float32", scan_layers=False, dropout_rate=0.0, attention_dropout_rate=0.0))
  # Both tasks in every step (one Adam state for their sum): a strict alternation at lr 1e-3 kept T2I on the
  # clusters' marginal. T2I masks drawn MaskGIT-style (mostly near-full grids, the state decoding starts
  # from) and 10% of its captions dropped, for classifier-free guidance.
  config.task_schedule = "joint"
  # I2T trains every word of every caption in each step (the causal layout; the paper's trains one word per
  # caption), and the cells read the words through a cross-attention module of their own (LXMERT shares one
  # between both directions): at 800 steps these moved the I2T gap 0.05 -> 0.43 and the T2I gap 0.03 -> 0.28
  # (README, issue 10's lever table).
  config.tasks.i2t.layout = "causal"
  config.model.shared_cross_attention = False
  config.tasks.t2i.update(dict(mask_schedule="cosine", caption_dropout=0.1))
  config.optimizer.update(dict(lr=1e-3, warmup_fraction=0.05, weight_decay=1e-2))
  # T2I's feature bag: every masked cell also regresses the mean standardised centroid of the image's codes (what
  # the caption says the image contains), and the image head's classifier starts from the standardised codebook
  # x 0.3 (raw centroids give logits too large for a short run to move), so that what the cells learn of a colour
  # moves every code of that colour. Without them the generated objects ignore the caption (README, issue 10).
  # Weight 1.5: at 1 the guided pictures follow the caption less, at 2 and 3 T2I's loss gap falls below 0.2.
  config.model.code_bag_head = "features"
  config.tasks.t2i.code_bag = 1.5
  config.init_image_head_from_codebook = True
  config.image_head_codebook_std = 0.3
  config.batch_size = 32
  config.total_steps = 800
  config.log_every = 50
  config.checkpoint.every = 400
  config.eval.update(dict(every=400, num_batches=4))
  # Besides argmax mask-predict-4 (the paper's decoder): MaskGIT sampling, and sampling with guidance (w = 4 beat
  # w = 2 and tied w = 8 on the validation split).
  sampling = {k: v for k, v in GUIDED_SAMPLING.items() if k != "guidance"}
  config.eval.generation.variants = dict(sampling=sampling, guidance=dict(GUIDED_SAMPLING))
  if arg == "tiny":
    config.model.update(dict(hidden_size=32, num_heads=2, mlp_dim=64, num_language_layers=1,
                             num_vision_layers=1, num_cross_layers=1, max_position_embeddings=32))
    config.batch_size = 8
    config.total_steps = 6
    config.log_every = 2
    config.checkpoint.update(dict(every=2, async_save=False))
    config.eval.update(dict(every=0, num_batches=1))
    # The paper's stage-1 recipe (tests check its strict alternation); variants are tested on their own.
    config.task_schedule = "cycle"
    config.tasks.t2i.update(dict(mask_schedule="count", caption_dropout=0.0))
    config.tasks.i2t.layout = "mask"
    config.model.shared_cross_attention = True
    config.eval.generation.variants = {}
    config.model.code_bag_head = ""
    config.tasks.t2i.code_bag = 0.0
    config.init_image_head_from_codebook = False
  elif arg == "two_stage":
    config.stage2 = stage2_fields()
  elif arg == "stage2":
    config.update(stage2_fields())
    config.init_from = "demo_out/train"
  elif arg != "demo":
    raise ValueError(f"configs/demo.py:{arg}: expected 'demo', 'tiny', 'two_stage' or 'stage2'")
  return config
