"""Weights changed in place reach the next call: nothing a backend derives from the signs or scales may outlive them.

The repro of the stale-layout bug: a `PackedMoSLinear` called once on the CPU (numba), then given inverted signs and
doubled output scales by ``load_state_dict``, returned its first output again (the numba row blocks were cached
per ``id()`` of the signs tensor). Every update a user makes in place (``load_state_dict``, ``.copy_()``,
``model.to(dtype)``) is followed by a call on each backend and precision, against the float64 reference.
"""

import numpy as np
import pytest
from conftest import BACKENDS, require_backend

import mosbits
from mosbits import arrays, dispatch, testing

torch = pytest.importorskip("torch")
mh = pytest.importorskip("mosbits.hf")

E, K, N = 4, 256, 64
PRECISION_BACKENDS = [(b, p) for b in BACKENDS if b != "reference" for p in dispatch.BACKENDS[b].precisions]
"""The reference runs NumPy arrays only, so a torch module never reaches it."""


def packed_layer(seed=0, dtype=torch.float32):
    """A PackedMoSLinear (K = 256, N = 64, E = 4) with random signs, positive scales, a router and a bias."""
    g = torch.Generator().manual_seed(seed)
    layer = mh.PackedMoSLinear(K, N, E, bias=True, dtype=dtype)
    with torch.no_grad():
        layer.signs.copy_(mosbits.pack(torch.randn(N, K, generator=g)).data)
        layer.s_in.copy_(torch.rand(E, K, generator=g) + 0.5)
        layer.s_out.copy_(torch.rand(E, N, generator=g) + 0.5)
        layer.router.copy_(torch.randn(E, K, generator=g) / 16)
        layer.bias.copy_(torch.randn(N, generator=g))
    return layer


def check_against_reference(layer, x, backend, precision, what):
    packed, experts, router, bias = layer.matmul_args()
    with torch.no_grad():
        y = layer(x)
    ref = testing.truth(x, packed, experts, router, bias)
    module = dispatch.load(backend)
    dtype = arrays.dtype_name(x)
    if precision == "fast":
        tol = testing.fast_tolerance(x, experts, router, bias, ref, out_dtype=dtype)
    else:
        tol = testing.tolerance(x, experts, router, bias, ref, out_dtype=dtype,
                                product_dtype=module.product_dtype(dtype))
    testing.assert_within(y, ref, tol, what)


def inverted_state(layer):
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["signs"] = ~state["signs"]  # K = 256 fills whole words: no padding bits to keep at 0
    state["s_out"] = state["s_out"] * 2
    return state


@pytest.fixture(params=PRECISION_BACKENDS, ids=[f"{b}-{p}" for b, p in PRECISION_BACKENDS])
def backend(request, monkeypatch):
    name, precision = request.param
    require_backend(name)
    monkeypatch.setenv("MOSBITS_BACKEND", name)
    return name, precision


def test_load_state_dict_after_a_call(backend):
    name, precision = backend
    layer = packed_layer()
    layer.precision = precision
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = layer(x)
    layer.load_state_dict(inverted_state(layer))
    assert layer.prepared().backend == name
    check_against_reference(layer, x, name, precision, f"{name} {precision} after load_state_dict")
    with torch.no_grad():
        assert not torch.equal(layer(x), first)


def test_copy_into_each_buffer_after_a_call(backend):
    name, precision = backend
    layer, donor = packed_layer(0), packed_layer(7)
    layer.precision = precision
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(2))
    for buffer in ("signs", "s_in", "s_out", "router", "bias"):
        with torch.no_grad():
            layer(x)
            getattr(layer, buffer).copy_(getattr(donor, buffer))
        check_against_reference(layer, x, name, precision, f"{name} {precision} after {buffer}.copy_")


def test_model_to_dtype_after_a_call(backend):
    name, precision = backend
    model = torch.nn.Sequential(packed_layer())
    model[0].precision = precision
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x)
    model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    if not dispatch.load(name).supports(xb, *model[0].matmul_args())[0]:
        pytest.skip(f"{name} does not run bfloat16 here")
    check_against_reference(model[0], xb, name, precision, f"{name} {precision} after model.to(bfloat16)")


def test_numpy_signs_changed_in_place_between_matmul_calls():
    """`mosbits.matmul` derives nothing that outlives the call: a NumPy array flipped in place is seen."""
    require_backend("numba")
    case = testing.random_case(np.random.default_rng(0), (3,), K, N, E, True)
    args = case.arguments("numpy", "float32")
    mosbits.matmul(**args, backend="numba")
    args["packed"].data[:] = ~args["packed"].data
    y = mosbits.matmul(**args, backend="numba")
    ref = testing.truth(**args)
    tol = testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype="float32",
                            product_dtype="float32")
    testing.assert_within(y, ref, tol, "numba after flipping the NumPy signs in place")
