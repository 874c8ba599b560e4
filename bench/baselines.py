"""What a user without mosbits runs, on the same shapes and batches as matmul.py."""

from mosbits.perf import workloads
from mosbits.perf.timing import synchronized

from .matmul import DEVICE

SHAPES = list(workloads.LLAMA_7B_SHAPES)


class Dense:
    """Dense x @ W.T: NumPy fp32 (CPU only), torch fp32, bf16 and fp16 on DEVICE (the fp32 weight is 64 MiB to
    172 MiB, beyond the L3)."""

    params = (["numpy-fp32", "torch-fp32", "torch-bf16", "torch-fp16"], [1, 16, 512], SHAPES)
    param_names = ["baseline", "M", "shape"]
    timeout = 300

    def setup(self, baseline, m, shape):
        if baseline == "numpy-fp32" and DEVICE != "cpu":
            raise NotImplementedError("NumPy runs on the CPU only")
        fns = workloads.dense_baselines(workloads.LLAMA_7B_SHAPES[shape], m, DEVICE, include=(baseline,))
        if baseline not in fns:
            raise NotImplementedError(f"{baseline}: library not installed")
        self.fn = synchronized(fns[baseline])
        self.fn()

    def time_dense(self, *params):
        self.fn()


class Authors:
    """The BinaryMoS authors' inference: sign() of the fp latent weight every call, dense matmul, scales."""

    params = ([1, 16, 512], SHAPES, [1, 4], ["float32", "bfloat16"])
    param_names = ["M", "shape", "E", "dtype"]
    timeout = 300

    def setup(self, m, shape, e, dtype):
        self.fn = synchronized(workloads.authors_formulation(workloads.LLAMA_7B_SHAPES[shape], m, e, dtype,
                                                                DEVICE))
        self.fn()

    def time_authors(self, *params):
        self.fn()


class DensePeakMemory:
    """Peak RSS of a dense fp32 torch matmul, to set beside matmul.PeakMemory."""

    params = ([1, 512], SHAPES)
    param_names = ["M", "shape"]
    timeout = 300

    def setup(self, m, shape):
        fns = workloads.dense_baselines(workloads.LLAMA_7B_SHAPES[shape], m, DEVICE, include=("torch-fp32",))
        if not fns:
            raise NotImplementedError("torch not installed")
        self.fn = synchronized(fns["torch-fp32"])

    def peakmem_dense(self, *params):
        self.fn()
