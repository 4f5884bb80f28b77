"""Shared timing for the benchmarks: steps/s as 1 / the median step time (robust to a shared CPU)."""

import time
from typing import Callable


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
