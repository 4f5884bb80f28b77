"""Shared timing for the benchmarks: steps/s as 1 / the median step time (robust to a shared CPU)."""

import os
import time
from typing import Callable


def limit_threads(threads: int | None) -> int:
  """Gives XLA (before JAX starts) and PyTorch the same number of CPU threads (default: all cores)."""
  threads = threads or os.cpu_count()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                             f"intra_op_parallelism_threads={threads}").strip()
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
