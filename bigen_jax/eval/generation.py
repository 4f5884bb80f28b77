"""Caption -> image evaluation (METHOD.md §8): decode the grid of cluster ids from each eval caption, draw it,
and score the pictures.

Images are drawn by the preview decoder (``sampling.preview``: each cluster's nearest training cell) or by the
records' world when its plug-in draws tokens (``sources``: in the captioned-scenes world with
``scene_decoder_heads`` set, the scene decoder: the detector's heads read the tokens, the world's renderer draws
them); the patch preview is then kept as the ``preview_reference/`` baseline row. The same drawing applied to the
true cluster ids gives the ``reference/`` row, the best any token decoder can score through it; with a world
reader, the ``real/`` row reads the real images (semantic accuracy and R-precision): the ceiling of the reader and
its negatives themselves. With ``generator_dir`` (a ``bigen_jax.train_generator`` run), the frozen SPADE
generator (``text_to_image.generator_drawer``) draws too: the true tokens as ``gan_reference/`` (held-out images
rebuilt from their tokens), each decoder's tokens as ``gan/`` and ``<variant>/gan/``; ``reconstructions_<step>.png``
shows real | preview | scene decoder | GAN.
Metrics:

  cell_accuracy            decoded ids equal the image's true ids (a strict, token-level number)
  fid_recognizer           FID between drawn and real images in the feature space of the world's reader (the
                           scene recogniser)
  fid                      FID with pytorch-fid's FID Inception, when ``inception_weights``
                           (tools/convert_inception.py) holds its weights: the number papers report
  fid_torchvision          the same distance with torchvision's Inception-v3 weights instead (other pools,
                           other weights: not comparable with published FID); ``inception_transform_input``
                           applies torchvision's ImageNet normalisation, as torchvision does for them
  semantic/...             the world's reader reads each drawn image: do the caption's claims hold?
  r_precision_easy/_hard   the caption against 99 random captions / the world's hard negatives, ranked by it
  clip_score               with ``config.eval.clip`` (``clip_scorer``): 100 x max(cos, 0) of image and caption
  clip_r_precision_easy/_hard  the same R-precision ranked by CLIP's cosine (hard negatives: the world's, else
                           ``r_precision.swap_negatives``' word swaps)

Real images are compared at the size of the drawings (128x128: 8 cells of 16 px in the preview; the scene
decoder's renders): every stored image, whatever its size and aspect ratio, is resized whole to that square
(``eval_set.square_image``, PIL bicubic), so real and drawn images meet at one resolution in the recogniser,
in Inception (which resizes both to 299x299, bilinear, as pytorch-fid does) and in the grid.

The world's numbers need records whose source has a plug-in with a reader (``sources``: captioned scenes of a
named dataset, whose recogniser is loaded from ``recognizer_dir``, default ``<workdir>/scene_recognizer``, and
never trained here: ``tools/train_scene_recognizer.py``); on other data only cell accuracy and FID (Inception)
are reported.

Config ``config.eval.generation``: the decoder (order: an image-token decoder of ``sampling.registry``; its
settings num_steps, temperature, schedule, choice_temperature, guidance and readout, "classifier" or
"nearest_centroid" for a model trained by feature regression: ``image_tokens.parallel_decode``), num_examples,
batch_size, recognizer_dir, inception_weights, inception_transform_input, grid_images, and ``variants``:
name -> overrides of the decoder fields, e.g. ``{"sampling": {"order": "maskgit", "temperature": 1.0,
"choice_temperature": 4.5, "schedule": "cosine"}}``. Each variant is decoded from the same captions and reports the
headline metrics (``VARIANT_METRICS``) under ``generation/<name>/...``, so one table compares argmax, sampling and
guidance.
Writes ``workdir/eval/generation_<step>.png`` (one generated column per decoder).

Scale: ``batch_size`` is per device. Each process reads its share of the eval set and decodes, draws and reads
(the world's reader, Inception) its own images; the per-image outputs are gathered and process 0 computes FID, semantic
accuracy and R-precision, whose results every process receives (``eval_set``); process 0 writes the grid of its
first images.
"""

