"""Every registered backend against the float64 reference: random shapes within the derived tolerance,
exact equality on dyadic inputs, the layer's invariants, and float32 paths' NMSE at LLaMA widths.

For ``reference`` itself (``nox -s "tests(reference)"``) the ground truth is the same function, so these tests do
not check its arithmetic: they check what wraps it (argument handling, the output's library, dtype and shape, the
rounding of float16 inputs and outputs against the tolerance, empty and scalar batches) and the invariants (one
expert ignores the router, identical experts ignore it, y is linear in s_out), which hold of the formula and are
checked on it. Its arithmetic is pinned elsewhere: by docs/FORMAT.md's worked example, recomputed step by step
from the stored layer (tests/test_vectors.py), and by the float32 NMSE baseline, an independent NumPy float32
implementation of the formula that the NMSE test compares with the reference at K = 4096 and 11008."""

import dataclasses

import numpy as np
import pytest
from conftest import DEVICE, REQUIRED, backend_params, require_backend
from hypothesis import given

import mosbits
from mosbits import arrays, testing

pytestmark = pytest.mark.parametrize(("backend", "library", "dtype"), backend_params())


DECLINED = {
    ("triton", "torch", "bfloat16", "cpu"): "Triton's interpreter has no bfloat16 arithmetic (GPU runs test it)",
}
"""(backend, library, dtype, device) -> why: the harness cases a backend may decline although MOSBITS_TEST_BACKENDS
names it. Any other refusal of a required backend fails the test: a backend that stops running a case must not
turn green by skipping it."""


def run(case, backend, library, dtype, module):
    """The backend's output (poisoned allocations) and the arguments it was given."""
    args = case.arguments(library, dtype, DEVICE)
    ok, reason = module.supports(args["x"], args["packed"], args["experts"], args["router"], args["bias"])
    if not ok:
        declined = f"{backend} does not run {library} {dtype} on {DEVICE}: {reason}"
        if backend in REQUIRED and (backend, library, dtype, DEVICE) not in DECLINED:
            pytest.fail(f"{declined} (required by MOSBITS_TEST_BACKENDS, and not a listed exclusion)")
        pytest.skip(declined)
    with arrays.poisoned_outputs():
        y = mosbits.matmul(**args, backend=backend)
    assert arrays.library(y) == library and arrays.dtype_name(y) == dtype
    assert arrays.device_of(y) == arrays.device_of(args["x"])
    return y, args


def check_close(case, backend, library, dtype, module):
    y, args = run(case, backend, library, dtype, module)
    ref = testing.truth(**args)
    tol = testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype=dtype,
                            product_dtype=module.product_dtype(dtype))
    testing.assert_within(y, ref, tol, what=f"{backend} {case.id} {dtype}")


@given(case=testing.layer_cases())
def test_random_layers_match_reference(backend, library, dtype, case):
    check_close(case, backend, library, dtype, require_backend(backend))


