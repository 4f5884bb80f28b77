"""Captions and pictures from an export bundle (``bigen_jax.export``), in three lines:

  from bigen_jax import Pipeline
  p = Pipeline.load("demo_out/bundle")
  captions, pictures = p.caption([image]), p.generate(["a red circle left of a blue square"])

``caption``: images -> the bundled feature extractor (``features.backbones``, the records' backbone, weights and
layer; its own preprocessing, as ``tools/extract_features.py`` ran it) -> grid features in float16 as the records
store them (and their nearest centroids, for a model that reads cluster ids) -> a caption decoder of
``sampling.registry`` through the captioning evaluator's ``decode_fn``. ``generate``: captions -> T2I decoding
(``text_to_image``) -> the bundled SPADE generator, or without one the evaluators' preview decoder
(``sampling.preview``: each cluster's nearest training cell; a preview, not the paper's generator).

Both run on this process's first device in batches padded to a power of two up to ``max_batch``; the jitted
functions are cached by (batch bucket, options), so each compiles once per padded shape. Batch ``i`` of a call
(``max_batch`` inputs each) decodes with the key ``fold_in(key(seed), i)``, as the evaluators do.
"""

import contextlib
import tempfile
from typing import Any, Callable, Iterator, Sequence

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from PIL import Image

from bigen_jax import errors
from bigen_jax import export
from bigen_jax import fileio
from bigen_jax import text_to_image
from bigen_jax.data import batching
from bigen_jax.data import images as images_lib
from bigen_jax.data import records
from bigen_jax.data import vocab as vocab_lib
from bigen_jax.eval import captioning
from bigen_jax.eval import generation
from bigen_jax.sampling import preview
from bigen_jax.sampling import registry


def bucket_size(n: int, max_batch: int) -> int:
  """The padded batch of ``n`` (1 <= n <= max_batch) inputs: the next power of two, at most ``max_batch``."""
  return min(max_batch, 1 << (n - 1).bit_length())


