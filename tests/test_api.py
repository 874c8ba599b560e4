"""Validation in mosbits.matmul and the containers: every rule raises the right type and names the argument."""

import numpy as np
import pytest

import mosbits
from mosbits import testing

N, K, E = 5, 11, 3


def layer(dtype="float32"):
    case = testing.random_case(np.random.default_rng(0), (2,), K, N, E, bias=True)
    return case.arguments("numpy", dtype)


def call(**changes):
    args = {**layer(), **changes}
    return mosbits.matmul(args.pop("x"), args.pop("packed"), args.pop("experts"), args.pop("router"), **args)


f32 = np.float32
BAD_CALLS = {
    "x-wrong-K": (dict(x=np.ones((2, K + 1), f32)), ValueError, ["x", "K = 11", "(2, 12)"]),
    "x-scalar": (dict(x=np.array(1.0, f32)), ValueError, ["x", "(..., K)"]),
    "x-int": (dict(x=np.ones((2, K), np.int32)), TypeError, ["x", "int32"]),
    "x-float64": (dict(x=np.ones((2, K))), TypeError, ["x", "float64"]),
    "x-list": (dict(x=[[1.0] * K]), TypeError, ["x", "list"]),
    "x-dtype-vs-layer": (dict(x=np.ones((2, K), np.float16)), TypeError, ["x", "float16", "cast"]),
    "router-wrong-E": (dict(router=np.ones((E + 1, K), f32)), ValueError, ["router", "(3, 11)", "(4, 11)"]),
    "router-wrong-K": (dict(router=np.ones((E, K - 1), f32)), ValueError, ["router", "(3, 10)"]),
    "router-dtype": (dict(router=np.ones((E, K), np.float16)), TypeError, ["router", "float16", "cast"]),
    "experts-wrong-N": (dict(experts=mosbits.Experts(np.ones((E, K), f32), np.ones((E, N + 2), f32))),
                        ValueError, ["experts.s_out", "(3, 5)", "(3, 7)"]),
    "experts-wrong-K": (dict(experts=mosbits.Experts(np.ones((E, K + 2), f32), np.ones((E, N), f32))),
                        ValueError, ["experts.s_in", "(3, 11)", "(3, 13)"]),
    "bias-length": (dict(bias=np.ones(N + 1, f32)), ValueError, ["bias", "(5,)", "(6,)"]),
    "bias-2d": (dict(bias=np.ones((1, N), f32)), ValueError, ["bias", "(1, 5)"]),
    "bias-dtype": (dict(bias=np.ones(N, np.float16)), TypeError, ["bias", "float16"]),
    "packed-type": (dict(packed=np.zeros((N, 4), np.uint8)), TypeError, ["packed", "PackedSigns"]),
    "experts-type": (dict(experts=(np.ones((E, K), f32), np.ones((E, N), f32))), TypeError, ["experts"]),
    "packed-wrong-K": (dict(packed=mosbits.pack(np.ones((N, K + 40), f32))), ValueError,
                       ["experts.s_in", "(3, 51)"]),
    "backend-unknown": (dict(backend="cuda-magic"), ValueError, ["backend", "cuda-magic", "reference"]),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_call_names_the_argument(name):
    changes, error, words = BAD_CALLS[name]
    with pytest.raises(error) as info:
        call(**changes)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_good_call_passes():
    assert call().shape == (2, N)


@pytest.mark.parametrize(("s_in", "s_out", "error", "words"), [
    (np.ones(K, f32), np.ones((E, N), f32), ValueError, ["s_in", "2-D"]),
    (np.ones((E, K), f32), np.ones((E + 1, N), f32), ValueError, ["same E", "(3, 11)", "(4, 5)"]),
    (np.ones((0, K), f32), np.ones((0, N), f32), ValueError, ["E >= 1"]),
    (np.ones((E, K), np.int8), np.ones((E, N), np.int8), TypeError, ["s_in", "int8"]),
    (np.ones((E, K), f32), np.ones((E, N), np.float16), TypeError, ["share a dtype"]),
    ("s_in", np.ones((E, N), f32), TypeError, ["s_in", "str"]),
], ids=["1d", "E-mismatch", "E-zero", "int", "dtype-mix", "not-array"])
def test_experts_rejects(s_in, s_out, error, words):
    with pytest.raises(error) as info:
        mosbits.Experts(s_in, s_out)
    for word in words:
        assert word in str(info.value)


def test_torch_library_and_device_mismatches():
    pytest.importorskip("torch")
    args = testing.random_case(np.random.default_rng(1), (2,), K, N, E, bias=True).arguments("torch", "float32")
    with pytest.raises(TypeError, match="x is a numpy array but the layer holds torch"):
        mosbits.matmul(args["x"].numpy(), args["packed"], args["experts"], args["router"])
    with pytest.raises(ValueError, match=r"x is on device meta but the layer is on cpu.*\.to\('cpu'\)"):
        mosbits.matmul(args["x"].to("meta"), args["packed"], args["experts"], args["router"])
    with pytest.raises(ValueError, match="router is on device meta but experts are on cpu"):
        mosbits.matmul(args["x"], args["packed"], args["experts"], args["router"].to("meta"))
    with pytest.raises(ValueError, match="bias is on device meta"):
        mosbits.matmul(args["x"], args["packed"], args["experts"], args["router"], bias=args["bias"].to("meta"))
    with pytest.raises(ValueError, match=r"packed.data is on device meta"):
        mosbits.matmul(args["x"], mosbits.PackedSigns(args["packed"].data.to("meta"), (N, K)), args["experts"],
                       args["router"])
    with pytest.raises(ValueError, match="same library and device"):
        mosbits.Experts(args["experts"].s_in, args["experts"].s_out.to("meta"))
    with pytest.raises(TypeError, match=r"router is a numpy array but experts are torch"):
        mosbits.matmul(args["x"], args["packed"], args["experts"], args["router"].numpy())
    with pytest.raises(TypeError, match=r"x has dtype bfloat16 .* cast x to float32"):
        mosbits.matmul(args["x"].bfloat16(), args["packed"], args["experts"], args["router"])


def test_zero_size_batches_keep_their_shape():
    args = layer()
    for shape in [(0, K), (3, 0, K), (0, 0, K)]:
        y = mosbits.matmul(np.ones(shape, f32), args["packed"], args["experts"], args["router"])
        assert y.shape == (*shape[:-1], N) and y.dtype == np.float32


def test_unbatched_vector():
    args = layer()
    y = mosbits.matmul(args["x"][0], args["packed"], args["experts"], args["router"], bias=args["bias"])
    assert y.shape == (N,)
    full = mosbits.matmul(args["x"], args["packed"], args["experts"], args["router"], bias=args["bias"])
    np.testing.assert_array_equal(y, full[0])
