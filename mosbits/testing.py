"""Tolerances, layer cases and Hypothesis strategies shared by tests/ and bench/.

How results are compared: against the float64 reference, per output element n of a token, within the bound of
docs/FORMAT.md section 9 (stated there once, for every runtime; `tolerance` computes it). Why each term is there:

- C * sqrt(K) eps_acc: eps_acc is the unit roundoff of the dtype in which x * s_in enters the binary product (the
  backend's ``product_dtype``); the sum of K signed terms then errs by about sqrt(K) eps_acc times their mass,
  sum_k |x_k| a_k b_n with a = g @ |S_in|, b = g @ |S_out|.
- C * eps_f32 * E: s_in = g @ S_in and s_out = g @ S_out are sums of E float32 products, each off by up to
  E eps_f32 times g @ |S| (which is |s| when the scales are positive, as trained ones are).
- C * eps_f32 * sqrt(K) L: the gates come from float32 logits whose error is about sqrt(K) eps_f32 L, with
  L = max_e sum_k |x_k router_ek| the logit mass; a softmax turns that absolute logit error into the same
  relative error of g, hence of s_in and s_out.
- |bias_n| joins the mass because y = p * s_out + bias is formed in float32.
- eps_out * |ref| + tiny_out: the final rounding to the output dtype (tiny_out: half its smallest subnormal).

That bound is a worst case: at K = 4096 it admits gates rounded to bfloat16. Float32 paths therefore pass a second
gate too, `nmse_ratio`: their normalised error may be at most NMSE_FACTOR times that of plain float32 NumPy
arithmetic of the same formula on the same inputs (`float32_nmse`).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np

from mosbits import arrays, precision, reference
from mosbits.experts import Experts
from mosbits.format import PackedSigns, pack, unpack

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
HALF_SMALLEST_SUBNORMAL = {"float64": 2.0**-1075, "float32": 2.0**-150, "float16": 2.0**-25,
                           "bfloat16": 2.0**-134}
C = 4.0
"""The one constant of the bound above."""


def to_float64(a: Any) -> np.ndarray | None:
    """A float64 NumPy copy of a NumPy array or torch tensor (any device); None stays None."""
    if a is None:
        return None
    if arrays.is_torch(a):
        return a.detach().to("cpu").double().numpy()
    return np.asarray(a, dtype=np.float64)


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` (round to nearest even; bfloat16 through float32), as float64."""
    if dtype != "bfloat16":
        return a.astype(dtype).astype(np.float64)
    bits = a.astype(np.float32).view(np.uint32)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & np.uint32(0xFFFF0000)
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def truth(x: Any, packed: PackedSigns, experts: Experts, router: Any, bias: Any = None) -> np.ndarray:
    """The float64 reference output for arguments of any library and dtype: (..., N) float64."""
    signs = PackedSigns(np.asarray(packed.data.cpu()) if arrays.is_torch(packed.data) else packed.data,
                        packed.shape)
    experts64 = types.SimpleNamespace(s_in=to_float64(experts.s_in), s_out=to_float64(experts.s_out))
    return reference.matmul(to_float64(x), signs, experts64, to_float64(router), to_float64(bias))


def tolerance(x: Any, experts: Experts, router: Any, bias: Any, ref: np.ndarray, *, out_dtype: str,
              product_dtype: str = "float32") -> np.ndarray:
    """Per-element bound (..., N) on |y - ref| for a backend whose product runs in ``product_dtype``."""
    x64, r64 = to_float64(x), to_float64(router)
    gates = reference.softmax(x64 @ r64.T)
    abs_s_in = gates @ np.abs(to_float64(experts.s_in))
    abs_s_out = gates @ np.abs(to_float64(experts.s_out))
    k, e = x64.shape[-1], r64.shape[0]
    mass = (np.abs(x64) * abs_s_in).sum(axis=-1, keepdims=True)
    logit_mass = (np.abs(x64) @ np.abs(r64).T).max(axis=-1, keepdims=True)
    terms = mass * abs_s_out
    if bias is not None:
        terms = terms + np.abs(to_float64(bias))
    eps32 = UNIT_ROUNDOFF["float32"]
    eps_product = C * (np.sqrt(k) * UNIT_ROUNDOFF[product_dtype] + eps32 * (e + np.sqrt(k) * logit_mass))
    return eps_product * terms + UNIT_ROUNDOFF[out_dtype] * np.abs(ref) + HALF_SMALLEST_SUBNORMAL[out_dtype]


FAST_ROUNDING = 0.5 + 2.0**-10
"""Bound on one fast-mode table entry's error, in grid steps: half a step from rounding to the int8 grid, plus
2^-10 for the float32 arithmetic that forms the entry, its grid and the scaled inputs (relative errors of a few
1e-7, far inside 2^-10 of half a step)."""