class Pipeline:
  """A loaded bundle's model on one device: ``caption(images)`` and ``generate(texts)`` (module docstring)."""

  def __init__(self, bundle: export.Bundle, *, max_batch: int = 16):
    if max_batch < 1:
      raise ValueError(f"max_batch must be positive, got {max_batch}")
    self.bundle, self.max_batch = bundle, max_batch
    self.config, self.tokenizer = bundle.config, bundle.tokenizer
    self.ctx = export.context(bundle.config, bundle.tokenizer, bundle.codebook)
    replicated = jax.sharding.NamedSharding(self.ctx.mesh, jax.sharding.PartitionSpec())
    self.params = jax.device_put(bundle.params, replicated)
    self.generator = None if bundle.generator is None else jax.device_put(bundle.generator, replicated)
    self.jitted: dict[tuple, Callable] = {}  # (kind, batch bucket, options) -> jitted function
    self._backbone = None
    self._weights_dir = None  # a local copy of a URL bundle's backbone weights (torch reads local files)

  @classmethod
  def load(cls, path: str, *, max_batch: int = 16, verify: bool = True) -> "Pipeline":
    """The pipeline of the bundle in ``path`` (local or a URL; ``export.load_bundle``: ``BundleError`` naming the
    file when it is incomplete, corrupt or of another format version)."""
    return cls(export.load_bundle(path, verify=verify), max_batch=max_batch)

  # ------------------------------------------------------------------------------------------- image -> text

  def feature_extractor(self):
    """The bundled backbone (``features.backbones``; built on first use: it needs PyTorch), as the records'
    manifest describes it."""
    if self._backbone is None:
      from bigen_jax.features import backbones  # pylint: disable=g-import-not-at-top
      extractor = self.bundle.meta["feature_extractor"]
      cfg = dict(extractor["backbone_config"])
      weights = extractor.get("weights_file")
      if weights:
        weights = self.bundle.file(weights)
        if fileio.is_url(weights):
          self._weights_dir = tempfile.TemporaryDirectory()
          local = fileio.join(self._weights_dir.name, weights.rsplit("/", 1)[-1])
          fileio.write_atomic(local, epath.Path(weights).read_bytes())
          weights = local
      kwargs = {k: cfg[k] for k in ("layer", "max_side") if cfg.get(k) is not None}
      try:
        backbone = backbones.build_backbone(extractor["backbone"], weights=weights, short_side=cfg.get("image_size"),
                                            seed=cfg.get("seed") or 0, **kwargs)
      except ValueError as e:
        raise export.BundleError(f"{self.bundle.file(export.META_NAME)}: feature_extractor cannot be built: {e}"
                                 ) from None
      if cfg and backbone.config() != cfg:
        raise export.BundleError(f"{self.bundle.file(export.META_NAME)}: the feature extractor rebuilds as "
                                 f"{backbone.config()}, not as the records' {cfg}")
      self._backbone = backbone
    return self._backbone

  def features(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
    """PIL images or uint8 [H, W, 3] arrays -> the model's visual inputs: ``dense`` float16 [N, 64, D] (the
    records' precision), ``cluster_ids`` int32 [N, 64] (nearest centroid, ``data.vocab.assign``), ``boxes``
    float32 [N, 64, 4]."""
    from bigen_jax.features import backbones  # pylint: disable=g-import-not-at-top
    arrays = [np.asarray(images_lib.to_rgb(im, name=f"image {i}")) if isinstance(im, Image.Image) else im
              for i, im in enumerate(images)]
    try:
      arrays = backbones.as_image_list(arrays)
    except ValueError as e:
      raise errors.UserError(f"caption(images): {e}") from None
    dense = self.feature_extractor()(arrays).astype(np.float16)
    n, cells, dim = dense.shape
    ids, _ = vocab_lib.assign(dense.reshape(-1, dim).astype(np.float32), self.bundle.codebook)
    return {"dense": dense, "cluster_ids": ids.reshape(n, cells),
            "boxes": np.broadcast_to(records.grid_boxes(), (n, cells, 4))}

  def caption(self, images: Sequence[Any], decoder: str | None = None, *, seed: int = 0, **options) -> list[str]:
    """Captions (list of str) of ``images`` (PIL images or uint8 [H, W, 3] arrays, any size). ``decoder``: a
    caption decoder of ``sampling.registry`` ("greedy", "beam", "sample", "gibbs"; default the run's
    ``eval.captioning.decoder``), ``options`` its settings (e.g. beam_size=3; default the run's)."""
    if not len(images):
      return []
    cfg = self.config.eval.captioning.to_dict()
    decoder = decoder or cfg["decoder"]
    registry.caption_decoder(decoder, flag="decoder")  # an unknown name: a ConfigError naming it
    fields = registry.CAPTION_DECODERS[decoder][1]
    _check_options(options, fields, f"caption decoder {decoder!r}")
    cfg = ml_collections.ConfigDict({**cfg, "decoder": decoder, **options})
    settings = (decoder,) + tuple((k, cfg[k]) for k in fields if k in cfg)
    ids = self._batched(lambda bucket: self._jit(("caption", bucket, settings),
                                                 lambda: captioning.decode_fn(self.ctx, cfg)),
                        lambda fn, batch, rng: fn(self.params, batch, rng), self.features(images), seed)
    return self.tokenizer.decode(ids)

  # ------------------------------------------------------------------------------------------- text -> image

  def generate(self, texts: Sequence[str], steps: int | None = None, seed: int = 0, guidance: float | None = None,
               order: str | None = None, temperature: float | None = None, **options) -> list[Image.Image]:
    """Pictures (PIL RGB) of ``texts``: the bundled generator's, or, in a bundle without one, the preview
    decoder's (``generate_arrays``)."""
    _, pixels = self.generate_arrays(texts, steps=steps, seed=seed, guidance=guidance, order=order,
                                     temperature=temperature, **options)
    return [Image.fromarray(x) for x in pixels]

  def generate_arrays(self, texts: Sequence[str], steps: int | None = None, seed: int = 0,
                      guidance: float | None = None, order: str | None = None, temperature: float | None = None,
                      **options) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids int32 [N, 64], uint8 images [N, S, S, 3]) of ``texts``. The T2I decoder is the run's
    ``eval.generation`` one (mask-predict, 4 passes, by default) with ``steps`` (num_steps), ``guidance``,
    ``order`` (an image-token decoder of ``sampling.registry``), ``temperature`` and ``options`` (schedule,
    choice_temperature, readout) given. Batch ``i``'s key is split into the tokens' and the generator's noise's
    (``text_to_image.caption_to_pixels``); without a generator the tokens take the same key and the preview
    decoder draws them (``BundleError`` when the bundle has no preview patches either)."""
    if self.generator is None and self.bundle.preview_table is None:
      raise export.BundleError(f"{self.bundle.path} has neither a generator nor preview patches: it cannot draw "
                               "(export a run whose records hold images, or with --generator_dir)")
    settings = self.decoder_settings(steps=steps, guidance=guidance, order=order, temperature=temperature,
                                     **options)
    key = tuple(sorted(settings.items()))
    ids = self.tokenizer.encode(list(texts), max_len=self.config.model.max_len)
    inputs = {"text_ids": ids, "text_mask": (ids != self.tokenizer.pad_id).astype(np.int32),
              "boxes": np.broadcast_to(records.grid_boxes(), (len(ids), records.NUM_CELLS, 4))}
    if not len(ids):
      return np.zeros((0, records.NUM_CELLS), np.int32), np.zeros((0, 0, 0, 3), np.uint8)
    if self.generator is not None:
      return self._batched(
          lambda bucket: self._jit(("generate", bucket, key),
                                   lambda: jax.jit(text_to_image.caption_to_pixels(self.ctx, settings))),
          lambda fn, batch, rng: fn(self.params, self.generator, batch, rng), inputs, seed)
    cluster_ids = self._batched(
        lambda bucket: self._jit(("tokens", bucket, key), lambda: generation.decode_fn(self.ctx, settings)),
        lambda fn, batch, rng: fn(self.params, batch, jax.random.split(rng)[0]), inputs, seed)
    return cluster_ids, preview.render_preview(cluster_ids, self.bundle.preview_table)

  def decoder_settings(self, **given) -> dict[str, Any]:
    """The T2I decoder's ``text_to_image.DECODER_FIELDS``: the run's ``eval.generation`` decoder with the
    ``given`` ones that are not None (steps: num_steps); ``UserError`` for any other name."""
    given = {("num_steps" if k == "steps" else k): v for k, v in given.items() if v is not None}
    _check_options(given, text_to_image.DECODER_FIELDS, "the image-token decoder")
    settings = {**generation.decoder_settings(self.config.eval.generation)[""], **given}
    registry.image_decoder(settings["order"], flag="order")  # an unknown order: a ConfigError naming it
    return settings

  # ------------------------------------------------------------------------------------------------ batches

  def _jit(self, key: tuple, make: Callable[[], Callable]) -> Callable:
    if key not in self.jitted:
      self.jitted[key] = make()
    return self.jitted[key]

  @contextlib.contextmanager
  def _on_mesh(self) -> Iterator[None]:
    with jax.set_mesh(self.ctx.mesh), nn.logical_axis_rules(self.ctx.rules):
      yield

  def _batched(self, function_for: Callable[[int], Callable], call: Callable, inputs: dict[str, np.ndarray],
               seed: int) -> Any:
    """``call(function_for(bucket), batch, rng)`` over ``inputs`` (arrays [N, ...]) in batches of at most
    ``max_batch``, each padded to its bucket (``batching.pad_rows``); batch i's rng is ``fold_in(key(seed), i)``.
    Returns the outputs (an array or a tuple of arrays) of the N inputs, on the host."""
    n, outputs = len(next(iter(inputs.values()))), []
    with self._on_mesh():
      for i, start in enumerate(range(0, n, self.max_batch)):
        rows = {k: v[start:start + self.max_batch] for k, v in inputs.items()}
        count = len(next(iter(rows.values())))
        bucket = bucket_size(count, self.max_batch)
        batch = {k: batching.pad_rows(v, bucket) for k, v in rows.items()}
        out = call(function_for(bucket), batch, jax.random.fold_in(jax.random.key(seed), i))
        outputs.append(jax.tree.map(lambda x, c=count: np.asarray(x)[:c], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _check_options(options: dict[str, Any], fields: Sequence[str], what: str) -> None:
  unknown = sorted(set(options) - set(fields))
  if unknown:
    raise errors.UserError(f"{what} takes the settings {list(fields)}, not {unknown}")
