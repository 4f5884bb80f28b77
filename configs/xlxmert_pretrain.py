r"""X-LXMERT's pretraining (Cho et al., EMNLP'20; METHOD.md §7) on the one trainer: masked language modelling
(``tasks.mlm``), masked cluster-centroid classification with uniform masking (``tasks.ccc``), image-text matching
(``tasks.itm``) and question answering (``tasks.qa``), one task per step drawn at random (``task_schedule="random"``),
so that each step masks the text (MLM), the image (CCC) or nothing (ITM, QA).

  python -m bigen_jax.main --config configs/xlxmert_pretrain.py:demo --workdir demo_out/xlxmert

Variants (``get_config(arg)``, ``arg`` = size[,regression]): ``paper`` (the paper's model and hyper-parameters),
``demo`` (the demo's model on the captioned-scenes world that ``make demo`` writes, with its questions), ``tiny``
(tests); ``,regression`` (e.g. ``paper,regression``) regresses the masked cells' features instead of classifying
their clusters (LXMERT's visual objective: X-LXMERT's CCC-vs-regression comparison). Captions are decoded by
X-LXMERT's Gibbs sampling (``eval.captioning.decoder="gibbs"``), images by mask-predict-4 (``eval.generation``).

From the paper (§5.3, appendix C): AdamW (0.9, 0.999), lr 1e-5 with 5% linear warm-up, gradient clipping 1.0, batch
920, 20 epochs, grid features quantised to 10,000 centroids (the visual input of every task is discrete), uniform
masking of the image, one modality drawn uniformly per step. Where the paper is silent, LXMERT's code: linear decay
after the warm-up (BertAdam), weight decay 0.01, MLM rate 0.15, ITM with half the captions replaced, 9,500 answers in
the pretraining QA table (here the answer vocabulary's size). Its "no mask" step runs ITM and QA together; here it is
one of them (weights mlm 2, ccc 2, itm 1, qa 1: each modality is masked in a third of the steps).
"""

import ml_collections

from configs import base
from configs import demo as demo_config

SIZES = ("paper", "demo", "tiny")


def pretraining_tasks() -> dict[str, dict]:
  """The config blocks of X-LXMERT's four objectives (``config.tasks`` entries), at the paper's settings."""
  return dict(
      # BERT masking of the caption: rate 0.15, of the chosen 80% [MASK], 10% random word, 10% kept
      mlm=dict(weight=2, mask_rate=0.15, label_smoothing=0.0, visual_input="discrete"),
      # the T2I loss (tasks/t2i.py) with X-LXMERT's uniform masking ratio U(0, 1] per example, the caption whole;
      # objective "regression": LXMERT's feature regression instead of classification
      ccc=dict(weight=2, mask_schedule="uniform", min_masked=1, max_masked=64, label_smoothing=0.0,
               visual_input="discrete", caption_dropout=0.0, feature_regression=0.0, code_bag=0.0, objective="ccc"),
      itm=dict(weight=1, visual_input="discrete", mismatch_rate=0.5),
      # loss "softmax" (LXMERT's pretraining QA: cross-entropy) or "bce" (its VQA fine-tuning)
      qa=dict(weight=1, loss="softmax", visual_input="discrete"),
  )


def get_config(arg: str = "paper") -> ml_collections.ConfigDict:
  size, *flags = arg.split(",")
  if size not in SIZES or set(flags) - {"regression"}:
    raise ValueError(f"configs/xlxmert_pretrain.py:{arg}: expected one of {SIZES}, optionally with ',regression'")
  if size == "paper":
    config = base.get_config("paper")
  else:
    config = base.get_config("small")
    config.model.update(dict(hidden_size=128, num_heads=4, mlp_dim=512, dtype="float32", scan_layers=False,
                             dropout_rng="rbg"))
  config.data.questions = True
  config.model.num_answers = -1  # the answer vocabulary's size (data.answers_file)
  config.task_schedule = "random"
  for name in ("i2t", "t2i"):
    config.tasks[name].weight = 0
  config.tasks.i2t.visual_input = "discrete"  # what the captioning evaluator feeds the model
  config.tasks.update(pretraining_tasks())
  config.optimizer.update(dict(lr=1e-5, schedule="warmup_linear", warmup_fraction=0.05, b1=0.9, b2=0.999,
                               weight_decay=0.01, clip_norm=1.0))
  config.batch_size = 920
  config.total_steps = 200_000  # 20 epochs of LXMERT's 9.18M pretraining sentences at batch 920
  # Gibbs captions of 12 word pieces (about a COCO caption's; X-LXMERT gives no length): the MLM head never
  # predicts [SEP] (it is never masked), so a caption fills its slots.
  config.eval.captioning.update(dict(decoder="gibbs", gibbs_length=12))
  if size == "demo":
    demo_config.with_paths(config, "demo_out")
    # From scratch on the world in a few minutes: the demo's image-head start (configs/demo.py) and lr 1e-4 (tuned
    # on the validation split: at the demo's 1e-3, stage 1 initialised from this pretraining fell to CIDEr-D 1.16
    # against 2.12 from scratch, and QA fine-tuned from it reached 0.601 against 0.649; README, X-LXMERT). Gibbs
    # captions of 8 words: the world's median caption.
    config.optimizer.lr = 1e-4
    config.image_head_codebook_std = 0.3
    config.batch_size = 32
    config.total_steps = 2000
    config.log_every = 50
    config.checkpoint.every = 500
    config.eval.update(dict(every=500, num_batches=4))
    config.eval.captioning.gibbs_length = 8
  elif size == "tiny":
    config.model.update(dict(hidden_size=32, num_heads=2, mlp_dim=64, num_language_layers=1, num_vision_layers=1,
                             num_cross_layers=1, max_position_embeddings=32, dropout_rng="threefry"))
    config.batch_size = 8
    config.total_steps = 6
    config.log_every = 2
    config.checkpoint.update(dict(every=2, async_save=False))
    config.eval.update(dict(every=0, num_batches=1))
    config.eval.captioning.gibbs_length = -1
    config.init_image_head_from_codebook = False
  if "regression" in flags:
    config.tasks.ccc.objective = "regression"
    config.model.image_head_dim = 0  # the regressed feature is as wide as the visual features
  return config