def fast_tolerance(x: Any, experts: Experts, router: Any, bias: Any, ref: np.ndarray, *,
                   out_dtype: str) -> np.ndarray:
    """Per-element bound (..., N) on |y - ref| for ``precision="fast"`` (`mosbits.precision`): the float32
    tolerance plus, per block t of FAST_BLOCK inputs, groups_t * delta_t * FAST_ROUNDING times g @ |S_out|."""
    x64 = to_float64(x)
    k = x64.shape[-1]
    gates = reference.softmax(x64 @ to_float64(router).T)
    xs = x64 * (gates @ to_float64(experts.s_in))
    groups = -(-k // 4)
    group_mass = np.abs(np.pad(xs, [(0, 0)] * (xs.ndim - 1) + [(0, 4 * groups - k)])).reshape(
        *xs.shape[:-1], groups, 4).sum(axis=-1)
    per_block = precision.FAST_BLOCK // 4
    quantisation = np.zeros((*xs.shape[:-1], 1))
    for g0 in range(0, groups, per_block):
        block = group_mass[..., g0:g0 + per_block]
        delta = block.max(axis=-1, keepdims=True) / precision.FAST_LEVELS
        quantisation = quantisation + block.shape[-1] * delta * FAST_ROUNDING
    abs_s_out = gates @ np.abs(to_float64(experts.s_out))
    exact = tolerance(x, experts, router, bias, ref, out_dtype=out_dtype, product_dtype="float32")
    return exact + quantisation * abs_s_out


NMSE_FACTOR = 4.0
"""A float32 path's normalised error may be at most this many times that of `float32_nmse` on the same inputs.
Measured at K = 4096 and 11008 (N(0, 1) inputs, E = 4): numba 0.26x, torch 0.66-0.80x. Rounding the gates to
bfloat16, which the per-element bound admits at such K (0.1-0.2 of it), scores 9e6x."""


def float32_nmse(x: Any, packed: PackedSigns, experts: Experts, router: Any, bias: Any = None) -> float:
    """`nmse` against the float64 reference of the same formula in plain float32 NumPy arithmetic (gates,
    scales, the product with the unpacked signs, BLAS sums): the error a float32 implementation is expected
    to have on these inputs, as the baseline of `nmse_ratio`."""
    x32, r32 = (np.asarray(to_float64(a), np.float32) for a in (x, router))
    logits = x32 @ r32.T
    gates = np.exp(logits - logits.max(axis=-1, keepdims=True))
    gates /= gates.sum(axis=-1, keepdims=True)
    s_in, s_out = (np.asarray(to_float64(s), np.float32) for s in (experts.s_in, experts.s_out))
    signs = unpack(PackedSigns(np.asarray(to_float64(packed.data), np.uint8), packed.shape), np.float32)
    y = ((x32 * (gates @ s_in)) @ signs.T) * (gates @ s_out)
    if bias is not None:
        y = y + np.asarray(to_float64(bias), np.float32)
    return nmse(y, truth(x, packed, experts, router, bias))


def nmse_ratio(y: Any, ref: np.ndarray, baseline: float) -> float:
    """nmse(y, ref) / (NMSE_FACTOR * baseline), with baseline from `float32_nmse`; <= 1 passes. The
    per-element bound (`tolerance`) is a worst case that grows with sqrt(K); this second gate holds a float32
    path to what float32 arithmetic actually achieves, so a regression to half-precision gates or scales fails."""
    error = nmse(y, ref)
    if baseline == 0:
        return 0.0 if error == 0 else float("inf")
    return error / (NMSE_FACTOR * baseline)


def nmse(y: Any, ref: np.ndarray) -> float:
    """Normalised mean squared error sum (y - ref)^2 / sum ref^2 (0 when both are empty or zero)."""
    err = ((to_float64(y) - ref) ** 2).sum()
    scale = (ref ** 2).sum()
    return float(err / scale) if scale else float(err)


def assert_within(y: Any, ref: np.ndarray, tol: np.ndarray, what: str = "y") -> None:
    """Fail with the mismatch count, the worst ratio and the first indices when |y - ref| > tol anywhere."""
    y64 = to_float64(y)
    assert y64.shape == ref.shape, f"{what}: shape {y64.shape}, expected {ref.shape}"
    err = np.abs(y64 - ref)
    bad = ~(err <= tol)
    if bad.any():
        idx = [tuple(int(i) for i in row) for row in np.argwhere(bad)[:5]]
        worst = np.nanmax(np.where(np.isnan(err), np.inf, err / tol))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements outside tolerance (worst |err|/tol = {worst:.3g}); "
            f"first at {idx}: got {[float(y64[i]) for i in idx]}, reference {[float(ref[i]) for i in idx]}, "
            f"tolerance {[float(tol[i]) for i in idx]}"
        )


