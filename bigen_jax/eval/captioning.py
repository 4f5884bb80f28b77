"""Image -> caption evaluation (METHOD.md §8): decode captions of the eval split, score them against the
references with the COCO caption metrics, and, when the records' source has a plug-in (``sources``; e.g. the
captioned-scenes world), check what they claim against the truth of their images.

Config ``config.eval.captioning``: decoder (a caption decoder of ``sampling.registry``: "greedy", "beam",
"sample") and its settings (beam_size, ...), num_examples (0: the whole split), batch_size (per device: the
global batch is that x the data-parallel devices), spice (False skips it). Each process reads and decodes its
share of the eval set (``eval_set``); process 0 gathers the captions, runs the Java scorers and writes
``workdir/eval/captions_<step>.json`` ({image_id: {"caption", "references"}}, any filesystem ``etils.epath``
reaches); every process returns its results.

With ``config.eval.clip`` (``clip_scorer``): ``clip_s``, Hessel et al.'s reference-free CLIP-S = 2.5 x max(cos, 0)
of each image and its generated caption, and ``clip_s_reference``, the same for its first reference caption (what
a caption true of the image scores under this CLIP). Each process embeds its own images.
"""

import jax
import numpy as np

from bigen_jax import fileio
from bigen_jax.data import records
from bigen_jax.eval import caption_metrics
from bigen_jax.eval import clip_score
from bigen_jax.eval import clip_scorer
from bigen_jax.eval import eval_set
from bigen_jax.eval import sources
from bigen_jax.models import apply
from bigen_jax.sampling import captions as captions_lib
from bigen_jax.sampling import registry as decoders

NAME = "captioning"


def decode_fn(ctx, cfg):
  """A jitted ``(params, batch, rng) -> caption ids [B, L]`` with the configured decoder (``sampling.registry``),
  sharded like the batch."""
  config, tok = ctx.config, ctx.tokenizer
  tokens = captions_lib.Tokens.from_tokenizer(tok, banned=(tok.unk_id,))
  visual_kind = config.tasks.i2t.visual_input
  decoder = decoders.caption_decoder(cfg.decoder, cfg, flag="--config.eval.captioning.decoder")

  def decode(params, batch, rng):
    return decoder(params, rng, model=ctx.model, visual=apply.visual_input(batch, visual_kind, ctx.frozen),
                   boxes=batch["boxes"], max_len=config.model.max_len, tokens=tokens,
                   layout=config.tasks.i2t.get("layout", "mask"))

  return jax.jit(decode, out_shardings=ctx.batch_sharding())


class Evaluator:
  """``captioning/{BLEU-1..4,METEOR,ROUGE-L,CIDEr-D[,SPICE]}`` and, with a source plug-in,
  ``captioning/semantic/...``."""

  def __init__(self, ctx):
    self.ctx, self.cfg = ctx, ctx.config.eval.captioning
    self.split = ctx.config.data.eval_split
    config = ctx.config
    self.clip = clip_scorer.ClipScorer.from_config(config.eval.clip) if config.eval.get("clip") else None
    size = self.clip.model.image_size if self.clip is not None else 0
    self.data = eval_set.load(config, split=self.split, num_examples=self.cfg.num_examples, image_size=size)
    self.image_emb = None  # the whole eval set's CLIP image embeddings [N, E] (gathered: process 0 scores them)
    if self.clip is not None:
      self.image_emb = eval_set.gather({"emb": self.clip.image_embeddings(self.data.pop("images"))},
                                       self.data["counts"])["emb"]
    self.plugin = sources.plugin(records.read_manifest(ctx.config.data.records_dir).get("source", {}))
    self.batch_size = eval_set.global_batch_size(ctx, self.cfg.batch_size)
    self.decode = decode_fn(ctx, self.cfg)

  def captions(self, params) -> list[str]:
    """Decoded captions of this process's share of the eval set, in its order."""
    rng = jax.random.key(self.ctx.config.seed)
    ids = eval_set.map_batches(self.ctx, lambda batch, i: self.decode(params, batch, jax.random.fold_in(rng, i)),
                               self.data, ("dense", "boxes", "cluster_ids"), self.batch_size)
    return self.ctx.tokenizer.decode(ids)

  def run(self, params, *, step: int) -> dict[str, float]:
    rows = eval_set.gather_json([[int(i), int(image_id), text, refs] for i, image_id, text, refs in zip(
        self.data["index"], self.data["image_id"], self.captions(params), self.data["references"])])
    out = self.score(rows, step) if jax.process_index() == 0 else None
    return eval_set.broadcast_json(out)

  def score(self, rows: list[list], step: int) -> dict[str, float]:
    """Metrics of the whole eval set's ``[index, image_id, caption, references]`` rows (process 0: the Java
    scorers run here only); writes the captions file."""
    indices, ids, texts, refs = zip(*rows)
    scores = caption_metrics.caption_metrics({i: r for i, r in zip(ids, refs)},
                                             {i: [t] for i, t in zip(ids, texts)}, spice=self.cfg.spice)
    out = {f"{NAME}/{k}": float(v) for k, v in scores.items()}
    out[f"{NAME}/distinct_captions"] = len(set(texts)) / max(len(texts), 1)
    if self.plugin is not None:
      semantic = self.plugin.caption_metrics(texts, split=self.split, indices=indices)
      out.update({f"{NAME}/semantic/{k}": float(v) for k, v in semantic.items()})
    if self.clip is not None:
      for name, captions in (("clip_s", texts), ("clip_s_reference", [r[0] for r in refs])):
        scores = clip_score.captioning_clip_score(self.image_emb, self.clip.text_embeddings(captions))
        out[f"{NAME}/{name}"] = float(np.mean(scores))
    if self.ctx.workdir:
      fileio.write_json_atomic(fileio.join(self.ctx.workdir, "eval", f"captions_{step}.json"),
                               {i: {"caption": t, "references": r} for i, t, r in zip(ids, texts, refs)})
    return out
