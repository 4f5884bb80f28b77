"""Caption -> image evaluation (METHOD.md §8): decode the grid of cluster ids from each eval caption, draw it,
and score the pictures.

Images are drawn by the preview decoder (``sampling.preview``: each cluster's nearest training cell) until the
image generator exists; the same decoder applied to the true cluster ids gives the ``reference/`` row, the
best any token decoder can score through it. Metrics:

  cell_accuracy            decoded ids equal the image's true ids (a strict, token-level number)
  fid_recognizer           FID between drawn and real images in the scene recogniser's feature space
  fid_inception            FID with InceptionV3, when ``inception_weights`` (tools/convert_inception.py) is set
  semantic/...             the recogniser reads each drawn image: do the caption's claims hold?
  r_precision_easy/_hard   the caption against 99 random captions / one-word swaps, ranked by the recogniser
  (CLIPScore joins when the JAX CLIP arrives; the scorer is the only thing that changes.)

The scene-world numbers need captioned-scenes records; on other data only cell accuracy and FID (Inception)
are reported. Config ``config.eval.generation``: order, num_steps, temperature, num_examples, batch_size,
recognizer_dir, inception_weights, grid_images. Writes ``workdir/eval/generation_<step>.png``.
"""

import os

import jax
import numpy as np

from bigen_jax import viz
from bigen_jax.data import records
from bigen_jax.data import scenes
from bigen_jax.data import scenes_tfds
from bigen_jax.eval import eval_set
from bigen_jax.eval import fid
from bigen_jax.eval import r_precision
from bigen_jax.eval import scene_recognizer
from bigen_jax.sampling import image_tokens
from bigen_jax.sampling import preview

NAME = "generation"


def decode_fn(ctx, cfg):
  """A jitted ``(params, batch, rng) -> cluster ids [B, M]`` with the configured order and steps."""

  def decode(params, batch, rng):
    ids, _ = image_tokens.parallel_decode(
        params, rng, model=ctx.model, text_ids=batch["text_ids"], text_mask=batch["text_mask"],
        boxes=batch["boxes"], codebook=ctx.frozen["codebook"], num_steps=cfg.num_steps, order=cfg.order,
        temperature=cfg.temperature)
    return ids

  return jax.jit(decode)


class Evaluator:
  """``generation/...``: see the module docstring."""

  def __init__(self, ctx):
    self.ctx, self.cfg = ctx, ctx.config.eval.generation
    config = ctx.config
    split = config.data.eval_split
    self.data = eval_set.load(config, split=split, num_examples=self.cfg.num_examples, with_images=True)
    self.captions = [refs[0] for refs in self.data["references"]]  # the caption each image is drawn from
    self.table = preview.load_or_build_patch_table(ctx.vocab, config.data.records_dir)
    self.decode = decode_fn(ctx, self.cfg)
    source = records.read_manifest(config.data.records_dir).get("source", {})
    self.scene_graphs = scenes_tfds.scene_graphs(source, split, self.data["index"])
    self.recognizer = None
    if self.scene_graphs is not None:
      directory = self.cfg.recognizer_dir or os.path.join(ctx.workdir or ".", "scene_recognizer")
      self.recognizer, _ = scene_recognizer.load_or_train(directory)
    self.inception = None
    if self.cfg.inception_weights:
      from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
      self.inception = fid.inception_features_fn(convert_io.load_params(self.cfg.inception_weights))
    self.real_features = self._features(self.data["images"])
    self.true_previews = preview.render_preview(self.data["cluster_ids"], self.table)
    self.reference = self.score_images(self.true_previews)

  def _features(self, images: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    if self.recognizer is not None:
      out["recognizer"] = scene_recognizer.features(self.recognizer, images)
    if self.inception is not None:
      out["inception"] = fid.compute_features(images, self.inception)
    return out

  def score_images(self, images: np.ndarray) -> dict[str, float]:
    """Every image metric of drawn ``images`` [N, H, W, 3] (image i drawn from ``self.captions[i]``)."""
    out = {}
    for name, feats in self._features(images).items():
      out[f"fid_{name}"] = fid.fid_from_features(feats, self.real_features[name])
    if self.recognizer is not None:
      probs = scene_recognizer.predict(self.recognizer, images)
      semantic = scene_recognizer.semantic_accuracy(probs, self.captions)
      out.update({f"semantic/{k}": float(v) for k, v in semantic.items()})
      score_fn = lambda index, texts: scene_recognizer.caption_scores(  # noqa: E731
          {k: v[index] for k, v in probs.items()}, texts)
      index = np.arange(len(images))
      if len(set(self.captions)) > self.cfg.r_precision_negatives:
        easy = r_precision.easy(index, self.captions, score_fn, num_negatives=self.cfg.r_precision_negatives,
                                seed=self.ctx.config.seed)
        out.update(easy.metrics("r_precision_easy"))
      hard = r_precision.hard(index, self.captions, score_fn, negatives_fn=scenes.hard_negatives,
                              contexts=self.scene_graphs, seed=self.ctx.config.seed)
      out.update(hard.metrics("r_precision_hard"))
    return out

  def generate(self, params) -> np.ndarray:
    """Cluster ids [N, M] decoded from ``self.captions`` (the first caption of each eval image)."""
    rng = jax.random.key(self.ctx.config.seed)
    return eval_set.map_batches(self.ctx, lambda batch, i: self.decode(params, batch, jax.random.fold_in(rng, i)),
                                self.data, ("text_ids", "text_mask", "boxes"), self.cfg.batch_size)

  def run(self, params, *, step: int) -> dict[str, float]:
    ids = self.generate(params)
    images = preview.render_preview(ids, self.table)
    out = {"cell_accuracy": float((ids == self.data["cluster_ids"]).mean()), **self.score_images(images)}
    out.update({f"reference/{k}": v for k, v in self.reference.items()})
    if self.ctx.workdir and jax.process_index() == 0 and self.cfg.grid_images:
      self.save_grid(images, step)
    return {f"{NAME}/{k}": float(v) for k, v in out.items()}

  def save_grid(self, images: np.ndarray, step: int) -> str:
    """PNG: caption | real image | preview of its true tokens | preview of the generated tokens."""
    k = min(self.cfg.grid_images, len(images))
    rows = [[self.data["images"][i], self.true_previews[i], images[i]] for i in range(k)]
    sheet = viz.captioned_grid(rows, [f"{c}  (real | true tokens | generated)" for c in self.captions[:k]],
                               tile=160, wrap=40)
    path = os.path.join(self.ctx.workdir, "eval", f"generation_{step}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return viz.save_png(sheet, path)
