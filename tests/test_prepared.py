"""Prepared layers: the same result as mosbits.matmul on every backend, bad inputs still refused with
mosbits.matmul's messages, and no silent change of backend."""

import numpy as np
import pytest

import mosbits
from mosbits import arrays, dispatch, testing

BACKENDS = [name for name in mosbits.backends.available() if name != "triton"]


def case_args(library="numpy", dtype="float32", bias=True):
    return testing.random_case(np.random.default_rng(5), (3,), 70, 20, 4, bias).arguments(library, dtype)


def layer_of(args):
    return {key: value for key, value in args.items() if key != "x"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_layers_equal_matmul(backend):
    library = dispatch.spec(backend).libraries[0]
    for precision in dispatch.spec(backend).precisions:
        for bias in (False, True):
            args = case_args(library, bias=bias)
            layer = mosbits.prepare(**layer_of(args), backend=backend, precision=precision)
            assert layer.backend == backend and layer.precision == precision
            expected = mosbits.matmul(**args, backend=backend, precision=precision)
            got = layer(args["x"])
            assert arrays.library(got) == library
            np.testing.assert_array_equal(testing.to_float64(got), testing.to_float64(expected))


def test_auto_is_resolved_once_for_the_layers_arrays():
    args = case_args()
    layer = mosbits.MoSLinearWeights(**layer_of(args)).prepare()
    assert layer.backend == ("numba" if "numba" in BACKENDS else "reference")
    assert "PreparedLayer(N=20, K=70" in repr(layer)


def test_bad_inputs_get_matmul_messages():
    args = case_args()
    layer = mosbits.prepare(**layer_of(args), backend="reference")
    with pytest.raises(TypeError, match="x has dtype float16 but the layer"):
        layer(args["x"].astype(np.float16))
    with pytest.raises(ValueError, match=r"x must have shape \(..., K\) with K = 70"):
        layer(args["x"][:, :69])
    with pytest.raises(TypeError, match="x: "):
        layer([[1.0] * 70])
    with pytest.raises(ValueError, match="backend 'reference' has no precision='fast'"):
        mosbits.prepare(**layer_of(args), backend="reference", precision="fast")
    with pytest.raises(ValueError, match="router must have shape"):
        mosbits.prepare(args["packed"], args["experts"], args["router"][:, :5])


def test_a_prepared_backend_never_switches():
    torch = pytest.importorskip("torch")
    if "numba" not in BACKENDS:
        pytest.skip("numba not installed")
    args = case_args("torch")
    layer = mosbits.prepare(**layer_of(args))
    assert layer.backend == "numba"
    with pytest.raises(ValueError, match=r"backend .numba. cannot run this call: .*not differentiable"):
        layer(args["x"].requires_grad_(True))
    with torch.no_grad():
        assert layer(args["x"]).shape == (3, 20)
