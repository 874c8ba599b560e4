"""Wall-clock timing shared by the command-line tools (``mosbits demo``, and the benchmarks)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of one call of ``fn()``.

    Calls ``fn`` ``warmup`` times untimed (JIT compilation, caches, allocator), then ``repeats`` times, each
    timed alone with `time.perf_counter`. ``fn`` must have finished its work when it returns: for an
    asynchronous device (CUDA) it must synchronise before returning.

    Raises:
        ValueError: repeats < 1 or warmup < 0.
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"median_time: warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
