"""Wall-clock timing shared by the command-line tools (``mosbits demo``, and the benchmarks)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from mosbits import arrays


def synchronized(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``, made to return only when a CUDA device has finished its result (for wall-clock timers: ours on
    CUDA tensors in the demo, asv's); a result that is not a CUDA tensor returns at once."""

    def call() -> Any:
        out = fn()
        if arrays.device_of(out).startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return out

    return call


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, budget: float | None = None,
                warmup_time: float = 0.0) -> float:
    """Median wall-clock seconds of one call of ``fn()``.

    Calls ``fn`` ``warmup`` times untimed (JIT compilation, caches, allocator), and then on until
    ``warmup_time`` seconds have passed (so that another library's thread pool, still spinning after its last
    call, has gone to sleep), then ``repeats`` times, each timed alone with `time.perf_counter`. With a
    ``budget`` in seconds, fewer repeats (but at least 3) are made when ``repeats`` calls would take longer.
    ``fn`` must have finished its work when it returns: on an asynchronous device (CUDA) it must synchronise.

    Raises:
        ValueError: repeats < 1 or warmup < 0.
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"median_time: warmup must be >= 0, got {warmup}")
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    while time.perf_counter() - start < warmup_time:
        fn()
    times: list[float] = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if budget is not None and len(times) >= 3 and sum(times) >= budget:
            break
    return statistics.median(times)


def cuda_median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, flush_bytes: int = 256 << 20) -> float:
    """Median seconds of ``fn()`` on the current CUDA device, timed with CUDA events.

    Before each timed call a ``flush_bytes`` buffer is zeroed (outside the timed events) so that weights do not
    sit in the GPU's L2 (50 MiB on an H100) from the previous call, as they would not in a model.
    """
    import torch

    if repeats < 1:
        raise ValueError(f"cuda_median_time: repeats must be >= 1, got {repeats}")
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        times.append(_event_seconds(fn))
    return statistics.median(times)


def _event_seconds(fn: Callable[[], object]) -> float:
    """Seconds the current CUDA device spends on the work ``fn()`` enqueues, between two CUDA events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_graph_time(fn: Callable[[], object], repeats: int, calls: int = 16, flush_bytes: int = 256 << 20) -> float:
    """Median seconds of one ``fn()`` with no host work in it, on the current CUDA device.

    ``calls`` pairs of (zero a ``flush_bytes`` buffer, ``fn()``) are captured in one CUDA graph and ``calls``
    flushes alone in another; a call's time is the difference of the two replays' CUDA-event times divided by
    ``calls`` (median of ``repeats`` such pairs). So every call starts with the weights out of the L2, as in
    `cuda_median_time`, but the host's Python and launch work, which that eager timing counts whenever it outlasts
    the flush, is gone: what a model served through CUDA graphs spends per call. ``fn`` runs three times on a side
    stream before capture (autotuning, compilation) and must be capturable (no host synchronisation).

    Raises:
        ValueError: repeats < 1 or calls < 1.
    """
    import torch

    if repeats < 1 or calls < 1:
        raise ValueError(f"cuda_graph_time: repeats and calls must be >= 1, got {repeats} and {calls}")
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(with_fn: bool) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        return graph

    with_fn, flushes = capture(True), capture(False)
    with_fn.replay()
    flushes.replay()
    return statistics.median((_event_seconds(with_fn.replay) - _event_seconds(flushes.replay)) / calls
                             for _ in range(repeats))
