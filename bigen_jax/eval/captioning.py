"""Image -> caption evaluation (METHOD.md §8): decode captions of the eval split, score them against the
references with the COCO caption metrics, and, on the captioned-scenes world, check what they claim against
the ground-truth scene graphs.

Config ``config.eval.captioning``: decoder ("greedy" or "beam"), beam_size, num_examples (0: the whole
split), batch_size (divisible by the data-parallel devices), spice (False skips it). Writes
``workdir/eval/captions_<step>.json`` ({image_id: {"caption", "references"}}).
"""

import os

import jax

from bigen_jax import errors
from bigen_jax.data import records
from bigen_jax.data import scenes_tfds
from bigen_jax.eval import caption_metrics
from bigen_jax.eval import eval_set
from bigen_jax.eval import scene_recognizer
from bigen_jax.sampling import captions as captions_lib
from bigen_jax.tasks import common

NAME = "captioning"


def decode_fn(ctx, cfg):
  """A jitted ``(params, batch) -> caption ids [B, L]`` with the configured decoder."""
  config, tok = ctx.config, ctx.tokenizer
  tokens = captions_lib.Tokens.from_tokenizer(tok, banned=(tok.unk_id,))
  visual_kind = config.tasks.i2t.visual_input

  def decode(params, batch):
    kw = dict(model=ctx.model, visual=common.visual_input(batch, visual_kind, ctx.frozen), boxes=batch["boxes"],
              max_len=config.model.max_len, tokens=tokens)
    if cfg.decoder == "greedy":
      return captions_lib.greedy_captions(params, **kw)
    if cfg.decoder == "beam":
      return captions_lib.beam_search_captions(params, beam_size=cfg.beam_size, **kw)[0][:, 0]
    raise errors.ConfigError(f"--config.eval.captioning.decoder={cfg.decoder!r}: expected 'greedy' or 'beam'")

  return jax.jit(decode)


class Evaluator:
  """``captioning/{BLEU-1..4,METEOR,ROUGE-L,CIDEr-D[,SPICE]}`` and, on scenes, ``captioning/semantic/...``."""

  def __init__(self, ctx):
    self.ctx, self.cfg = ctx, ctx.config.eval.captioning
    split = ctx.config.data.eval_split
    self.data = eval_set.load(ctx.config, split=split, num_examples=self.cfg.num_examples)
    source = records.read_manifest(ctx.config.data.records_dir).get("source", {})
    self.scene_graphs = scenes_tfds.scene_graphs(source, split, self.data["index"])
    self.decode = decode_fn(ctx, self.cfg)

  def captions(self, params) -> list[str]:
    """Decoded captions of the eval set, in its order."""
    ids = eval_set.map_batches(self.ctx, lambda batch, _: self.decode(params, batch), self.data,
                               ("dense", "boxes", "cluster_ids"), self.cfg.batch_size)
    return self.ctx.tokenizer.decode(ids)

  def run(self, params, *, step: int) -> dict[str, float]:
    texts = self.captions(params)
    refs = self.data["references"]
    ids = [int(i) for i in self.data["image_id"]]
    scores = caption_metrics.caption_metrics({i: r for i, r in zip(ids, refs)},
                                             {i: [t] for i, t in zip(ids, texts)}, spice=self.cfg.spice)
    out = {f"{NAME}/{k}": float(v) for k, v in scores.items()}
    out[f"{NAME}/distinct_captions"] = len(set(texts)) / max(len(texts), 1)
    if self.scene_graphs is not None:
      semantic = scene_recognizer.caption_semantic_accuracy(texts, self.scene_graphs)
      out.update({f"{NAME}/semantic/{k}": float(v) for k, v in semantic.items()})
    if self.ctx.workdir and jax.process_index() == 0:
      path = os.path.join(self.ctx.workdir, "eval", f"captions_{step}.json")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      records.write_json_atomic(path, {i: {"caption": t, "references": r} for i, t, r in zip(ids, texts, refs)})
    return out

