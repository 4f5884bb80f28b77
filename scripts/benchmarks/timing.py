"""Shared timing for the benchmarks: steps/s as 1 / the median step time (robust to a shared CPU)."""

import os
import time
from typing import Callable


def limit_threads(threads: int | None) -> int:
  """Pins this process (before JAX starts) to its first ``threads`` CPU cores and gives PyTorch as many threads:
  both frameworks then run on the same cores (default: all of them). XLA has no thread-count flag on CPU; it
  sizes its pool from the cores this process may use."""
  available = sorted(os.sched_getaffinity(0))
  threads = min(threads or len(available), len(available))
  os.sched_setaffinity(0, available[:threads])
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  return threads


def steps_per_second(step: Callable[[], None], *, steps: int, warmup: int) -> float:
  """Runs ``warmup`` untimed calls (compilation, allocation), then ``steps`` timed ones; ``step`` must block
  until its work is done."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return 1.0 / sorted(times)[len(times) // 2]
