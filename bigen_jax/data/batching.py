"""Batch padding: the one way a short batch is filled up to a fixed number of rows, so that a jitted function
sees one shape (and compiles once) and every process feeds the same number of rows."""

from typing import Any

import numpy as np


def pad_rows(x: np.ndarray, rows: int, *, fill: Any = None) -> np.ndarray:
  """``x`` [n <= rows, ...] padded to ``rows`` along axis 0: with the value ``fill``, or without it with copies
  of its first row (zeros when it has none: always a valid input). Returned unchanged when n == rows."""
  x = np.asarray(x)
  short = rows - len(x)
  if short == 0:
    return x
  if fill is not None:
    pad = np.full((short, *x.shape[1:]), fill, dtype=x.dtype)
  elif len(x):
    pad = np.repeat(x[:1], short, axis=0)
  else:
    pad = np.zeros((short, *x.shape[1:]), x.dtype)
  return np.concatenate([x, pad])
