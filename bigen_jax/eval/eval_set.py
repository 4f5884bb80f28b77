"""The examples a generation evaluator scores, held whole on every process, and how they meet the mesh.

Corpus metrics (CIDEr-D's document frequencies, FID's statistics) need every example at once, so each
process reads the same first ``num_examples`` records of the split; decoding runs sharded over the mesh
(``to_global``) and its outputs come back whole to every process (``gather``).

Real images (stored at any size and aspect ratio, e.g. COCO's short side 256) all go through one
preprocessing, ``square_image``: decoded by ``bigen_jax.data.images.decode_image``, then the *whole* image
resized to a fixed square with PIL's bicubic filter (antialiased when shrinking). The aspect ratio is not
kept and nothing is cropped, as in pytorch-fid's resize to 299x299 and as the 8x8 grid of the features, whose
cells cover the whole image: a drawing of an image's tokens shows the whole image, squeezed into a square.
"""

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from bigen_jax.data import images as images_lib
from bigen_jax.data import input_pipeline
from bigen_jax.data import records

FIELDS = ("index", "image_id", "text_ids", "text_mask", "dense", "boxes", "cluster_ids", "caption_ids")


def square_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: the whole image resized with PIL's bicubic filter (antialiased
  when shrinking; aspect ratio not kept, nothing cropped; see the module docstring). Unchanged if already so."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def load(config, *, split: str, num_examples: int = 0, image_size: int = 0) -> dict[str, Any]:
  """The first ``num_examples`` (0: all) records of ``split``: numpy arrays of ``FIELDS`` plus
  ``references`` (list of lists of caption strings) and, with ``image_size`` > 0, ``images`` uint8
  [N, image_size, image_size, 3]: every stored image through ``decode_image`` and ``square_image``."""
  it = input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split=split, global_batch_size=64, seed=config.seed,
      vocab_dir=config.data.vocab_dir, train=False, with_images=image_size > 0, process_index=0,
      process_count=1, shuffle_buffer=1)
  parts = []
  for batch in it:
    keep = batch["valid"]
    parts.append({k: v[keep] for k, v in batch.items()})
    if num_examples and sum(len(p["index"]) for p in parts) >= num_examples:
      break
  if not parts:
    raise records.DataError(f"split {split!r} of {config.data.records_dir} has no examples to evaluate")
  data = {k: np.concatenate([p[k] for p in parts])[:num_examples or None] for k in parts[0]}
  out = {k: data[k] for k in FIELDS if k in data}
  out["references"] = [[c.decode("utf-8") for c in row if c] for row in data["captions"]]
  if image_size > 0:
    out["images"] = np.stack([
        square_image(images_lib.decode_image(b, name=f"the image of record {i} of split {split!r}"), image_size)
        for i, b in zip(data["index"], data["image"])])
  return out


def map_batches(ctx, fn, data: dict[str, Any], fields: tuple[str, ...], batch_size: int) -> np.ndarray:
  """``fn(batch, i)`` over the eval set in batches of ``batch_size`` (sharded like training batches; the
  last one padded), results concatenated whole on every process and cut to the eval set's length."""
  num = len(data["index"])
  outputs = []
  for i, start in enumerate(range(0, num, batch_size)):
    part = slice(start, min(start + batch_size, num))
    batch = _to_global(ctx, {k: data[k][part] for k in fields}, batch_size)
    outputs.append(_gather(fn(batch, i), part.stop - part.start))
  return np.concatenate(outputs)


def _to_global(ctx, arrays: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
  """Whole host arrays (the same on every process) of one batch -> global arrays sharded like training
  batches; a short batch is padded with copies of its first row to ``batch_size`` (drop them after)."""
  sharding = ctx.batch_sharding()

  def place(x):
    x = np.asarray(x)
    if len(x) < batch_size:
      x = np.concatenate([x, np.repeat(x[:1], batch_size - len(x), axis=0)])
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {k: place(v) for k, v in arrays.items()}


def _gather(x: jax.Array, num: int) -> np.ndarray:
  """A global array -> the same numpy array on every process, its first ``num`` rows."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))[:num]
