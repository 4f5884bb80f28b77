r"""Training defaults shared by every configuration: the paper's stage-1 recipe (METHOD.md §3).

Variants (``demo.py``, ``coco.py``) start from ``get_config()`` and change what differs. Sizes that the
data decides (vocabulary sizes, feature dimension, caption length) are -1 here and filled in by the
trainer from the tokenizer, the records manifest and the visual vocabulary; a value set explicitly must
agree with the data.
"""

import ml_collections

from configs import model as model_config


def get_config(model: str = "paper") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100_000  # the schedule's length
  config.stop_at_step = 0  # > 0: checkpoint and stop there (a job slice of a longer run); 0: total_steps
  # A resume whose config changes what is trained (bigen_jax/run_config.py) stops with the changed fields; True
  # resumes anyway.
  config.allow_config_change = False
  config.batch_size = 256

  config.data = ml_collections.ConfigDict(dict(
      records_dir="", vocab_dir="", tokenizer="", train_split="train", eval_split="validation",
      shuffle_buffer=10_000, verify_checksums=False,
      # "global": every process reads every record, batches independent of the process count; "files": each
      # process reads its 1/P of the records (large pods). shuffle_buffer: serialized records per process.
      sharding="global",
      # True: batches also carry one question per image and its soft answer target (question_ids, question_mask,
      # answer_target, question_type: bigen_jax/data/input_pipeline.py), for records extracted with questions;
      # answers_file: the answer vocabulary (tools/build_answers.py), "" = RECORDS_DIR/answers.json.
      questions=False, answers_file=""))

  config.model = model_config.get_config(model)
  for field in ("vocab_size", "max_len", "visual_feat_dim", "num_clusters"):
    config.model[field] = -1  # from the data
  config.model.num_cells = 64
  # params of tools/convert_lxmert.py (orbax dir or .npz), or a training run's directory (its newest checkpoint's
  # params: stage 2 starts from stage 1)
  config.init_from = ""
  config.init_image_head_from_codebook = True
  # > 0: the codebook's feature columns standardised and scaled to this std first (models/heads.py); 0: the
  # centroids as they are (the paper's code)
  config.image_head_codebook_std = 0.0

  # task_schedule "cycle" (the paper): one task per step, the cycle repeats ``weight`` steps of each task in
  # this order (strict alternation); "joint": every step minimises the sum over tasks of weight * loss.
  config.task_schedule = "cycle"
  # "cycle" only: the cycle's steps by task name when not empty (e.g. stage 2's SCST, CLIP loss, SCST, T2I), in place
  # of ``weight`` steps of each task in config order.
  config.task_order = ()
  config.tasks = ml_collections.ConfigDict(dict(
      i2t=dict(weight=1, label_smoothing=0.2, visual_input="dense", layout="mask"),
      t2i=dict(weight=1, label_smoothing=0.0, visual_input="discrete", mask_schedule="count",
               min_masked=6, max_masked=64,
               caption_dropout=0.0,  # P(caption -> null caption [CLS] [SEP]): trains classifier-free guidance
               # weight of an auxiliary loss: the image head's D-wide feature regressed on the target cluster's
               # centroid (masked cells; MSE over the codebook's mean square); 0 in the paper
               feature_regression=0.0,
               # "ccc": cross-entropy of the masked cells' cluster ids (the paper's and X-LXMERT's); "regression": the
               # image head's feature regressed on the masked cells' input features instead (LXMERT's objective)
               objective="ccc",
               # weight of an auxiliary loss: every masked cell predicts which codes the whole image contains
               # (model.code_bag_head; cross-entropy to the uniform distribution over the image's distinct
               # codes); 0 in the paper
               code_bag=0.0),
      # Image-text matching (X-LXMERT's objective) as an auxiliary task: off (weight 0) in the paper's stage 1.
      itm=dict(weight=0, visual_input="dense", mismatch_rate=0.5),
      # Stage 2's self-critical sequence training (METHOD.md §4; bigen_jax/tasks/scst.py): off (weight 0) in stage 1.
      # num_samples: multinomial captions sampled per image (1 in the paper), each rewarded by its CIDEr-D minus the
      # greedy caption's; temperature: of the sampling distribution (1.0: the model's own); visual_input and
      # layout: read as tasks.i2t reads them, and must equal tasks.i2t's (how I2T trained the model and the
      # captioning evaluator decodes); max_len: decoded caption length (-1: the data's). Batches then carry every
      # caption of each image, and the CIDEr-D document frequencies come from the training split's captions.
      scst=dict(weight=0, num_samples=1, temperature=1.0, visual_input="dense", layout="mask", max_len=-1),
      # Stage 2's CLIP loss (METHOD.md §4, eq. 4; bigen_jax/tasks/clip_loss.py): off (weight 0) in stage 1. Each step
      # decodes the caption's grid by ``num_steps``-pass mask-predict (``schedule``; the decoder's other fields as
      # eval.generation's, the paper's argmax unguided), relaxes the final pass's cells
      # by Gumbel-softmax at ``tau`` (``hard``: straight-through), draws the soft centroid grid with the frozen
      # generator (``generator_dir``, a bigen_jax.train_generator run) and scores it against the caption with the
      # frozen CLIP (``clip_path``/``clip_variant``, as eval.clip reads them; ``prompt`` + caption its text):
      # loss -scale * relu(100 cos).
      clip=dict(weight=0, num_steps=4, schedule="linear", order="mask_predict", temperature=0.0,
                choice_temperature=0.0, guidance=0.0, tau=1.0, hard=False, scale=2.5, generator_dir="", clip_path="",
                clip_variant="", prompt="a photo depicts "),
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=5e-5, schedule="warmup_cosine", warmup_fraction=0.05, b1=0.9, b2=0.999, eps=1e-6,
      weight_decay=1e-2, clip_norm=1.0))

  # Axis sizes; one may be -1 (the rest of the devices). num_devices > 0 uses only the first devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
  config.axis_rules = model_config.AXIS_RULES

  config.log_every = 100
  # fallback: a newest step that fails its sha256 record or cannot be read is moved aside and the next newest
  # is restored; False stops the run instead.
  config.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True, fallback=True))
  config.eval = ml_collections.ConfigDict(dict(every=5000, evaluators=("validation_loss",), num_batches=20,
                                               batch_size=0))
  # Generation evaluators (bigen_jax/eval/captioning.py, generation.py); batch sizes divide the devices.
  # captioning: decoder "gibbs" (X-LXMERT's, for a model trained with tasks.mlm) redraws a caption of gibbs_length
  # [MASK]s (-1: the longest that fits) in gibbs_sweeps sweeps (gibbs_order "left_to_right" or "random"), argmax at
  # gibbs_temperature 0; X-LXMERT's paper does not give its settings.
  config.eval.captioning = ml_collections.ConfigDict(dict(
      decoder="greedy", beam_size=3, num_examples=0, batch_size=64, spice=True, gibbs_sweeps=4, gibbs_length=-1,
      gibbs_order="left_to_right", gibbs_temperature=0.0))
  # generation: the main decoder (sampling/image_tokens.py: order, num_steps, temperature, schedule,
  # choice_temperature, guidance), and ``variants``, name -> overrides of those fields, each decoded and scored
  # beside it (generation/<name>/...), e.g. {"sampling": {"order": "maskgit", "temperature": 1.0}}.
  # inception_weights (tools/convert_inception.py): FID Inception weights report fid, torchvision's
  # fid_torchvision, with torchvision's ImageNet input normalisation if inception_transform_input.
  # readout: how a pass reads the cells' cluster logits, "classifier" (the image head's D->K layer) or
  # "nearest_centroid" (-||feature - centroid||^2 of the image head's D-wide feature and the frozen codebook: a model
  # trained by feature regression, whose classifier never trained).
  config.eval.generation = ml_collections.ConfigDict(dict(
      order="mask_predict", num_steps=4, temperature=0.0, schedule="linear", choice_temperature=0.0,
      guidance=0.0, readout="classifier", variants={}, num_examples=0, batch_size=64, recognizer_dir="",
      inception_weights="", inception_transform_input=True, r_precision_negatives=99, grid_images=8,
      # captioned scenes (bigen_jax/worlds/scenes/plugin.py): recognizer_dir holds the scene recogniser
      # (tools/train_scene_recognizer.py; default WORKDIR/scene_recognizer); scene_decoder_heads (<detector>.heads.npz)
      # draws tokens with the scene decoder
      scene_decoder_heads="",
      # a bigen_jax.train_generator run directory: its frozen SPADE generator draws the true tokens (gan_reference/)
      # and every decoder's tokens (gan/, <variant>/gan/) beside the drawer above; "" off
      generator_dir=""))
  # The frozen CLIP of CLIPScore, CLIP R-precision (generation) and CLIP-S (captioning), bigen_jax/eval/clip_scorer.py:
  # path "" off; a bigen_jax.train_clip run directory, or params of tools/convert_clip.py with their clip_config
  # variant (e.g. "ViT-B-32-quickgelu" for OpenAI's weights).
  config.eval.clip = ml_collections.ConfigDict(dict(path="", variant="", batch_size=64))
  # Question answering (bigen_jax/eval/qa.py): every question of the first num_examples (0: all) eval records, in
  # batches of batch_size per device.
  config.eval.qa = ml_collections.ConfigDict(dict(batch_size=64, num_examples=0))
  # A jax.profiler trace of the num_steps steps after step start_step (>= 1: the first step compiles) into
  # WORKDIR/plugins/profile (TensorBoard's profile tab); num_steps 0: off.
  config.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
  config.peak_flops_per_device = 0.0  # for the MFU estimate; 0: not reported (e.g. 989e12 for H100 bf16)
  # local_device_ids: this process's devices, comma-separated (e.g. "0,1"), for several processes per host.
  config.distributed = ml_collections.ConfigDict(dict(
      num_processes=1, process_id=0, coordinator_address="", cpu_collectives="", auto=False, local_device_ids=""))
  return config


def stage2_fields() -> ml_collections.ConfigDict:
  """The paper's stage 2 (METHOD.md §4) as fields over a stage-1 config: SCST for I2T, the CLIP loss for T2I, each
  CLIP-loss step followed (after an SCST step) by a grid-level cross-entropy step that keeps sampling coherent;
  AdamW at a fixed 1e-6, batch 160, 100k steps, from stage 1's params (``init_from``, set by
  ``bigen_jax/stages.py``). A config's ``stage2`` block (``two_stage`` variants) holds these; the CLIP loss still
  needs ``tasks.clip.generator_dir`` and ``clip_path``."""
  return ml_collections.ConfigDict(dict(
      task_schedule="cycle", task_order=("scst", "clip", "scst", "t2i"), batch_size=160, total_steps=100_000,
      tasks=dict(i2t=dict(weight=0), t2i=dict(weight=1), scst=dict(weight=1), clip=dict(weight=1)),
      optimizer=dict(lr=1e-6, schedule="constant")))
