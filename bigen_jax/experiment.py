"""What training and evaluation share: the run's config resolved against its data, the mesh, the model, its
frozen inputs, the tokenizer and the visual vocabulary (``Context``, made by ``build_context``).

``bigen_jax.train`` and ``bigen_jax.evaluate`` both start from ``build_context``; step functions, evaluators and
decoders read what they need from the context.
"""

import dataclasses
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigen_jax import config_checks
from bigen_jax import errors
from bigen_jax import parallel
from bigen_jax.data import answers as answers_lib
from bigen_jax.data import qa_pipeline
from bigen_jax.data import records
from bigen_jax.data import tokenizer as tokenizer_lib
from bigen_jax.data import vocab as vocab_lib
from bigen_jax.eval import cider
from bigen_jax.models import lxmert
from bigen_jax.tasks import qa
from bigen_jax.tasks import scst

TRAIN_FIELDS = ("text_ids", "text_mask", "dense", "boxes", "cluster_ids")
REFERENCE_FIELDS = ("caption_ids",)  # every caption of each image: SCST's references
CAPTION_KEY_FIELDS = ("index", "caption_index")  # which caption of which record: the CLIP loss's text


def train_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch fields the training tasks of ``config`` read."""
  return (TRAIN_FIELDS + (REFERENCE_FIELDS if config_checks.task_on(config, "scst") else ())
          + (CAPTION_KEY_FIELDS if config_checks.task_on(config, "clip") else ())
          + (qa.QUESTION_FIELDS if config_checks.task_on(config, "qa") else ()))


@dataclasses.dataclass
class Context:
  """What step functions and evaluators share: the resolved config, model, frozen inputs and layout."""
  config: ml_collections.ConfigDict
  model: nn.Module
  frozen: dict[str, Any]
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  task_cfgs: dict[str, ml_collections.ConfigDict]
  tokenizer: Any
  vocab: Any = None  # the visual vocabulary (``data.vocab.Vocab``)
  workdir: str = ""  # where evaluators write their files (``workdir/eval``)

  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return parallel.data_sharding(self.mesh)

  def batch_to_global(self, batch: dict[str, np.ndarray], fields=TRAIN_FIELDS) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over (data, fsdp)."""
    sharding = self.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in fields if k in batch}


def resolve_config(config: ml_collections.ConfigDict):
  """Fills the sizes the data decides (-1 in the config) and checks explicit ones; returns
  (config, tokenizer, vocab). Errors name the flag and the file."""
  config = ml_collections.ConfigDict(config.to_dict())
  data = config.data
  for flag in ("records_dir", "vocab_dir", "tokenizer"):
    if not data[flag]:
      raise errors.ConfigError(f"--config.data.{flag} is empty: point it at the output of tools/ (see README)")
  manifest = records.read_manifest(data.records_dir)
  tok = tokenizer_lib.load_tokenizer(data.tokenizer)
  want_sha = manifest.get("tokenizer", {}).get("sha256")
  if want_sha and want_sha != records.sha256_file(data.tokenizer):
    raise records.DataError(f"--config.data.tokenizer={data.tokenizer} is not the vocabulary the records in "
                            f"{data.records_dir} were tokenised with ({manifest['tokenizer']['vocab_file']})")
  vocab = vocab_lib.load_vocab(data.vocab_dir, records_dir=data.records_dir)
  sizes = {"vocab_size": tok.vocab_size, "max_len": manifest["max_len"],
           "visual_feat_dim": manifest["feature_dim"], "num_clusters": vocab.k, "num_cells": records.NUM_CELLS}
  if data.get("questions") and config.model.get("num_answers", 0):  # the QA head's classes: the answer vocabulary
    sizes["num_answers"] = answers_lib.load_answer_vocab(
        qa_pipeline.answers_path(data.records_dir, data.get("answers_file", "")), records_dir=data.records_dir
    ).num_answers
  for field, value in sizes.items():
    if config.model[field] == -1:
      config.model[field] = value
    elif config.model[field] != value:
      raise errors.ConfigError(f"--config.model.{field}={config.model[field]} but the data has {value}")
  return config, tok, vocab


def task_configs(config: ml_collections.ConfigDict, tok) -> dict[str, ml_collections.FrozenConfigDict]:
  """Each task's config block (``config.tasks.<name>``) with the tokenizer's special token ids added."""
  out = {}
  for name, cfg in config.tasks.items():
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.update(dict(mask_id=tok.mask_id, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id, unk_id=tok.unk_id))
    out[name] = ml_collections.FrozenConfigDict(cfg)
  return out


