"""The torch backend beyond the shared harness: gradients, and tiling that bounds memory."""

import numpy as np
import pytest

import mosbits
from mosbits import testing

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("mosbits.backends.torch_ops")


def dense_float64(x, signs, s_in, s_out, router, bias):
    """The layer in float64 torch ops on a dense sign matrix: the autograd truth."""
    gates = torch.softmax(x @ router.T, dim=-1)
    return ((x * (gates @ s_in)) @ signs.T) * (gates @ s_out) + bias


def leaf_args(case):
    args = case.arguments("torch", "float32")
    leaves = {"x": args["x"], "s_in": args["experts"].s_in, "s_out": args["experts"].s_out,
              "router": args["router"], "bias": args["bias"]}
    for t in leaves.values():
        t.requires_grad_(True)
    return args["packed"], leaves


def grads_of(fn, leaves, upstream):
    for t in leaves.values():
        t.grad = None
    (fn() * upstream).sum().backward()
    return {name: t.grad.double() for name, t in leaves.items()}


@pytest.mark.parametrize("tile_bytes", [torch_ops.TILE_BYTES, 3 * 128 * 4], ids=["one-tile", "3-row-tiles"])
def test_gradients_match_dense_float64(monkeypatch, tile_bytes):
    monkeypatch.setattr(torch_ops, "TILE_BYTES", tile_bytes)
    case = testing.random_case(np.random.default_rng(0), (2, 3), 100, 17, 4, bias=True)
    packed, leaves = leaf_args(case)
    upstream = torch.randn(2, 3, 17, dtype=torch.float64)
    got = grads_of(lambda: mosbits.matmul(leaves["x"], packed, mosbits.Experts(leaves["s_in"], leaves["s_out"]),
                                          leaves["router"], bias=leaves["bias"], backend="torch").double(),
                   leaves, upstream)
    leaves64 = {name: t.detach().double().requires_grad_(True) for name, t in leaves.items()}
    signs = mosbits.unpack(packed, torch.float64)
    want = grads_of(lambda: dense_float64(leaves64["x"], signs, leaves64["s_in"], leaves64["s_out"],
                                          leaves64["router"], leaves64["bias"]), leaves64, upstream)
    for name in leaves:
        err = torch.linalg.norm(got[name] - want[name]) / torch.linalg.norm(want[name])
        bound = testing.C * testing.UNIT_ROUNDOFF["float32"] * np.sqrt(100 * 17)
        assert err <= bound, f"d/d{name}: relative error {err:.3g} > {bound:.3g}"


def test_tiles_bound_the_unpacked_rows(monkeypatch):
    monkeypatch.setattr(torch_ops, "TILE_BYTES", 5 * 64 * 4)
    k, n = 40, 23
    assert torch_ops.tile_rows(k) == 5
    packed = mosbits.pack(torch.randn(n, k))
    tiles = list(torch_ops._sign_tiles(packed.data, k))
    assert [(n0, n1) for n0, n1, _ in tiles] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert max(t.shape[0] for _, _, t in tiles) == 5
    torch.testing.assert_close(torch.cat([t for _, _, t in tiles]), mosbits.unpack(packed), rtol=0, atol=0)


def test_tiled_forward_matches_reference(monkeypatch):
    monkeypatch.setattr(torch_ops, "TILE_BYTES", 4 * 64 * 4)
    case = testing.random_case(np.random.default_rng(1), (9,), 50, 31, 3, bias=True)
    args = case.arguments("torch", "float32")
    with mosbits.arrays.poisoned_outputs():
        y = mosbits.matmul(**args, backend="torch")
    ref = testing.truth(**args)
    testing.assert_within(y, ref, testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref,
                                                    out_dtype="float32"))


def test_default_tile_stays_near_eight_mib():
    for k in (1, 4096, 11008):
        assert torch_ops.tile_rows(k) * 32 * -(-k // 32) * 4 <= torch_ops.TILE_BYTES
