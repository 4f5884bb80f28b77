"""Batch padding (``data.batching.pad_rows``): copies of the first row, or a fill value; shapes fixed."""

import numpy as np

from bigen_jax.data import batching


def test_pad_rows():
  x = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(batching.pad_rows(x, 4), [[0, 1, 2], [3, 4, 5], [0, 1, 2], [0, 1, 2]])
  np.testing.assert_array_equal(batching.pad_rows(x, 3, fill=-1), [[0, 1, 2], [3, 4, 5], [-1, -1, -1]])
  assert batching.pad_rows(x, 2) is x
  empty = batching.pad_rows(np.zeros((0, 3), np.uint8), 2)
  assert empty.shape == (2, 3) and empty.dtype == np.uint8 and not empty.any()
  text = batching.pad_rows(np.array([b"a"], object), 2, fill=b"")
  assert text.tolist() == [b"a", b""]
