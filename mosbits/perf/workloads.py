"""Workloads shared by the asv suite (bench/) and ``mosbits bench``: layers, inputs, dense baselines, the
correctness gate and the memory-bandwidth probe.

Every timed callable is built here once, so that asv and the CLI time exactly the same code. torch is imported
only by the functions that build torch workloads.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mosbits import arrays, dispatch, testing
from mosbits.experts import Experts
from mosbits.format import PackedSigns, padding_mask, row_bytes
from mosbits.io import MoSLinearWeights
from mosbits.perf.timing import median_time, synchronized

LLAMA_7B_SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008)}
"""LLaMA-7B's linear layers as N x K (out x in): q/k/v/o, gate/up, down."""

L3_FALLBACK_BYTES = 32 << 20
MAX_DRAM_LAYERS = 1024
NMSE_ROWS = 8
"""Rows of x over which `Workload.nmse` reports the error of fast rows (the gate checks every row)."""


def parse_shape(text: str) -> tuple[int, int]:
    """``"11008x4096"`` -> (N, K) = (11008, 4096)."""
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is 'NxK' (e.g. 4096x11008), got {text!r}") from None
    if n < 1 or k < 1:
        raise ValueError(f"shape {text!r}: N and K must be >= 1")
    return n, k


def half_dtype(library: str, device: str = "cpu") -> str:
    """The half type a backend on ``library`` prefers: bfloat16 for torch on CPU, float16 elsewhere."""
    return "bfloat16" if library == "torch" and device == "cpu" else "float16"


def half_library(backend: str) -> str:
    """The array library a backend's half-precision workloads use: torch where it takes torch tensors (whose
    CPU half type, bfloat16, is what CPU models run in), else its first library."""
    libraries = dispatch.spec(backend).libraries
    return "torch" if "torch" in libraries else libraries[0]


def random_layer(rng: np.random.Generator, n: int, k: int, e: int, library: str, dtype: str,
                 device: str = "cpu") -> MoSLinearWeights:
    """A layer with random signs (drawn as bytes, padding cleared: no latent weight is ever made),
    positive scales of a trained layer's magnitude and a N(0, 1/K) router."""
    data = rng.integers(0, 256, (n, row_bytes(k)), dtype=np.uint8) & ~padding_mask(k)
    s_in = rng.uniform(0.5, 1.5, (e, k)).astype(np.float32) * np.float32(0.02)
    s_out = rng.uniform(0.5, 1.5, (e, n)).astype(np.float32)
    router = (rng.standard_normal((e, k)) / np.sqrt(k)).astype(np.float32)
    return MoSLinearWeights(
        PackedSigns(arrays.from_numpy(data, library, None, device), (n, k)),
        Experts(arrays.from_numpy(s_in, library, dtype, device), arrays.from_numpy(s_out, library, dtype, device)),
        arrays.from_numpy(router, library, dtype, device),
    )


@functools.cache
def l3_bytes() -> int:
    """This machine's last-level cache in bytes, as Linux reports it (L3_FALLBACK_BYTES where it does not)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return L3_FALLBACK_BYTES


def layers_for(resident: str, n: int, k: int) -> int:
    """How many distinct layers a workload rotates through: 1 for ``"cache"``; for ``"dram"`` enough that
    their packed signs exceed twice the L3 (`l3_bytes`), so each call reads its layer from memory, but at most
    MAX_DRAM_LAYERS (layers under 1 MiB, far smaller than any LLM's, may stay partly cached)."""
    if resident == "cache":
        return 1
    if resident == "dram":
        return min(MAX_DRAM_LAYERS, max(2, -(-2 * l3_bytes() // (n * row_bytes(k)))))
    raise ValueError(f"resident must be 'cache' or 'dram', got {resident!r}")


@dataclasses.dataclass
class Workload:
    """One backend on one shape, batch and dtype: ``workload()`` runs one call, rotating through ``layers``.

    Calls go through prepared layers (`mosbits.prepare`), as a model runs them; a plain ``mosbits.matmul``
    adds its argument checks and backend choice, about 15-20 us per call at 4096 x 4096 here, and on numba the
    derivation of the kernel layout, about 0.25 ms (`mosbits.prepared`).

    Attributes:
        backend: backend name.
        layers: one or more layers of the same shape, on the backend's arrays.
        x: (M, K) activations, same library, device and dtype.
        precision: the ``precision=`` of every call.
    """

    backend: str
    layers: list[MoSLinearWeights]
    x: Any
    precision: str = "exact"
    _next: int = 0
    prepared: list[Any] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prepared = [layer.prepare(self.backend, self.precision) for layer in self.layers]

    def __call__(self) -> Any:
        layer = self.prepared[self._next]
        self._next = (self._next + 1) % len(self.layers)
        return layer(self.x)

    def prime(self) -> None:
        """One single-token call per layer, so that per-layer work done once (derived kernel layouts) is not
        timed."""
        for layer in self.prepared:
            layer(self.x[:1])

    def synchronized(self) -> Any:
        """One call that returns only when a CUDA device has finished it (for wall-clock timers like asv's)."""
        return synchronized(self)()

    @property
    def packed_bytes(self) -> int:
        """Bytes one call reads for its layer: signs, experts and router."""
        return self.layers[0].nbytes

    def gate(self) -> float:
        """The correctness gate over every row of the first and the last layer's output: the worst of max
        |y - ref| / tolerance and, for float32 exact paths, `testing.nmse_ratio` against float32 NumPy
        arithmetic on the same rows; <= 1 passes."""
        worst = 0.0
        out_dtype = arrays.dtype_name(self.x)
        product = dispatch.load(self.backend).product_dtype(out_dtype)
        for i in sorted({0, len(self.layers) - 1}):
            layer = self.layers[i]
            y = self.prepared[i](self.x)
            ref = testing.truth(self.x, layer.packed, layer.experts, layer.router)
            if self.precision == "fast":
                tol = testing.fast_tolerance(self.x, layer.experts, layer.router, None, ref, out_dtype=out_dtype)
            else:
                tol = testing.tolerance(self.x, layer.experts, layer.router, None, ref, out_dtype=out_dtype,
                                        product_dtype=product)
            worst = max(worst, testing.error_ratio(y, ref, tol))
            if self.precision == "exact" and out_dtype == product == "float32":
                baseline = testing.float32_nmse(self.x, layer.packed, layer.experts, layer.router)
                worst = max(worst, testing.nmse_ratio(y, ref, baseline))
        return worst

    def nmse(self) -> float:
        """`testing.nmse` of the first layer's output over the first NMSE_ROWS rows."""
        layer = self.layers[0]
        rows = self.x[:NMSE_ROWS]
        return testing.nmse(self.prepared[0](rows), testing.truth(rows, layer.packed, layer.experts, layer.router))


def make_workload(backend: str, shape: tuple[int, int], m: int, e: int, dtype: str, resident: str = "cache",
                  device: str = "cpu", seed: int = 0, precision: str = "exact") -> Workload:
    """A `Workload` on the backend's first array library.

    Raises:
        NotImplementedError: the backend is not installed or does not support this dtype, device or precision
            (asv reads this as "skip").
    """
    spec = dispatch.spec(backend)
    if not spec.is_installed():
        raise NotImplementedError(f"{backend} is not installed (pip install 'mosbits[{spec.extra}]')")
    if precision not in spec.precisions:
        raise NotImplementedError(f"{backend} has no precision={precision!r}")
    library = half_library(backend) if dtype == "bfloat16" or device != "cpu" else spec.libraries[0]
    if library == "numpy" and (dtype == "bfloat16" or device != "cpu"):
        raise NotImplementedError(f"{backend} takes NumPy arrays: no {dtype} on {device}")
    n, k = shape
    rng = np.random.default_rng(seed)
    layers = [random_layer(rng, n, k, e, library, dtype, device) for _ in range(layers_for(resident, n, k))]
    x = arrays.from_numpy(rng.standard_normal((m, k)).astype(np.float32), library, dtype, device)
    first = layers[0]
    ok, reason = dispatch.load(backend).supports(x, first.packed, first.experts, first.router, None)
    if not ok:
        raise NotImplementedError(f"{backend}: {reason}")
    return Workload(backend, layers, x, precision)


def dense_baselines(shape: tuple[int, int], m: int, device: str = "cpu", seed: int = 0,
                    include: tuple[str, ...] = ("numpy-fp32", "torch-fp32", "torch-bf16")
                    ) -> dict[str, Callable[[], Any]]:
    """Dense ``x @ W.T`` as a user without mosbits would run it, W (N, K) of +/-1 values.

    Returns:
        name -> callable, for the baselines in ``include`` whose library is installed: ``numpy-fp32``,
        ``torch-fp32``, ``torch-bf16`` (and ``torch-fp16`` on request).
    """
    n, k = shape
    rng = np.random.default_rng(seed)
    w = np.where(rng.random((n, k), dtype=np.float32) < 0.5, np.float32(-1), np.float32(1))
    x = rng.standard_normal((m, k)).astype(np.float32)
    out: dict[str, Callable[[], Any]] = {}
    if "numpy-fp32" in include:
        out["numpy-fp32"] = _matmul_closure(x, w.T)
    torch_names = [name for name in include if name.startswith("torch-")]
    if torch_names and dispatch.spec("torch").is_installed():
        import torch

        dtypes = {"torch-fp32": torch.float32, "torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}
        for name in torch_names:
            tw = torch.from_numpy(w).to(device=device, dtype=dtypes[name])
            tx = torch.from_numpy(x).to(device=device, dtype=dtypes[name])
            out[name] = _matmul_closure(tx, tw.T)
    return out


def _matmul_closure(a: Any, b: Any) -> Callable[[], Any]:
    def call() -> Any:
        return a @ b

    return call


def authors_formulation(shape: tuple[int, int], m: int, e: int, dtype: str = "float32", device: str = "cpu",
                        seed: int = 0) -> Callable[[], Any]:
    """The BinaryMoS authors' inference: sign() of the fp latent weight on every call, a dense matmul, the
    scales, all in torch in ``dtype`` with the softmax in float32 (PAPER.md).

    Raises:
        NotImplementedError: torch is not installed.
    """
    if not dispatch.spec("torch").is_installed():
        raise NotImplementedError("the authors' formulation needs torch (pip install 'mosbits[torch]')")
    import torch

    n, k = shape
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)

    def make(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=tdtype)

    w, x = make(n, k, scale=0.02), make(m, k)
    s_in, s_out, router = make(e, k, scale=0.02).abs(), make(e, n).abs(), make(e, k, scale=k ** -0.5)

    def call() -> torch.Tensor:
        gates = torch.softmax((x @ router.T).float(), dim=-1).to(tdtype)
        return ((x * (gates @ s_in)) @ torch.sign(w).T) * (gates @ s_out)

    return call


def read_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, repeats: int = 5) -> tuple[float, str]:
    """Measured memory read bandwidth in bytes/s, and how it was measured.

    Sums a float32 array of ``nbytes`` (8x the L3): on CUDA with CUDA events; on the CPU with torch's threads
    when torch is installed (as the kernels run), else NumPy's single thread.
    """
    if device.startswith("cuda"):
        import torch

        from mosbits.perf.timing import cuda_median_time

        a = torch.ones(nbytes // 4, device=device)
        return nbytes / cuda_median_time(a.sum, repeats), f"torch sum of {nbytes >> 20} MiB float32 on {device}"
    if dispatch.spec("torch").is_installed():
        import torch

        a = torch.ones(nbytes // 4)
        how = f"torch sum of {nbytes >> 20} MiB float32, {torch.get_num_threads()} threads"
        seconds = median_time(a.sum, repeats)
    else:
        a = np.ones(nbytes // 4, dtype=np.float32)
        how = f"numpy sum of {nbytes >> 20} MiB float32, 1 thread"
        seconds = median_time(a.sum, repeats)
    return nbytes / seconds, how


INTERLEAVE_CASES = ("alone", "after a copy", "after torch", "after NumPy BLAS")
"""Where the interleaved decode call is timed: back to back; right after a plain copy of as many bytes as the
dense bf16 weight (the cache baseline: any op that streams that much evicts the layer, pools or not); right after
a torch bfloat16 matmul of the same shape; right after NumPy's float32 ``x @ W.T`` (OpenBLAS)."""


def interleaved(shape: tuple[int, int] = (4096, 4096), e: int = 4, repeats: int = 40,
                seed: int = 0) -> dict[str, float]:
    """Median seconds of one numba decode call (M = 1, exact, prepared) in each of `INTERLEAVE_CASES`, and of
    the dense ops alone and right after the call (keys ``"torch alone"``, ``"torch after mosbits"``, ``"NumPy
    BLAS alone"``, ``"NumPy BLAS after mosbits"``). What thread pools do to each other after a call shows here,
    not in the isolated timings; torch's cases are left out when torch is not installed.

    Raises:
        NotImplementedError: numba is not installed.
    """
    if "numba" not in dispatch.available():
        raise NotImplementedError("the interleaved decode runs the numba backend: pip install 'mosbits[numba]'")
    n, k = shape
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, n, k, e, "numpy", "float32").prepare("numba")
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    source, target = np.ones(2 * n * k, np.uint8), np.empty(2 * n * k, np.uint8)
    ops: dict[str, Callable[[], Any]] = {"alone": lambda: None, "after a copy": lambda: np.copyto(target, source),
                                         "after NumPy BLAS": _matmul_closure(x, w.T)}
    dense = {"NumPy BLAS": ops["after NumPy BLAS"]}
    if "torch" in dispatch.available():
        import torch

        xt, wt = torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(w).to(torch.bfloat16)
        ops["after torch"] = dense["torch"] = _matmul_closure(xt, wt.T)

    def call() -> None:
        layer(x)

    for _ in range(10):
        for op in ops.values():
            op()
            call()
    result = {case: _median_after(ops[case], call, repeats) for case in INTERLEAVE_CASES if case in ops}
    for name, op in dense.items():
        result[f"{name} alone"] = _median_after(lambda: None, op, repeats)
        result[f"{name} after mosbits"] = _median_after(call, op, repeats)
    return result


def _median_after(before: Callable[[], Any], fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()``, each call timed alone right after an untimed ``before()``."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
