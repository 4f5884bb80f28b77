"""Image -> caption evaluation (METHOD.md §8): decode captions of the eval split, score them against the
references with the COCO caption metrics, and, on the captioned-scenes world, check what they claim against
the ground-truth scene graphs.

Config ``config.eval.captioning``: decoder ("greedy" or "beam"), beam_size, num_examples (0: the whole
split), batch_size (per device: the global batch is that x the data-parallel devices), spice (False skips it).
Each process reads and decodes its share of the eval set (``eval_set``); process 0 gathers the captions, runs
the Java scorers and writes ``workdir/eval/captions_<step>.json`` ({image_id: {"caption", "references"}}, any
filesystem ``etils.epath`` reaches); every process returns its results.
"""

from etils import epath
import jax

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax.data import records
from bigen_jax.data import scenes_tfds
from bigen_jax.eval import caption_metrics
from bigen_jax.eval import eval_set
from bigen_jax.eval import scene_recognizer
from bigen_jax.sampling import captions as captions_lib
from bigen_jax.tasks import common

NAME = "captioning"


def decode_fn(ctx, cfg):
  """A jitted ``(params, batch) -> caption ids [B, L]`` with the configured decoder, sharded like the batch."""
  config, tok = ctx.config, ctx.tokenizer
  tokens = captions_lib.Tokens.from_tokenizer(tok, banned=(tok.unk_id,))
  visual_kind = config.tasks.i2t.visual_input

  def decode(params, batch):
    kw = dict(model=ctx.model, visual=common.visual_input(batch, visual_kind, ctx.frozen), boxes=batch["boxes"],
              max_len=config.model.max_len, tokens=tokens, layout=config.tasks.i2t.get("layout", "mask"))
    if cfg.decoder == "greedy":
      return captions_lib.greedy_captions(params, **kw)
    if cfg.decoder == "beam":
      return captions_lib.beam_search_captions(params, beam_size=cfg.beam_size, **kw)[0][:, 0]
    raise errors.ConfigError(f"--config.eval.captioning.decoder={cfg.decoder!r}: expected 'greedy' or 'beam'")

  return jax.jit(decode, out_shardings=ctx.batch_sharding())


class Evaluator:
  """``captioning/{BLEU-1..4,METEOR,ROUGE-L,CIDEr-D[,SPICE]}`` and, on scenes, ``captioning/semantic/...``."""

  def __init__(self, ctx):
    self.ctx, self.cfg = ctx, ctx.config.eval.captioning
    self.split = ctx.config.data.eval_split
    self.data = eval_set.load(ctx.config, split=self.split, num_examples=self.cfg.num_examples)
    self.source = records.read_manifest(ctx.config.data.records_dir).get("source", {})
    self.batch_size = eval_set.global_batch_size(ctx, self.cfg.batch_size)
    self.decode = decode_fn(ctx, self.cfg)

  def captions(self, params) -> list[str]:
    """Decoded captions of this process's share of the eval set, in its order."""
    ids = eval_set.map_batches(self.ctx, lambda batch, _: self.decode(params, batch), self.data,
                               ("dense", "boxes", "cluster_ids"), self.batch_size)
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
    scene_graphs = scenes_tfds.scene_graphs(self.source, self.split, indices)
    if scene_graphs is not None:
      semantic = scene_recognizer.caption_semantic_accuracy(texts, scene_graphs)
      out.update({f"{NAME}/semantic/{k}": float(v) for k, v in semantic.items()})
    if self.ctx.workdir:
      directory = fileio.join(self.ctx.workdir, "eval")
      epath.Path(directory).mkdir(parents=True, exist_ok=True)
      fileio.write_json_atomic(fileio.join(directory, f"captions_{step}.json"),
                               {i: {"caption": t, "references": r} for i, t, r in zip(ids, texts, refs)})
    return out
