"""The Numba CPU backend: lookup-table kernels, exact (float32) and fast (int8).

For each group of 4 inputs a token's 16 signed partial sums form a float32 table, and a SIMD permute looks the
table up with the 4 sign bits of one weight row per lane: 64 weights per instruction with AVX-512, 32 with
AVX2 (see _simd.py), scalar lookups elsewhere. Everything runs in float32 (the gates, the scales, the tables and
the sums); results are within the reference tolerance and exact on dyadic inputs.

``precision="fast"`` (`matmul_fast`) rounds the tables to int8 and looks them up with ``pshufb``, one row per
byte lane: 256 weights per instruction with AVX-512BW, 128 with AVX2; its error bound is in
`mosbits.precision`.

The "gemm" path unpacks B in bounded tiles for a BLAS-class matmul instead, on CPUs without AVX2 from GEMM_MIN_M
tokens on and for bfloat16 torch inputs from BF16_GEMM_MIN_M tokens on: float32 tiles for NumPy's BLAS, or,
for bfloat16 torch inputs, bfloat16 tiles for torch's matmul (AMX or AVX512-BF16 where the CPU has them), with
x * s_in rounded to bfloat16 as a dense bfloat16 matmul rounds its input.
The instruction set is detected at run time; ``MOSBITS_NUMBA_ISA=avx512|avx2|portable`` and
``MOSBITS_NUMBA_PATH=lookup|gemm`` (or `forced`) force one, and a forced set the CPU lacks is refused, never
emulated. Kernels compile on first use and are kept in Numba's disk cache. Threads: ``numba.set_num_threads``.
NumPy arrays and CPU torch tensors are accepted; the backend is not differentiable, so it declines tensors that
require grad (``backend="auto"`` then uses the torch backend).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib.util
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from llvmlite import binding

from mosbits import arrays, threads
from mosbits.backends.numba import _kernels, layout
from mosbits.format import row_bytes


def share_openmp_runtime() -> str:
    """Make numba's OpenMP layer and torch use one GNU OpenMP runtime (one pool of threads, not two that spin
    at each other); returns what was done. Runs before numba starts its threads, at this module's import.

    numba's OpenMP layer asks for the system's ``libgomp.so.1.0.0`` by file name, torch for its own bundled
    ``libgomp.so.1``; but symbols resolve in load order through the global scope, so whichever runtime is loaded
    globally first serves both. When torch is imported first that is torch's already. When it is installed but
    not imported yet, its libgomp is loaded globally here (without importing torch), so that numba binds to it
    now and torch, when it loads, finds it by soname. Nothing is done when numba's threads run already, when
    NUMBA_THREADING_LAYER picks another layer, or when torch is not installed.
    """
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return "numba's threads were running already"
    if os.environ.get("NUMBA_THREADING_LAYER", "omp") not in ("omp", "default", "safe", "threadsafe"):
        return f"NUMBA_THREADING_LAYER={os.environ['NUMBA_THREADING_LAYER']}"
    if "torch" in sys.modules:
        return "torch was loaded first: numba binds to its libgomp"
    spec = importlib.util.find_spec("torch")
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "lib", "libgomp*.so*"))) if spec else []
    if not found:
        return "torch is not installed (numba uses the system's libgomp)"
    ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
    return f"loaded torch's {os.path.basename(found[0])} before numba's threads started"


def threading_info() -> dict[str, Any]:
    """How the thread pools that meet in a mosbits process are set up (shown by ``mosbits bench``).

    Returns:
        ``numba_layer`` and ``numba_threads``; ``openmp``: the libgomp files loaded and ``openmp_in_use``, the one
        that serves ``GOMP_parallel`` calls (numba's and torch's); ``shared_runtime``: what
        `share_openmp_runtime` did; ``defaults``: what `mosbits.threads` set in the environment, or why not;
        ``torch_threads`` when torch is loaded.
    """
    import numba

    numba.get_num_threads()  # starts numba's threads, so that the layer is known
    with open("/proc/self/maps") as maps:
        gomps = sorted({line.split()[-1] for line in maps if "libgomp" in line and "/" in line})
    in_use = ""
    try:
        address = ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p).value
        in_use = next((path for path in gomps
                       if ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value == address), "")
    except (AttributeError, OSError):
        pass
    info = {"numba_layer": numba.threading_layer(), "numba_threads": numba.get_num_threads(), "openmp": gomps,
            "openmp_in_use": in_use, "shared_runtime": _SHARED, "defaults": threads.report()}
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


_SHARED = share_openmp_runtime()

ISA_ENV_VAR = "MOSBITS_NUMBA_ISA"
LANES = {"avx512": 16, "avx2": 8, "portable": 1}
FAST_LANES = {"avx512": 64, "avx2": 32, "portable": 1}
"""Rows per block: one per float32 lane in the exact kernels, one per byte lane in the fast ones."""


@functools.cache
def host_isas() -> list[str]:
    """The instruction sets this CPU runs, best first (``"portable"`` always); asked of LLVM once."""
    features = binding.get_host_cpu_features()
    needs = {"avx512": ("avx512f", "avx512bw"), "avx2": ("avx2",)}
    found = [isa for isa, flags in needs.items() if all(features.get(flag) for flag in flags)]
    return [*found, "portable"]


GEMM_MIN_M = 16
"""On CPUs without AVX2, from this batch size on B is unpacked tile by tile for a BLAS matmul instead of looked
up token by token. With AVX2 or AVX-512 the float32 lookups stay faster at every batch size measured (at 512
tokens, 4096 x 4096: 68 ms against 92 ms for the gemm path when measured; the lookups now take 45 ms), so they
never switch."""
GEMM_TILE_BYTES = 4 << 20
BF16_GEMM_MIN_M = 64
"""From this many bfloat16 tokens on, the gemm path (bfloat16 tiles) replaces the float32 lookups. At 4096 x 4096
here (`mosbits bench --dtype half`): lookups 3.2 ms at M = 32; gemm 6.6 ms at 64 (lookups about the same),
6.5 ms at 128 and 15 ms at 512 (lookups 66 ms; dense bfloat16 8.5 ms)."""
BF16_TILE_ROWS = 1024
"""Rows per bfloat16 tile (2 * 1024 * Kp bytes: 8 MiB at K = 4096). torch's bfloat16 matmul here, M = 512, per
4096 rows: 10.8 ms with 1024-row tiles (27.4 at K = 11008), 19.9 (59.6) with 512, 13.7 (37.3) with 381."""
PATH_ENV_VAR = "MOSBITS_NUMBA_PATH"
PATHS = ("lookup", "gemm")

_forced: dict[str, str | None] = {"isa": None, "path": None}


@contextlib.contextmanager
def forced(isa: str | None = None, path: str | None = None) -> Iterator[None]:
    """Within the block, use this instruction set and/or path (for tests and benchmarks; the variables
    MOSBITS_NUMBA_ISA and MOSBITS_NUMBA_PATH do the same)."""
    previous = dict(_forced)
    _forced.update({"isa": isa or previous["isa"], "path": path or previous["path"]})
    try:
        yield
    finally:
        _forced.update(previous)


def selected_isa() -> tuple[str | None, str]:
    """(isa, "") or (None, why the forced one cannot run here)."""
    forced_isa = _forced["isa"] or os.environ.get(ISA_ENV_VAR)
    if not forced_isa:
        return host_isas()[0], ""
    if forced_isa not in LANES:
        return None, f"{ISA_ENV_VAR}={forced_isa!r} is not one of {', '.join(LANES)}"
    if forced_isa not in host_isas():
        return None, f"{ISA_ENV_VAR}={forced_isa!r}: this CPU supports only {', '.join(host_isas())}"
    return forced_isa, ""


def selected_path(m: int, isa: str | None, bf16: bool = False) -> tuple[str | None, str]:
    """("lookup" or "gemm", "") for a batch of m tokens (bfloat16 torch tokens if ``bf16``) on ``isa``, or
    (None, why the forced path is unknown)."""
    forced_path, reason = _forced_path()
    return (path_for(m, isa, bf16, forced_path), "") if not reason else (None, reason)


def _forced_path() -> tuple[str | None, str]:
    """(the forced path or None, "") or (None, why the forced value is unknown)."""
    forced_path = _forced["path"] or os.environ.get(PATH_ENV_VAR)
    if forced_path and forced_path not in PATHS:
        return None, f"{PATH_ENV_VAR}={forced_path!r} is not one of {', '.join(PATHS)}"
    return forced_path or None, ""


def path_for(m: int, isa: str | None, bf16: bool, forced_path: str | None) -> str:
    """The path for m tokens on ``isa``: ``forced_path`` when given, else gemm on CPUs without AVX2 from
    GEMM_MIN_M tokens and for bfloat16 tokens from BF16_GEMM_MIN_M, else lookup."""
    if forced_path:
        return forced_path
    gemm = (isa == "portable" and m >= GEMM_MIN_M) or (bf16 and m >= BF16_GEMM_MIN_M)
    return "gemm" if gemm else "lookup"


def supports(x: Any, packed: Any, experts: Any, router: Any, bias: Any) -> tuple[bool, str]:
    isa, reason = selected_isa()
    path, path_reason = selected_path(1, isa)
    if isa is None or path is None:
        return False, reason or path_reason
    if arrays.is_torch(x):
        import torch

        if x.device.type != "cpu":
            return False, f"the numba backend runs on the CPU, got a tensor on {x.device}"
        tensors = (x, experts.s_in, experts.s_out, router, bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return False, "the numba backend is not differentiable; use backend='torch' for training"
    return True, ""


def product_dtype(x_dtype: str) -> str:
    """float32, except for bfloat16 inputs, whose gemm path rounds x * s_in to bfloat16."""
    return "bfloat16" if x_dtype == "bfloat16" else "float32"


def _float32(a: Any) -> np.ndarray:
    """A C-contiguous float32 NumPy array (a view where possible) of a NumPy array or CPU tensor."""
    if arrays.is_torch(a):
        import torch

        return a.detach().to(torch.float32).contiguous().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def matmul(x: Any, packed: Any, experts: Any, router: Any, bias: Any) -> Any:
    """y (..., N) = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias, g = softmax(x @ router.T), x (..., K)."""
    return NumbaLayer(packed, experts, router, bias, fast=False)(x)


def matmul_fast(x: Any, packed: Any, experts: Any, router: Any, bias: Any) -> Any:
    """`matmul` with int8 table lookups (``precision="fast"``, `mosbits.precision`), for every batch size."""
    return NumbaLayer(packed, experts, router, bias, fast=True)(x)


def prepare(packed: Any, experts: Any, router: Any, bias: Any, precision: str) -> NumbaLayer:
    """The layer converted once for many calls (`mosbits.prepared`)."""
    return NumbaLayer(packed, experts, router, bias, fast=precision == "fast")


def prepare_group(layers: list[NumbaLayer]) -> NumbaGroup:
    """Prepared layers that read the same input, served by one compiled call per input (`mosbits.prepared`)."""
    return NumbaGroup(layers)


SERIAL_MAX_M = 2
"""Up to this many tokens, the scales and tables are computed without waking the thread pool."""


class NumbaLayer:
    """A layer's parameters as float32 NumPy arrays (views where they already are float32, else copies) and
    its codes; calling it with x (..., K) runs the layer. The instruction set and any forced path
    (MOSBITS_NUMBA_ISA / MOSBITS_NUMBA_PATH, `forced`) are read when the layer is built; the path is then chosen
    per call from the batch size."""

    def __init__(self, packed: Any, experts: Any, router: Any, bias: Any, fast: bool) -> None:
        self.isa, isa_reason = selected_isa()
        self.forced_path, path_reason = _forced_path()
        self.error = isa_reason or path_reason
        self.n, self.k = packed.shape
        self.data = packed.data.numpy() if arrays.is_torch(packed.data) else packed.data
        self.router, self.s_in, self.s_out = _float32(router), _float32(experts.s_in), _float32(experts.s_out)
        self.bias = np.zeros(self.n, np.float32) if bias is None else _float32(bias)
        self.fast = fast
        self.kp = 8 * row_bytes(self.k)
        self._codes: tuple[int, np.ndarray] | None = None
        self._alone = NumbaGroup([self])
        self.kernel_seconds: list[float] | None = None
        """When a list (``[0.0]``), each compiled call adds its seconds to element 0 (``mosbits bench --model``'s
        breakdown: the kernels themselves, without the conversions around them)."""

    def codes(self) -> tuple[int, np.ndarray]:
        """(Np, codes) of the lookup path: the padded row count and, for the SIMD kernels, the signs in row blocks
        (`layout.row_blocks`), for the portable ones the format v1 bytes; derived on first use and kept by this
        layer only."""
        if self._codes is None:
            lanes = _lanes(self)
            codes = self.data if lanes == 1 else layout.row_blocks(self.data, lanes)
            self._codes = (-(-self.n // lanes) * lanes, codes)
        return self._codes

    def _compiled(self, run: Any, *args: Any) -> None:
        """``run(*args)``, a compiled call, timed into `kernel_seconds` when that is set."""
        if self.kernel_seconds is None:
            run(*args)
            return
        start = time.perf_counter()
        run(*args)
        self.kernel_seconds[0] += time.perf_counter() - start

    def __call__(self, x: Any) -> Any:
        m, bf16, gemm = _route(self, x)
        if gemm:
            if bf16:
                return _bf16_gemm(x.reshape(m, self.k), self).reshape(*x.shape[:-1], self.n)
            x32 = _float32(x).reshape(m, self.k)
            out = arrays.empty(x32, (m, self.n), np.float32)
            xs, gates = _kernels.scales(x32, self.router, self.s_in, self.kp, arrays.poisoning())
            _gemm(xs, self.data, out)
            _kernels.scale_rows(out, gates, self.s_out, self.bias)
            return _output(out, x)
        return self._alone.lookup(x, m, bf16)[0]


class NumbaGroup:
    """Layers that read the same input x (..., K) (q, k and v of an attention; gate and up of an MLP), with the
    same precision: ``group(x)`` returns each layer's y (..., N_i), bit for bit as its own call would, from one
    compiled call (`_kernels.group_kernel`) on the lookup path; on the gemm path (large batches) each layer runs
    alone, since their matmuls dominate.

    Raises (at construction):
        ValueError: layers that differ in K, precision, instruction set or forced path.
    """

    def __init__(self, layers: list[NumbaLayer]) -> None:
        self.layers = tuple(layers)
        lead = self.layers[0]
        for name in ("k", "fast", "isa", "forced_path"):
            values = {getattr(layer, name) for layer in self.layers}
            if len(values) > 1:
                raise ValueError(f"a group's layers must share their {name}, got {sorted(map(str, values))}")
        self.k, self.kp, self.fast, self.isa = lead.k, lead.kp, lead.fast, lead.isa
        self.forced_path, self.error = lead.forced_path, lead.error
        self._plans: dict[tuple[bool, bool], tuple[Any, ...]] = {}

    def __call__(self, x: Any) -> list[Any]:
        m, bf16, gemm = _route(self, x)
        if gemm:
            return [layer(x) for layer in self.layers]
        return self.lookup(x, m, bf16)

    def _plan(self, serial: bool, bf16: bool) -> tuple[Any, tuple[Any, ...], tuple[tuple[int, int, int], ...], int]:
        """(compiled group kernel, the layers' constant arguments, each layer's (start, N, width) in the flat
        output, the output's elements per token), kept per (serial, bf16): outputs hold N columns for bfloat16
        tokens, else Np (the kernels write whole row blocks)."""
        found = self._plans.get((serial, bf16))
        if found is None:
            constants, spans, start = [], [], 0
            for layer in self.layers:
                np_, codes = layer.codes()
                width = layer.n if bf16 else np_
                sizes = (np_, layer.n) if bf16 else (np_,)
                constants.append((layer.router, layer.s_in, layer.s_out, layer.bias, codes, *sizes, start))
                spans.append((start, layer.n, width))
                start += width
            kernel = _kernels.group_kernel(self.fast, _lanes(self), serial, bf16)
            found = self._plans[(serial, bf16)] = (kernel, tuple(constants), tuple(spans), start)
        return found

    def lookup(self, x: Any, m: int, bf16: bool) -> list[Any]:
        """The lookup path for x (..., K) of m tokens (bfloat16 torch tokens if ``bf16``): one compiled call
        writes every layer's output into one flat array, and each y is a view of its part."""
        run, constants, spans, width = self._plan(m <= SERIAL_MAX_M, bf16)
        lead, shape = self.layers[0], x.shape[:-1]
        if bf16:
            import torch

            x = x.detach() if x.requires_grad else x
            bits = x.contiguous().view(torch.int16).numpy().reshape(m, self.k)
            flat = arrays.empty(bits, (m * width,), np.int16)
            lead._compiled(run, bits, self.kp, constants, flat, arrays.poisoning())
            return [torch.from_numpy(flat[m * start:m * (start + n)].reshape(*shape, n)).view(torch.bfloat16)
                    for start, n, _ in spans]
        x32 = _float32(x).reshape(m, self.k)
        flat = arrays.empty(x32, (m * width,), np.float32)
        lead._compiled(run, x32, self.kp, constants, flat, arrays.poisoning())
        return [_output(flat[m * start:m * (start + np_)].reshape(m, np_)[:, :n], x) for start, n, np_ in spans]


DENSE_MAX_M = 2
"""`dense` serves at most this many tokens. Its kernels are bound by their float32 arithmetic at about the speed
W streams in, so each token more costs about one more pass: here (49152 x 4096, 2 threads) bfloat16 M = 1 ran
6.4 ms, M = 2 11.5 ms and M = 4 17.0 ms against torch's 12.3, 14.4 and 14.1 ms."""
DENSE_DTYPES = ("bfloat16", "float32")


def dense_refusal(x: Any, weight: Any, bias: Any) -> str:
    """Why `dense` cannot run y = x @ weight.T + bias (a sentence naming the argument), or "" when it can."""
    import torch

    if not all(isinstance(t, torch.Tensor) for t in (x, weight)) or not (bias is None
                                                                         or isinstance(bias, torch.Tensor)):
        return "x, weight and bias must be torch tensors"
    if isa_error := selected_isa()[1]:
        return isa_error
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        return f"the numba backend runs on the CPU, got x on {x.device}, weight on {weight.device}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "the numba backend is not differentiable: a tensor requires grad"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, {getattr(bias, 'dtype', None)}"
    if arrays.dtype_name(x) not in DENSE_DTYPES:
        return f"dtype must be one of {', '.join(DENSE_DTYPES)}, got {x.dtype}"
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        return f"x must be (..., K) for weight (V, K) = {tuple(weight.shape)}, got x {tuple(x.shape)}"
    if not weight.is_contiguous() or (weight.dtype == torch.bfloat16 and (weight.shape[1] % 2
                                                                           or weight.data_ptr() % 4)):
        return "weight must be contiguous (for bfloat16: with even K, 4-byte aligned)"
    m = math.prod(x.shape[:-1])
    if m > DENSE_MAX_M:
        return f"at most DENSE_MAX_M = {DENSE_MAX_M} tokens, got {m}"
    return ""


def dense(x: Any, weight: Any, bias: Any = None) -> Any:
    """y (..., V) = x (..., K) @ weight.T (V, K) + bias (V,) for a few tokens, in x's dtype (bfloat16 or float32,
    CPU torch tensors): every weight is read once, at memory speed (`_kernels.dense_bf16`, `dense_f32`); sums
    in float32, a bfloat16 y rounded as torch rounds. Serves the dense layers a packed model keeps (its
    lm_head) at decode batch sizes (`mosbits.hf.DecodeLinear`).

    Raises:
        ValueError: inputs this kernel does not take (`dense_refusal` says why).
    """
    reason = dense_refusal(x, weight, bias)
    if reason:
        raise ValueError(reason)
    return run_dense(x, weight, bias)


def run_dense(x: Any, weight: Any, bias: Any = None) -> Any:
    """`dense` without its checks, for a caller that has just had "" from `dense_refusal`."""
    import torch

    v, k = weight.shape
    m = math.prod(x.shape[:-1])
    x2 = x.detach().reshape(m, k)
    b = np.zeros(v, np.float32) if bias is None else bias.detach().float().contiguous().numpy()
    if x.dtype == torch.bfloat16:
        x32 = x2.float()
        even, odd = x32[:, 0::2].contiguous().numpy(), x32[:, 1::2].contiguous().numpy()
        words = weight.detach().view(torch.int32).numpy().view(np.uint32)
        out = arrays.empty(words, (m, v), np.int16)
        _kernels.dense_bf16(words, even, odd, b, out)
        return torch.from_numpy(out).view(torch.bfloat16).reshape(*x.shape[:-1], v)
    w = weight.detach().numpy()
    out = arrays.empty(w, (m, v), np.float32)
    x32 = x2.contiguous().numpy()
    _kernels.dense_f32(w, x32, x32, b, out)
    return torch.from_numpy(out).reshape(*x.shape[:-1], v)


def _lanes(owner: NumbaLayer | NumbaGroup) -> int:
    """Rows per block of the owner's lookup kernels (its precision on its instruction set)."""
    return (FAST_LANES if owner.fast else LANES)[owner.isa]


def _route(owner: NumbaLayer | NumbaGroup, x: Any) -> tuple[int, bool, bool]:
    """(M, bfloat16 torch tokens?, gemm path?) of a call with x (..., K); raises the owner's forced-setting
    error."""
    if owner.error:
        raise ValueError(owner.error)
    m = math.prod(x.shape[:-1])
    bf16 = arrays.is_torch(x) and arrays.dtype_name(x) == "bfloat16"
    return m, bf16, path_for(m, owner.isa, bf16, owner.forced_path) == "gemm" and not owner.fast


def _output(y: np.ndarray, x: Any) -> Any:
    """y (M, N) float32 as the output for x (..., K): shape (..., N), x's library and dtype."""
    y = y.reshape(*x.shape[:-1], y.shape[1])
    if arrays.is_torch(x):
        import torch

        return torch.from_numpy(np.ascontiguousarray(y)).to(x.dtype)
    return y.astype(x.dtype, copy=False)


def _gemm(xs: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:
    """out (M, N) = xs (M, Kp) @ B.T, with B unpacked GEMM_TILE_BYTES of float32 rows at a time (never the whole
    matrix) and multiplied by NumPy's BLAS."""
    n, kp = out.shape[1], xs.shape[1]
    rows = max(1, GEMM_TILE_BYTES // (4 * kp))
    tile = arrays.empty(xs, (min(rows, n), kp), np.float32)
    for n0 in range(0, n, rows):
        count = min(rows, n - n0)
        _kernels.unpack_rows(data, n0, tile[:count])
        out[:, n0:n0 + count] = xs @ tile[:count].T


def _bf16_gemm(x: Any, layer: NumbaLayer) -> Any:
    """y (M, N) bfloat16 = (bf16(x * s_in) @ B.T) * s_out + bias for x (M, K) bfloat16: B unpacked BF16_TILE_ROWS
    rows at a time as exact bfloat16 +-1 for torch's bfloat16 matmul; the gates and bf16(x * s_in) before it
    (`_kernels.scales_bf16`) and the scaling of its bfloat16 products after it (`_kernels.finish_bf16`) are one
    numba pass each, in float32."""
    import torch

    n = layer.n
    poison = arrays.poisoning()
    bits = x.detach().contiguous().view(torch.int16).numpy()
    xs_bits, gates = _kernels.scales_bf16(bits, layer.router, layer.s_in, layer.kp, poison)
    xs16 = torch.from_numpy(xs_bits).view(torch.bfloat16)
    tile_bits = arrays.empty(layer.data, (min(BF16_TILE_ROWS, n), layer.kp), np.uint16)
    tile = torch.from_numpy(tile_bits).view(torch.bfloat16)
    y = arrays.empty(bits, (x.shape[0], n), np.int16)
    for n0 in range(0, n, BF16_TILE_ROWS):
        n1 = min(n, n0 + BF16_TILE_ROWS)
        _kernels.unpack_rows_bf16(layer.data, n0, tile_bits[:n1 - n0])
        product = torch.mm(xs16, tile[:n1 - n0].T)
        _kernels.finish_bf16(product.view(torch.int16).numpy(), gates, layer.s_out, layer.bias, n0, y)
    return torch.from_numpy(y).view(torch.bfloat16)