@pytest.mark.parametrize(("batch", "k", "n", "e"), [
    ((1,), 1, 1, 1), ((3,), 7, 17, 4), ((2, 3), 33, 16, 3), ((5,), 1000, 17, 8), ((64,), 63, 70, 2),
    ((0,), 33, 5, 4), ((2, 0, 3), 9, 4, 2), ((), 40, 9, 4),
], ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_awkward_shapes_match_reference(backend, library, dtype, batch, k, n, e, bias):
    case = testing.random_case(np.random.default_rng(k * 1000 + n), batch, k, n, e, bias)
    check_close(case, backend, library, dtype, require_backend(backend))


@pytest.mark.parametrize(("batch", "k", "n", "e"), [
    ((4,), 1, 3, 1), ((3,), 37, 17, 2), ((2, 2), 100, 33, 4), ((9,), 257, 64, 8), ((1,), 4096, 8, 4),
], ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_dyadic_inputs_are_exact(backend, library, dtype, batch, k, n, e, bias):
    module = require_backend(backend)
    if module.product_dtype(dtype) == "bfloat16" and e > 1:
        pytest.skip("a bfloat16 product rounds x * mean(s_in) (up to 9 significant bits): exact only for E = 1")
    case = testing.dyadic_case(np.random.default_rng(k + n), batch, k, n, e, bias)
    y, args = run(case, backend, library, dtype, module)
    np.testing.assert_array_equal(testing.to_float64(y), testing.round_to(testing.truth(**args), dtype))


def onebit(x, signs, s_in, s_out):
    """((x * s_in) @ B.T) * s_out in float64: the OneBit layer without its LayerNorm."""
    return ((x * s_in) @ signs.T) * s_out


def test_one_expert_is_the_onebit_layer_and_ignores_the_router(backend, library, dtype):
    module = require_backend(backend)
    case = testing.random_case(np.random.default_rng(7), (6,), 45, 19, 1)
    y, args = run(case, backend, library, dtype, module)
    expected = onebit(testing.to_float64(args["x"]), mosbits.unpack(mosbits.pack(case.w), np.float64),
                      testing.to_float64(args["experts"].s_in), testing.to_float64(args["experts"].s_out))
    tol = testing.tolerance(args["x"], args["experts"], args["router"], None, expected, out_dtype=dtype,
                            product_dtype=module.product_dtype(dtype))
    testing.assert_within(y, expected, tol)
    other = dataclasses.replace(case, router=case.router * -3 + 1)
    np.testing.assert_array_equal(testing.to_float64(run(other, backend, library, dtype, module)[0]),
                                  testing.to_float64(y))


def test_identical_experts_make_the_router_irrelevant(backend, library, dtype):
    module = require_backend(backend)
    case = testing.random_case(np.random.default_rng(8), (5,), 70, 12, 4)
    case = dataclasses.replace(case, s_in=np.repeat(case.s_in[:1], 4, 0), s_out=np.repeat(case.s_out[:1], 4, 0))
    y, args = run(case, backend, library, dtype, module)
    expected = onebit(testing.to_float64(args["x"]), mosbits.unpack(mosbits.pack(case.w), np.float64),
                      testing.to_float64(args["experts"].s_in[0]), testing.to_float64(args["experts"].s_out[0]))
    tol = testing.tolerance(args["x"], args["experts"], args["router"], None, expected, out_dtype=dtype,
                            product_dtype=module.product_dtype(dtype))
    testing.assert_within(y, expected, tol)


def test_output_is_linear_in_s_out(backend, library, dtype):
    module = require_backend(backend)
    case = testing.random_case(np.random.default_rng(9), (4,), 33, 17, 3)
    y, _ = run(case, backend, library, dtype, module)
    doubled, _ = run(dataclasses.replace(case, s_out=case.s_out * 2), backend, library, dtype, module)
    np.testing.assert_array_equal(testing.to_float64(doubled), 2 * testing.to_float64(y))
    second = dataclasses.replace(case, s_out=np.flip(case.s_out, axis=1).copy())
    y2, _ = run(second, backend, library, dtype, module)
    summed, args = run(dataclasses.replace(case, s_out=case.s_out + second.s_out), backend, library, dtype, module)
    expected = testing.to_float64(y) + testing.to_float64(y2)
    tol = testing.tolerance(args["x"], args["experts"], args["router"], None, expected, out_dtype=dtype,
                            product_dtype=module.product_dtype(dtype))
    testing.assert_within(summed, expected, 2 * tol)


@pytest.mark.parametrize("k", [4096, 11008])
def test_float32_error_at_llama_widths_is_that_of_float32_arithmetic(backend, library, dtype, k):
    """The second gate (`testing.nmse_ratio`): at K = 4096 the per-element bound admits half-precision gates;
    the normalised error may not exceed NMSE_FACTOR times that of plain float32 NumPy on the same inputs."""
    module = require_backend(backend)
    if dtype != "float32" or module.product_dtype(dtype) != "float32":
        pytest.skip("the NMSE gate holds float32 paths")
    case = testing.random_case(np.random.default_rng(k), (8,), k, 256, 4, True)
    y, args = run(case, backend, library, dtype, module)
    ref = testing.truth(**args)
    baseline = testing.float32_nmse(args["x"], args["packed"], args["experts"], args["router"], args["bias"])
    assert baseline < 1e-11, f"the float64 reference and float32 NumPy arithmetic disagree: NMSE {baseline:.3g}"
    ratio = testing.nmse_ratio(y, ref, baseline)
    assert ratio <= 1, f"{backend} K={k}: NMSE {testing.nmse(y, ref):.3g} is {ratio * testing.NMSE_FACTOR:.3g}x " \
                       f"float32 arithmetic's {baseline:.3g}"
