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


def result(*, ours: float, peer: float | None, unit: str, lower_is_better: bool = False) -> dict:
  """``{"ours", "peer", "ratio", "unit"}``; the ratio is > 1 when ours is better (ours / peer for rates,
  peer / ours with ``lower_is_better``, e.g. times); None without a peer."""
  ratio = None if peer is None else (peer / ours if lower_is_better else ours / peer)
  return {"ours": ours, "peer": peer, "ratio": ratio, "unit": unit}


def write_result(path: str | None, *, ours: float, peer: float | None, unit: str, lower_is_better: bool = False,
                 **extra) -> None:
  """Writes ``result(...)`` and ``extra`` fields (e.g. more ``result``s) as JSON to ``path``, atomically (run_all
  reads it); nothing without a path."""
  if path:
    from bigen_jax import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_json_atomic(path, {**result(ours=ours, peer=peer, unit=unit, lower_is_better=lower_is_better),
                                    **extra})
