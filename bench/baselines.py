"""What a user without mosbits runs, on the same shapes and batches as matmul.py."""

from mosbits import benchmarking

SHAPES = list(benchmarking.LLAMA_7B_SHAPES)


class Dense:
    """Dense x @ W.T: NumPy fp32, torch fp32 and bf16 (the weight is fp32: 64 MiB to 172 MiB, beyond the L3)."""

    params = (["numpy-fp32", "torch-fp32", "torch-bf16"], [1, 16, 512], SHAPES)
    param_names = ["baseline", "M", "shape"]
    timeout = 300

    def setup(self, baseline, m, shape):
        fns = benchmarking.dense_baselines(benchmarking.LLAMA_7B_SHAPES[shape], m, include=(baseline,))
        if baseline not in fns:
            raise NotImplementedError(f"{baseline}: library not installed")
        self.fn = fns[baseline]
        self.fn()

    def time_dense(self, *params):
        self.fn()


class Authors:
    """The BinaryMoS authors' inference: sign() of the fp latent weight every call, dense matmul, scales."""

    params = ([1, 16, 512], SHAPES, [1, 4], ["float32", "bfloat16"])
    param_names = ["M", "shape", "E", "dtype"]
    timeout = 300

    def setup(self, m, shape, e, dtype):
        self.fn = benchmarking.authors_formulation(benchmarking.LLAMA_7B_SHAPES[shape], m, e, dtype)
        self.fn()

    def time_authors(self, *params):
        self.fn()


class DensePeakMemory:
    """Peak RSS of a dense fp32 torch matmul, to set beside matmul.PeakMemory."""

    params = ([1, 512], SHAPES)
    param_names = ["M", "shape"]
    timeout = 300

    def setup(self, m, shape):
        fns = benchmarking.dense_baselines(benchmarking.LLAMA_7B_SHAPES[shape], m, include=("torch-fp32",))
        if not fns:
            raise NotImplementedError("torch not installed")
        self.fn = fns["torch-fp32"]

    def peakmem_dense(self, *params):
        self.fn()
