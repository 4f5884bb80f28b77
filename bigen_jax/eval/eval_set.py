"""The examples a generation evaluator scores, each process holding its share, and how they meet the mesh.

Each process reads only its contiguous share of the first ``num_examples`` records of the split (the input
pipeline's "files" sharding: about N / P records, from its files only), sorted by record index, so the shares
in process order are the eval set in index order. Decoding runs sharded over the mesh with each process feeding
its own rows (``map_batches``: the batch size is per device, the global batch that x the data-parallel devices);
its outputs stay on the devices until the last batch, then each process fetches its own rows once. Corpus
metrics (CIDEr-D's document frequencies, FID's statistics, the Java scorers) need every example at once: the
evaluators ``gather`` the per-example outputs, process 0 computes the metrics, and ``broadcast_json`` gives every
process its results.

Real images (stored at any size and aspect ratio, e.g. COCO's short side 256) all go through one
preprocessing, ``square_image``: decoded by ``bigen_jax.data.images.decode_image``, then the *whole* image
resized to a fixed square with PIL's bicubic filter (antialiased when shrinking). The aspect ratio is not
kept and nothing is cropped, as in pytorch-fid's resize to 299x299 and as the 8x8 grid of the features, whose
cells cover the whole image: a drawing of an image's tokens shows the whole image, squeezed into a square.
"""

import json
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from bigen_jax.data import batching
from bigen_jax.data import images as images_lib
from bigen_jax.data import input_pipeline
from bigen_jax.data import records

FIELDS = ("index", "image_id", "text_ids", "text_mask", "dense", "boxes", "cluster_ids", "caption_ids")
READ_BATCH = 64  # records per process per read batch


def square_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: the whole image resized with PIL's bicubic filter (antialiased
  when shrinking; aspect ratio not kept, nothing cropped; see the module docstring). Unchanged if already so."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def global_batch_size(ctx, per_device: int) -> int:
  """``per_device`` x the data-parallel devices of ``ctx.mesh`` (data x fsdp): an eval batch in the config is
  per device, so one setting serves any pod."""
  return per_device * ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]


def load(config, *, split: str, num_examples: int = 0, image_size: int = 0) -> dict[str, Any]:
  """This process's share of the first ``num_examples`` (0: all) records of ``split``, sorted by index: numpy
  arrays of ``FIELDS`` [n, ...], ``references`` (n lists of caption strings), with ``image_size`` > 0
  ``images`` uint8 [n, image_size, image_size, 3] (every stored image through ``decode_image`` and
  ``square_image``), and ``counts``, the share sizes of all processes (``gather``'s argument)."""
  it = input_pipeline.create_iterator(
      records_dir=config.data.records_dir, split=split, global_batch_size=READ_BATCH * jax.process_count(),
      seed=config.seed, vocab_dir=config.data.vocab_dir, train=False, with_images=image_size > 0,
      shuffle_buffer=1, sharding="files", num_examples=num_examples)
  if it.num_records == 0:
    raise records.DataError(f"split {split!r} of {config.data.records_dir} has no examples to evaluate")
  parts = [{k: v[batch["valid"]] for k, v in batch.items()} for batch in it]
  data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(data["index"], kind="stable")
  out = {k: data[k][order] for k in FIELDS if k in data}
  out["references"] = [[c.decode("utf-8") for c in row if c] for row in data["captions"][order]]
  if image_size > 0:
    out["images"] = np.stack([
        square_image(images_lib.decode_image(b, name=f"the image of record {i} of split {split!r}"), image_size)
        for i, b in zip(out["index"], data["image"][order])]).reshape(-1, image_size, image_size, 3)
  count = jax.process_count()
  out["counts"] = [hi - lo for lo, hi in (input_pipeline.process_range(it.num_records, count, p)
                                          for p in range(count))]
  return out


def map_batches(ctx, fn: Callable[[dict[str, jax.Array], int], jax.Array], data: dict[str, Any],
                fields: tuple[str, ...], batch_size: int) -> np.ndarray:
  """``fn(batch, i)`` over this process's share in global batches of ``batch_size`` (every process feeds its
  rows; the shortest shares padded; every process runs the same number of batches), ``fn``'s outputs sharded
  like the batch. Returns this process's rows of the outputs, in its share's order: fetched once, after the
  last batch (no host sync per batch)."""
  local = batch_size // jax.process_count()
  num = len(data["index"])
  outputs = []
  for i in range(-(-max(data["counts"]) // local)):
    rows = {k: batching.pad_rows(data[k][i * local:(i + 1) * local], local) for k in fields}
    outputs.append(own_rows(fn(ctx.batch_to_global(rows, fields), i)))
  fetched = jax.device_get(outputs)
  return np.concatenate([np.concatenate(parts) for parts in fetched])[:num]


def own_rows(x: jax.Array) -> list[jax.Array]:
  """This process's rows of a batch-sharded global array, as device arrays in global row order (the order in
  which ``make_array_from_process_local_data`` placed them); replicas of a row block counted once."""
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return [blocks[start] for start in sorted(blocks)]


def gather(arrays: dict[str, np.ndarray], counts: list[int]) -> dict[str, np.ndarray]:
  """Per-example arrays of every process's share [counts[p], ...] -> the whole eval set's [sum(counts), ...]
  on every process, in process order. Through ``process_allgather``: 64-bit values travel as 32-bit ones."""
  if jax.process_count() == 1:
    return dict(arrays)
  most = max(counts)
  padded = {k: batching.pad_rows(_32_bits(np.asarray(v)), most) for k, v in arrays.items()}
  stacked = multihost_utils.process_allgather(padded)
  return {k: np.concatenate([np.asarray(v)[p, :n] for p, n in enumerate(counts)]) for k, v in stacked.items()}


def _32_bits(x: np.ndarray) -> np.ndarray:
  """``x`` in the 32-bit type of its kind (what JAX moves between processes)."""
  return x.astype({"f": np.float32, "i": np.int32, "u": np.uint32}[x.dtype.kind]) if x.dtype.itemsize == 8 else x


def gather_json(items: list[Any]) -> list[Any]:
  """A list of JSON values per process -> their concatenation in process order, on every process."""
  if jax.process_count() == 1:
    return list(items)
  data = np.frombuffer(json.dumps(items).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
  stacked = np.asarray(multihost_utils.process_allgather(batching.pad_rows(data, int(sizes.max()))))
  return [item for p, n in enumerate(sizes) for item in json.loads(stacked[p, :n].tobytes().decode())]


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON value, on every process (the others pass anything, e.g. None)."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(0 if data is None else len(data), np.int32)))
  data = multihost_utils.broadcast_one_to_all(np.zeros(size, np.uint8) if data is None else data)
  return json.loads(np.asarray(data).tobytes().decode())