import jax
import numpy as np

from bigen_jax import errors
from bigen_jax import fileio
from bigen_jax import text_to_image
from bigen_jax import viz
from bigen_jax.data import records
from bigen_jax.eval import clip_score
from bigen_jax.eval import clip_scorer
from bigen_jax.eval import eval_set
from bigen_jax.eval import fid
from bigen_jax.eval import r_precision
from bigen_jax.eval import sources
from bigen_jax.models import inception
from bigen_jax.models import spade
from bigen_jax.sampling import image_tokens
from bigen_jax.sampling import preview

NAME = "generation"
DECODER_FIELDS = text_to_image.DECODER_FIELDS
VARIANT_METRICS = ("cell_accuracy", "fid_recognizer", "fid", "fid_torchvision", "semantic/accuracy",
                   "r_precision_easy", "r_precision_hard", "clip_score", "clip_r_precision_easy",
                   "clip_r_precision_hard")
# Prefixes the main decoder's metrics use.
RESERVED_NAMES = ("", "reference", "preview_reference", "real", "semantic", "gan", "gan_reference")


def decoder_settings(cfg) -> dict[str, dict]:
  """``parallel_decode`` keyword args of the main decoder (name "") and of each of ``cfg.variants``."""
  main = {k: cfg.get(k, "classifier") if k == "readout" else cfg[k] for k in DECODER_FIELDS}  # saved before readout
  if main["readout"] not in image_tokens.READOUTS:
    raise errors.ConfigError(f"--config.eval.generation.readout={main['readout']!r}: expected one of "
                             f"{image_tokens.READOUTS}")
  out = {"": main}
  for name, overrides in cfg.variants.items():
    unknown = sorted(set(overrides.keys()) - set(DECODER_FIELDS))
    if unknown or name in RESERVED_NAMES or "/" in name:
      raise errors.ConfigError(f"--config.eval.generation.variants: variant {name!r} {overrides.to_dict()}: "
                               f"expected a name not in {RESERVED_NAMES} without '/', and overrides of "
                               f"{DECODER_FIELDS}")
    out[name] = {**main, **overrides.to_dict()}
  return out


def decode_fn(ctx, settings):
  """A jitted ``(params, batch, rng) -> cluster ids [B, M]`` with the decoder ``settings`` (a mapping of
  ``DECODER_FIELDS``): ``text_to_image.token_decoder``."""
  return jax.jit(text_to_image.token_decoder(ctx, settings), out_shardings=ctx.batch_sharding())