def error_ratio(y: Any, ref: np.ndarray, tol: np.ndarray) -> float:
    """max |y - ref| / tol (NaN counts as infinitely wrong); <= 1 means within tolerance. 0 for empty y."""
    err = np.abs(to_float64(y) - ref)
    if err.size == 0:
        return 0.0
    return float(np.nanmax(np.where(np.isnan(err), np.inf, err / tol)))


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer and one input, as float32 NumPy arrays: the source every backend's arguments are made from.

    Attributes:
        x: (*batch, K); w: (N, K) latent weight; s_in: (E, K); s_out: (E, N); router: (E, K); bias: (N,) or None.
    """

    x: np.ndarray
    w: np.ndarray
    s_in: np.ndarray
    s_out: np.ndarray
    router: np.ndarray
    bias: np.ndarray | None

    @property
    def id(self) -> str:
        """A readable id such as ``M2x3-K63-N17-E4-bias``."""
        batch = "x".join(str(d) for d in self.x.shape[:-1]) or "none"
        n, k = self.w.shape
        return f"M{batch}-K{k}-N{n}-E{self.s_in.shape[0]}" + ("-bias" if self.bias is not None else "")

    def arguments(self, library: str, dtype: str, device: str = "cpu") -> dict[str, Any]:
        """``mosbits.matmul`` keyword arguments on ``library`` ("numpy" or "torch") in ``dtype``."""

        def convert(a):
            return arrays.from_numpy(a, library, dtype, device)

        return {
            "x": convert(self.x),
            "packed": pack(convert(self.w)),
            "experts": Experts(convert(self.s_in), convert(self.s_out)),
            "router": convert(self.router),
            "bias": None if self.bias is None else convert(self.bias),
        }


def random_case(rng: np.random.Generator, batch: tuple[int, ...], k: int, n: int, e: int,
                bias: bool = False) -> LayerCase:
    """Activations ~ N(0, 1); scales positive around 1 (as the SVD init gives, normalised); router ~ N(0, 1/K)."""
    def f32(a):
        return np.asarray(a, dtype=np.float32)

    return LayerCase(
        x=f32(rng.standard_normal((*batch, k))),
        w=f32(rng.standard_normal((n, k))),
        s_in=f32(rng.uniform(0.5, 1.5, (e, k))),
        s_out=f32(rng.uniform(0.5, 1.5, (e, n)) / np.sqrt(k)),
        router=f32(rng.standard_normal((e, k)) / np.sqrt(k)),
        bias=f32(rng.standard_normal(n)) if bias else None,
    )


def dyadic_case(rng: np.random.Generator, batch: tuple[int, ...], k: int, n: int, e: int,
                bias: bool = False) -> LayerCase:
    """A case every backend must compute exactly.

    x: integers in [-8, 8]; scales: powers of two in [1/4, 4]; router: zero, so the gates are exactly 1/E for
    E a power of two; bias: integers. With K <= 4096 every partial sum is a multiple of 2^-5 below 2^17, which
    float32 holds exactly, so any summation order gives the same float32 result.
    """
    if e & (e - 1):
        raise ValueError(f"dyadic_case needs E to be a power of two for exact gates, got {e}")
    if k > 4096:
        raise ValueError(f"dyadic_case keeps sums exact for K <= 4096, got {k}")

    def powers(shape):
        return np.exp2(rng.integers(-2, 3, shape)).astype(np.float32)

    return LayerCase(
        x=rng.integers(-8, 9, (*batch, k)).astype(np.float32),
        w=rng.standard_normal((n, k)).astype(np.float32),
        s_in=powers((e, k)),
        s_out=powers((e, n)),
        router=np.zeros((e, k), dtype=np.float32),
        bias=rng.integers(-4, 5, n).astype(np.float32) if bias else None,
    )


def fast_exact_case(rng: np.random.Generator, batch: tuple[int, ...], k: int, n: int,
                    bias: bool = False) -> LayerCase:
    """A case the fast mode must compute exactly: E = 1 (gate 1), s_in = 1, s_out powers of two, x integers in
    [-7, 7] except that the first group of every block of FAST_BLOCK inputs starts with +-127. Each block's
    largest group mass is then 127, its grid step 1, and every int8 table entry the exact integer sum."""
    x = rng.integers(-7, 8, (*batch, k)).astype(np.float32)
    x[..., ::precision.FAST_BLOCK] = 127 * rng.choice([-1.0, 1.0], x[..., ::precision.FAST_BLOCK].shape)
    x[..., 1::precision.FAST_BLOCK] = 0
    x[..., 2::precision.FAST_BLOCK] = 0
    x[..., 3::precision.FAST_BLOCK] = 0
    return LayerCase(
        x=x,
        w=rng.standard_normal((n, k)).astype(np.float32),
        s_in=np.ones((1, k), dtype=np.float32),
        s_out=np.exp2(rng.integers(-2, 3, (1, n))).astype(np.float32),
        router=rng.standard_normal((1, k)).astype(np.float32),
        bias=rng.integers(-4, 5, n).astype(np.float32) if bias else None,
    )


def layer_cases(max_k: int = 300, max_n: int = 70, max_e: int = 8):
    """Hypothesis strategy of `LayerCase` (imports hypothesis when called).

    K in 1..max_k, N in 1..max_n, E in 1..max_e, 0 to 3 batch dims of size 0..4 (including empty batches),
    bias on or off.
    """
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        k = draw(st.integers(1, max_k))
        n = draw(st.integers(1, max_n))
        e = draw(st.integers(1, max_e))
        batch = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        seed = draw(st.integers(0, 2**32 - 1))
        return random_case(np.random.default_rng(seed), batch, k, n, e, bias=draw(st.booleans()))

    return cases()
