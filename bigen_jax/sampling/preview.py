"""Cluster ids -> pixels without an image generator: a clearly approximate *preview* decoder.

Until the SPADE generator (roadmap issue 6) is trained, a grid of cluster ids is drawn by pasting, for each
cell, the pixels of the training cell whose feature lies nearest to that cluster's centroid (its medoid-like
representative). The result shows what the tokens encode (shape, colour, position) with visible seams; it is
called ``preview`` everywhere so nobody mistakes it for the paper's generator.
"""

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

from bigen_jax import fileio
from bigen_jax.data import images
from bigen_jax.data import records
from bigen_jax.data import vocab as vocab_lib

PATCHES_NAME = "preview_patches.npy"


def _cells(image_png: bytes, patch: int, grid: int) -> np.ndarray:
  """An encoded image -> its grid cells uint8 [grid*grid, patch, patch, 3] (row-major, like the boxes)."""
  size = patch * grid
  image = np.asarray(Image.fromarray(images.decode_image(image_png)).resize((size, size), Image.BILINEAR))
  return image.reshape(grid, patch, grid, patch, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, patch,
                                                                                      patch, 3)


def build_patch_table(records_dir: str, codebook: np.ndarray, *, split: str = "train", patch: int = 16
                      ) -> np.ndarray:
  """For each cluster, the pixels of the ``split`` cell nearest to its centroid: uint8 [K, patch, patch, 3].

  Needs records written with images (``--store_images``). Clusters no cell is nearest to get the mean
  colour of all cells.
  """
  if not records.read_manifest(records_dir).get("store_images"):
    raise records.DataError(f"{records_dir}/{records.MANIFEST_NAME}: the records hold no images "
                            "(extract them with --store_images) so no preview patches can be cut")
  k, dim = codebook.shape
  best = np.full(k, np.inf)
  table = np.zeros((k, patch, patch, 3), np.uint8)
  colour_sum, num_cells = np.zeros(3), 0
  for batch in records.read_split(records_dir, split, batch_size=128, fields=("dense", "image")):
    ids, dist = vocab_lib.assign(batch["dense"].astype(np.float32).reshape(-1, dim), codebook)
    cells = np.concatenate([_cells(png, patch, records.GRID) for png in batch["image"]])
    by_cluster = np.lexsort((dist, ids))  # cells sorted by cluster, nearest first
    nearest = by_cluster[np.r_[True, ids[by_cluster][1:] != ids[by_cluster][:-1]]]
    nearest = nearest[dist[nearest] < best[ids[nearest]]]
    table[ids[nearest]], best[ids[nearest]] = cells[nearest], dist[nearest]
    colour_sum += cells.reshape(-1, 3).sum(0) / (patch * patch)
    num_cells += len(cells)
  unused = ~np.isfinite(best)
  if unused.any():
    logging.warning("preview: %d of %d clusters are nobody's nearest centroid; drawn in the mean colour",
                    int(unused.sum()), k)
    table[unused] = np.round(colour_sum / max(num_cells, 1)).astype(np.uint8)
  return table


def load_or_build_patch_table(vocab: vocab_lib.Vocab, records_dir: str, *, patch: int = 16) -> np.ndarray:
  """The patch table cached in the vocabulary directory (built on first use)."""
  path = fileio.join(vocab.dir, PATCHES_NAME)
  if epath.Path(path).exists():
    table = vocab_lib.load_npy(path)
    if table.shape == (vocab.k, patch, patch, 3):
      return table
  table = build_patch_table(records_dir, vocab.codebook, patch=patch)
  vocab_lib.save_npy(path, table)
  return table


def render_preview(cluster_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
  """cluster ids [B, grid*grid] -> preview images uint8 [B, grid*patch, grid*patch, 3]."""
  ids = np.asarray(cluster_ids)
  batch, cells = ids.shape
  grid, patch = int(round(cells ** 0.5)), table.shape[1]
  tiles = table[ids].reshape(batch, grid, grid, patch, patch, 3)
  return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * patch, grid * patch, 3)
