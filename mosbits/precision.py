"""The ``precision=`` argument of `mosbits.matmul`: what each setting promises.

``"exact"`` (the default): float32 arithmetic from the gates to the sums, within the tolerance of
`mosbits.testing.tolerance` of the float64 reference, and equal to it on dyadic inputs.

``"fast"`` (opt-in, CPU lookups in the numba backend): per token, the 16 signed sums of each group of 4 scaled
inputs ``xs = x * (g @ s_in)`` are rounded to int8 on a grid ``delta_t = max_g sum_b |xs_4g+b| / 127`` shared by
the FAST_BLOCK inputs of block t, summed exactly in integers within the block, and the block sums are scaled by
delta_t and added in float32. Each group's table entry is off by at most delta_t / 2, so per output

    |y_n - ref_n| <= exact tolerance + |s_out_n| * sum_t groups_t * delta_t / 2

(`mosbits.testing.fast_tolerance`); on inputs where every block holds a group with sum |xs| = 127 and all
xs are integers, the grid is 1 and the result is exact. Typical error is far below that worst case: the
normalised mean squared error ``sum (y - ref)^2 / sum ref^2`` is about 5e-5 for Gaussian inputs and 4e-5 to 8e-5
on SmolLM2-135M's activations, but 1.4e-4 when 1% of the input channels are 30x larger than the rest (README,
tests/test_numba_backend.py).
"""

from __future__ import annotations

PRECISIONS = {"exact": "matmul", "fast": "matmul_fast"}
"""Each precision and the backend function that computes it."""

FAST_BLOCK = 128
"""Inputs that share one int8 grid in the fast mode (a multiple of 32, so blocks align with packed words). An
outlier coarsens only its own block's grid: on SmolLM2-135M's activations (peak / rms up to 46) the NMSE was
0.9e-4 to 1.9e-4 with blocks of 1024 inputs and 4.3e-5 to 8.2e-5 with 128."""

FAST_LEVELS = 127
"""The largest table magnitude on the int8 grid."""


def check(precision: str) -> str:
    """``precision`` itself, or a ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision
