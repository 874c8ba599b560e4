"""mosbits.matmul per backend on LLaMA-7B shapes: time, residency and peak memory. Baselines: baselines.py."""

import os

from mosbits import dispatch
from mosbits.perf import workloads

BACKENDS = [name for name in dispatch.BACKENDS if name != "reference"]
SHAPES = list(workloads.LLAMA_7B_SHAPES)
DEVICE = os.environ.get("MOSBITS_BENCH_DEVICE", "cpu")
"""Torch workloads run here; on a GPU machine: MOSBITS_BENCH_DEVICE=cuda asv run ..."""


def workload(backend, shape, m, e, dtype, resident="cache", precision="exact"):
    """A gated, primed workload; ``dtype`` "half" is the backend's preferred half type. Raises
    NotImplementedError (asv: skip) when the backend cannot run here, AssertionError when its output is
    wrong."""
    if dtype == "half":
        dtype = workloads.half_dtype(workloads.half_library(backend), DEVICE)
    work = workloads.make_workload(backend, workloads.LLAMA_7B_SHAPES[shape], m, e, dtype, resident, DEVICE,
                                      precision=precision)
    ratio = work.gate()
    assert ratio <= 1, f"{backend} is wrong: max |y - ref| / tolerance = {ratio:.3g}; not timed"
    work.prime()
    return work


class Matmul:
    """One call on a cache-resident layer, fp32 and the backend's half type, E = 1 (OneBit) and 4."""

    params = (BACKENDS, [1, 16, 512], SHAPES, [1, 4], ["float32", "half"])
    param_names = ["backend", "M", "shape", "E", "dtype"]
    timeout = 300

    def setup(self, backend, m, shape, e, dtype):
        self.work = workload(backend, shape, m, e, dtype)

    def time_matmul(self, *params):
        self.work.synchronized()


class Decode:
    """Decode-size batches with the layer in cache (one layer reused) or in DRAM (rotating through layers
    whose packed signs exceed twice the L3), E = 4, fp32, each precision the backend has."""

    params = (BACKENDS, [1, 16], SHAPES, ["cache", "dram"], ["exact", "fast"])
    param_names = ["backend", "M", "shape", "resident", "precision"]
    timeout = 300

    def setup(self, backend, m, shape, resident, precision):
        self.work = workload(backend, shape, m, 4, "float32", resident, precision)

    def time_decode(self, *params):
        self.work.synchronized()


class PeakMemory:
    """Peak RSS of a packed matmul (compare with baselines.DensePeakMemory): the packed path never holds the
    dense weight. Ungated: peak memory is not a speed, and the float64 gate would dominate the peak."""

    params = (BACKENDS, [1, 512], SHAPES)
    param_names = ["backend", "M", "shape"]
    timeout = 300

    def setup(self, backend, m, shape):
        self.work = workloads.make_workload(backend, workloads.LLAMA_7B_SHAPES[shape], m, 4, "float32",
                                               device=DEVICE)

    def peakmem_matmul(self, *params):
        self.work.synchronized()
