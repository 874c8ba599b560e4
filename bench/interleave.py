"""The numba decode call interleaved with torch and NumPy BLAS calls (`mosbits.perf.workloads.interleaved`):
what thread pools do to each other shows only here. Each ``track_`` method reports a median in milliseconds."""

from mosbits.perf import workloads


class Interleaved:
    """numba, 4096 x 4096, E = 4, M = 1, exact; medians of 40 calls, measured once per repeat."""

    unit = "ms"
    timeout = 300

    def setup(self):
        try:
            self.seconds = workloads.interleaved((4096, 4096), 4, repeats=40)
        except NotImplementedError as err:
            raise NotImplementedError(str(err)) from None

    def track_call_alone(self):
        return self.seconds["alone"] * 1e3

    def track_call_after_a_copy(self):
        return self.seconds["after a copy"] * 1e3

    def track_call_after_torch(self):
        if "after torch" not in self.seconds:
            raise NotImplementedError("torch not installed")
        return self.seconds["after torch"] * 1e3

    def track_call_after_numpy_blas(self):
        return self.seconds["after NumPy BLAS"] * 1e3

    def track_numpy_blas_after_call(self):
        return self.seconds["NumPy BLAS after mosbits"] * 1e3

    def track_numpy_blas_alone(self):
        return self.seconds["NumPy BLAS alone"] * 1e3