class Evaluator:
  """``generation/...``: see the module docstring."""

  def __init__(self, ctx):
    self.ctx, self.cfg = ctx, ctx.config.eval.generation
    config = ctx.config
    split = config.data.eval_split
    manifest = records.read_manifest(config.data.records_dir)
    self.plugin = sources.plugin(manifest.get("source", {}))
    self.table = preview.load_or_build_patch_table(ctx.vocab, config.data.records_dir)
    self.drawer, self.reader = None, None  # the world's token drawer and reader of drawn images, if it has them
    if self.plugin is not None:
      layer = manifest.get("backbone_config", {}).get("layer", "fc6")
      self.drawer = self.plugin.token_drawer(self.cfg, codebook=ctx.vocab.codebook, layer=layer)
      self.reader = self.plugin.image_reader(self.cfg, workdir=ctx.workdir)  # loaded (UserError if missing)
    self.image_size = int(self.draw(np.zeros((1, records.NUM_CELLS), np.int32)).shape[1])  # the drawings' side
    self.data = eval_set.load(config, split=split, num_examples=self.cfg.num_examples, image_size=self.image_size)
    self.captions = [refs[0] for refs in self.data["references"]]  # the caption each local image is drawn from
    self.all_captions = eval_set.gather_json(self.captions)  # the whole eval set's (process 0 scores them)
    self.batch_size = eval_set.global_batch_size(ctx, self.cfg.batch_size)
    self.settings = decoder_settings(self.cfg)
    self.decoders = {}  # one compiled decoder per distinct setting, shared by variants that repeat one
    for settings in self.settings.values():
      key = _key(settings)
      if key not in self.decoders:
        self.decoders[key] = decode_fn(ctx, settings)
    self.clip = clip_scorer.ClipScorer.from_config(config.eval.clip) if config.eval.get("clip") else None
    self.negatives = (r_precision.swap_negatives, None)  # hard negatives and their contexts, for R-precision
    if self.reader is not None:
      index = eval_set.gather({"index": self.data["index"]}, self.data["counts"])["index"]
      self.negatives = self.plugin.hard_negatives(split=split, indices=index)
    self.inception, self.inception_metric = None, None
    if self.cfg.inception_weights:
      from bigen_jax.convert import io as convert_io  # pylint: disable=g-import-not-at-top
      variables = convert_io.load_params(self.cfg.inception_weights)
      variant = inception.variant_of(variables)
      transform = variant == "torchvision" and self.cfg.get("inception_transform_input", True)
      self.inception = fid.inception_features_fn(variables, transform_input=transform)
      self.inception_metric = fid.METRIC_NAMES[variant]
    self.real_features = eval_set.gather(self._features(self.data["images"]), self.data["counts"])
    self.true_drawings = self.draw(self.data["cluster_ids"])
    self.reference = self.score_images(self.true_drawings)
    self.real = None  # the real images read by the same reader: the ceiling of semantic accuracy and R-precision
    if self.reader is not None:
      self.real = {k: v for k, v in self.score_images(self.data["images"]).items()
                   if k.startswith(("semantic/", "r_precision", "clip"))}
    self.preview_reference = None
    if self.drawer is not None:  # the patch preview stays as a baseline row
      self.preview_reference = self.score_images(preview.render_preview(self.data["cluster_ids"], self.table))
    self.gan, self.gan_drawings, self.gan_reference = None, None, None  # the frozen SPADE generator, if given
    draw = text_to_image.generator_drawer(ctx.frozen["codebook"])
    self._gan_draw = jax.jit(lambda variables, ids, rng: spade.to_uint8(draw(variables, ids, rng)))
    if self.cfg.get("generator_dir"):
      from bigen_jax import train_generator  # pylint: disable=g-import-not-at-top
      self.set_generator(train_generator.load_generator(self.cfg.generator_dir))

  def set_generator(self, variables) -> None:
    """Draws with the frozen generator ``variables`` (G's {"params", "spectral"}) from now on, and scores its
    drawings of the true tokens (``gan_reference``)."""
    self.gan = variables
    self.gan_drawings = self.draw_gan(self.data["cluster_ids"])
    self.gan_reference = self.score_images(self.gan_drawings)

  def draw(self, cluster_ids: np.ndarray) -> np.ndarray:
    """Cluster ids [N, M] -> pictures [N, H, W, 3]: the world's token drawer when its plug-in has one (the
    scene decoder), otherwise the patch preview."""
    if self.drawer is not None:
      return self.drawer(cluster_ids)
    return preview.render_preview(cluster_ids, self.table)

  def draw_gan(self, cluster_ids: np.ndarray) -> np.ndarray:
    """Cluster ids [N, M] -> the frozen generator's pictures uint8 [N, H, W, 3], resized to the drawings' side
    when the generator's differs (``eval_set.square_image``). Batch i's noise is ``fold_in(seed key, i)``."""
    rng, out = jax.random.key(self.ctx.config.seed), []
    for i, start in enumerate(range(0, len(cluster_ids), self.batch_size)):
      ids = cluster_ids[start:start + self.batch_size]
      padded = np.concatenate([ids, np.repeat(ids[:1], self.batch_size - len(ids), axis=0)])  # one compiled shape
      out.append(np.asarray(self._gan_draw(self.gan, padded, jax.random.fold_in(rng, i)))[:len(ids)])
    images = np.concatenate(out)
    if images.shape[1] != self.image_size:
      images = np.stack([eval_set.square_image(x, self.image_size) for x in images])
    return images

  def _features(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """FID metric name -> features [N, D] (float32) of ``images`` in its feature space."""
    out = {}
    if self.reader is not None:
      out[self.reader.feature_name] = self.reader.features(images)
    if self.inception is not None:
      out[self.inception_metric] = fid.compute_features(images, self.inception)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  def score_images(self, images: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every image metric of this process's drawn ``images`` [n, H, W, 3] (image i drawn from
    ``self.captions[i]``) over the whole eval set, on every process; ``extra``: per-image values [n] whose
    means join the metrics under their names."""
    outputs = {f"features/{k}": v for k, v in self._features(images).items()}
    outputs.update({f"mean/{k}": np.asarray(v, np.float32) for k, v in (extra or {}).items()})
    if self.reader is not None:
      outputs.update({f"read/{k}": np.asarray(v, np.float32) for k, v in self.reader.read(images).items()})
    if self.clip is not None:
      outputs["clip/image"] = self.clip.image_embeddings(images)
    gathered = eval_set.gather(outputs, self.data["counts"])
    return eval_set.broadcast_json(self._metrics(gathered) if jax.process_index() == 0 else None)

  def _metrics(self, gathered: dict[str, np.ndarray]) -> dict[str, float]:
    """The metrics of the whole eval set's gathered per-image outputs (``score_images``; process 0)."""
    out = {k.split("/", 1)[1]: float(np.mean(v)) for k, v in gathered.items() if k.startswith("mean/")}
    for key, feats in gathered.items():
      if key.startswith("features/"):
        name = key.split("/", 1)[1]
        out[name] = fid.fid_from_features(feats, self.real_features[name])
    if self.reader is not None:
      read = {k.split("/", 1)[1]: v for k, v in gathered.items() if k.startswith("read/")}
      semantic = self.reader.semantic_accuracy(read, self.all_captions)
      out.update({f"semantic/{k}": float(v) for k, v in semantic.items()})
      out.update(self._r_precision(self.reader.caption_scorer(read), "r_precision"))
    if "clip/image" in gathered:
      image_emb = gathered["clip/image"]
      text_emb = self.clip.text_embeddings(self.all_captions)
      out["clip_score"] = float(np.mean(clip_score.clip_score(image_emb, text_emb)))
      out.update(self._r_precision(self.clip.score_fn(image_emb), "clip_r_precision"))
    return out

  def _r_precision(self, score_fn, prefix: str) -> dict[str, float]:
    """``<prefix>_easy`` (when the eval set has more distinct captions than negatives) and ``<prefix>_hard`` of
    the whole eval set's images, ranked by ``score_fn(index, texts)``."""
    out, index, seed = {}, np.arange(len(self.all_captions)), self.ctx.config.seed
    if len(set(self.all_captions)) > self.cfg.r_precision_negatives:
      out.update(r_precision.easy(index, self.all_captions, score_fn, num_negatives=self.cfg.r_precision_negatives,
                                  seed=seed).metrics(f"{prefix}_easy"))
    negatives_fn, contexts = self.negatives
    out.update(r_precision.hard(index, self.all_captions, score_fn, negatives_fn=negatives_fn, contexts=contexts,
                                seed=seed).metrics(f"{prefix}_hard"))
    return out

  def generate(self, params, variant: str = "") -> np.ndarray:
    """Cluster ids [n, M] decoded from ``self.captions`` (the first caption of each of this process's eval
    images) by the main decoder or a ``variant``."""
    decode = self.decoders[_key(self.settings[variant])]
    rng = jax.random.key(self.ctx.config.seed)
    return eval_set.map_batches(self.ctx, lambda batch, i: decode(params, batch, jax.random.fold_in(rng, i)),
                                self.data, ("text_ids", "text_mask", "boxes"), self.batch_size)

  def run(self, params, *, step: int) -> dict[str, float]:
    # settings -> (images, metrics, GAN images, their metrics): a variant equal to another is decoded and scored once
    decoded = {}
    for variant, settings in self.settings.items():
      if _key(settings) not in decoded:
        ids = self.generate(params, variant)
        images = self.draw(ids)
        correct = (ids == self.data["cluster_ids"]).mean(axis=1)
        gan_images = self.draw_gan(ids) if self.gan is not None else None
        decoded[_key(settings)] = (images, self.score_images(images, {"cell_accuracy": correct}), gan_images,
                                   self.score_images(gan_images) if gan_images is not None else {})
    images, out, gan_images, gan_metrics = decoded[_key(self.settings[""])]
    rows = {"reference": self.reference, "real": self.real, "preview_reference": self.preview_reference,
            "gan_reference": self.gan_reference, "gan": gan_metrics}
    out = {**out, **{f"{row}/{k}": v for row, metrics in rows.items() for k, v in (metrics or {}).items()}}
    variants = {name: decoded[_key(settings)] for name, settings in self.settings.items() if name}
    for name, (_, metrics, _, gan) in variants.items():
      out.update({f"{name}/{k}": metrics[k] for k in VARIANT_METRICS if k in metrics})
      out.update({f"{name}/gan/{k}": gan[k] for k in VARIANT_METRICS if k in gan})
    if self.ctx.workdir and jax.process_index() == 0 and self.cfg.grid_images:
      columns = {"generated": images, **{name: v[0] for name, v in variants.items()}}
      if self.gan is not None:
        columns.update({"GAN": gan_images, **{f"{name} GAN": v[2] for name, v in variants.items()}})
        self.save_reconstructions(step)
      self.save_grid(step, columns)
    return {f"{NAME}/{k}": float(v) for k, v in out.items()}

  def save_grid(self, step: int, columns: dict[str, np.ndarray]) -> str:
    """PNG of this process's first images (process 0: the eval set's first): caption | real image | drawing of
    its true tokens (and the generator's, with one) | one column per ``columns`` (label -> drawings of generated
    tokens [n, H, W, 3]). Returns its path (``workdir/eval``, through ``etils.epath``)."""
    first = {"real": self.data["images"], "true tokens": self.true_drawings}
    if self.gan_drawings is not None:
      first["true tokens GAN"] = self.gan_drawings
    return self._save_sheet({**first, **columns}, f"generation_{step}.png")

  def save_reconstructions(self, step: int) -> str:
    """PNG of the held-out images rebuilt from their true tokens: real | patch preview | the world's drawing
    (when it has one) | the frozen generator's. Returns its path (``workdir/eval``)."""
    columns = {"real": self.data["images"],
               "preview": preview.render_preview(self.data["cluster_ids"][:self.cfg.grid_images], self.table)}
    if self.drawer is not None:
      columns["scene decoder"] = self.true_drawings
    columns["GAN"] = self.gan_drawings
    return self._save_sheet(columns, f"reconstructions_{step}.png")

  def _save_sheet(self, columns: dict[str, np.ndarray], name: str) -> str:
    """The first ``grid_images`` images of every column (label -> [n, H, W, 3]), one row per caption."""
    k = min([self.cfg.grid_images] + [len(v) for v in columns.values()])
    rows = [[v[i] for v in columns.values()] for i in range(k)]
    labels = " | ".join(columns)
    sheet = viz.captioned_grid(rows, [f"{c}  ({labels})" for c in self.captions[:k]], tile=160, wrap=40)
    return viz.save_png(sheet, fileio.join(self.ctx.workdir, "eval", name))


def _key(settings: dict) -> tuple:
  """A hashable form of decoder ``settings``."""
  return tuple(sorted(settings.items()))
