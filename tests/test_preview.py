"""The preview decoder: each cluster's patch is the pixels of the training cell nearest to its centroid."""

import io

import numpy as np
from PIL import Image
import pytest

from bigen_jax.data import records
from bigen_jax.sampling import preview
from conftest import write_records


def test_patch_table_is_the_nearest_cell_of_each_cluster(tmp_path):
  d = str(tmp_path / "records")
  write_records(d, splits={"train": 23}, images=True, clusters=5, dim=8)
  batch = next(records.read_split(d, "train", fields=("dense", "image")))
  feats = batch["dense"].astype(np.float32).reshape(-1, 8)
  codebook = feats[[0, 70, 140, 300, 600]] + 0.01  # centroids near five cells
  pixels = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in batch["image"]])
  cells = pixels.reshape(-1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 4, 4, 3)
  dist = ((feats[:, None] - codebook[None]) ** 2).sum(-1)
  nearest_centroid = dist.argmin(1)
  table = preview.build_patch_table(d, codebook, patch=4)
  for k in range(len(codebook)):
    mine = np.flatnonzero(nearest_centroid == k)
    np.testing.assert_array_equal(table[k], cells[mine[dist[mine, k].argmin()]])
  ids = nearest_centroid.reshape(-1, 64)[:3]
  images = preview.render_preview(ids, table)
  assert images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(images[1, 4:8, 8:12], table[ids[1, 1 * 8 + 2]])  # row 1, column 2


def test_records_without_images_are_refused(records_dir):
  with pytest.raises(records.DataError, match="no images"):
    preview.build_patch_table(records_dir, np.zeros((3, 8), np.float32))