def scst_table(config: ml_collections.ConfigDict, tok) -> cider.CiderTable:
  """SCST's CIDEr-D document frequencies (``tasks.scst.reference_table``): every caption of every record of the
  training split, one document per image. Checks what the task needs of the data first (``ConfigError``)."""
  flag = f"--config.tasks.scst.weight={config.tasks.scst.weight}"
  manifest = records.read_manifest(config.data.records_dir)
  if not manifest.get("max_captions"):
    raise errors.ConfigError(f"{flag} needs batches with every caption of each image, hence the records' "
                             f"max_captions, which {config.data.records_dir}/{records.MANIFEST_NAME} does not set: "
                             "re-run tools/extract_features.py with --max_captions")
  max_len = config.tasks.scst.max_len
  if max_len > config.model.max_len:
    raise errors.ConfigError(f"--config.tasks.scst.max_len={max_len} exceeds the model's caption length "
                             f"{config.model.max_len} (-1: that length)")
  ids = records.read_caption_ids(config.data.records_dir, config.data.train_split)
  table = scst.reference_table(ids, pad_id=tok.pad_id, sep_id=tok.sep_id)
  logging.info("SCST CIDEr-D document frequencies: %d images of split %r, %s distinct 1..4-grams", len(ids),
               config.data.train_split, [len(x) for x in table.last])
  return table


def clip_loss_inputs(config: ml_collections.ConfigDict, codebook: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
  """The CLIP loss's frozen inputs ({"generator": G's variables, "clip": CLIP params, "clip_text": int32 [N, C, T],
  the training split's captions after ``tasks.clip.prompt`` in CLIP tokens, row = record index}) and the CLIP's
  model config (a dict, for the task's config). Errors name the flag."""
  from bigen_jax import train_clip, train_generator  # pylint: disable=g-import-not-at-top
  task = config.tasks.clip
  generator = train_generator.load_generator(task.generator_dir)
  width = generator["params"]["bottleneck"]["kernel"].shape[-2]
  if width != codebook.shape[-1]:
    raise errors.ConfigError(f"--config.tasks.clip.generator_dir={task.generator_dir} draws {width}-wide grid "
                             f"features, but the visual vocabulary {config.data.vocab_dir} has {codebook.shape[-1]}")
  _, clip_params, clip_config = train_clip.load_clip(task.clip_path, task.clip_variant)
  text, _ = train_clip.caption_table(config.data.records_dir, config.data.train_split, clip_config.context_length,
                                     prompt=task.prompt)
  logging.info("CLIP loss: generator %s, CLIP %s, %d captions tables of %d records", task.generator_dir,
               task.clip_path, text.shape[1], text.shape[0])
  return {"generator": generator, "clip": clip_params, "clip_text": text}, clip_config.to_dict()


def build_context(config: ml_collections.ConfigDict, workdir: str, *, training: bool = True) -> Context:
  """Checks ``config``, resolves it against the data and lays out the mesh: what training and evaluation
  share. ``training`` False (evaluation) leaves out the training tasks' frozen inputs that no evaluator reads:
  SCST's CIDEr-D table, the CLIP loss's generator, CLIP and caption table (~15 s for a make demo stage-2 run)."""
  config_checks.check_config(config)
  config, tok, vocab = resolve_config(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.get("num_devices") else None
  mesh = parallel.make_mesh(config, devices)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen = {"codebook": jax.device_put(jnp.asarray(vocab.codebook), replicated)}
  if training and config_checks.task_on(config, "scst"):
    frozen["cider"] = jax.device_put(scst_table(config, tok), replicated)
  task_cfgs = task_configs(config, tok)
  if training and config_checks.task_on(config, "clip"):
    inputs, clip_model = clip_loss_inputs(config, vocab.codebook)
    frozen.update(jax.device_put(inputs, replicated))
    task_cfgs["clip"] = ml_collections.FrozenConfigDict({**task_cfgs["clip"].as_configdict().to_dict(),
                                                         "clip_model": clip_model})
  return Context(config=config, model=lxmert.build_model(config.model), frozen=frozen, mesh=mesh,
                 rules=parallel.axis_rules(config), task_cfgs=task_cfgs, tokenizer=tok, vocab=vocab,
                 workdir=workdir)
