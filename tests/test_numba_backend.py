"""The Numba backend beyond the shared harness: every kernel (each instruction set's lookup path, and the
gemm path) through the harness's checks, the fast mode of each instruction set against its error bound, its
exact cases and its NMSE target, the forcing rules, the derived layout, and the refusal of tensors that need
gradients."""

import dataclasses

import numpy as np
import pytest
from conftest import REQUIRED
from hypothesis import given
from test_backends import check_close, run

import mosbits
from mosbits import arrays, dispatch, testing
from mosbits.perf import workloads

if not dispatch.spec("numba").is_installed():
    if "numba" in REQUIRED:
        raise ImportError("MOSBITS_TEST_BACKENDS requires numba, which is not installed")
    pytest.skip("numba not installed: pip install 'mosbits[numba]'", allow_module_level=True)

numba_backend = dispatch.load("numba")
from mosbits.backends.numba import layout  # noqa: E402

ISAS = numba_backend.host_isas()
KERNELS = [(isa, "lookup") for isa in ISAS] + [(None, "gemm")]
KERNEL_IDS = [f"{isa}-lookup" for isa in ISAS] + ["gemm"]
LIBRARIES = [("numpy", "float32"), ("numpy", "float16")]
if dispatch.spec("torch").is_installed():
    LIBRARIES += [("torch", "float32"), ("torch", "bfloat16")]


@pytest.fixture(params=KERNELS, ids=KERNEL_IDS)
def forced(request, monkeypatch):
    """Each kernel path in turn; the gemm path with small tiles so that every case spans several."""
    monkeypatch.setattr(numba_backend, "GEMM_TILE_BYTES", 3 * 4 * 32)
    isa, path = request.param
    with numba_backend.forced(isa, path):
        yield request.param


@pytest.mark.parametrize(("library", "dtype"), LIBRARIES, ids=[f"{lib}-{d}" for lib, d in LIBRARIES])
@pytest.mark.parametrize(("isa", "path"), KERNELS, ids=KERNEL_IDS)
@given(case=testing.layer_cases())
def test_every_kernel_matches_reference(isa, path, library, dtype, case):
    """The lookups keep x * s_in in float32 for every input dtype, so they are held to the float32 bound; only
    the gemm path rounds bfloat16 inputs' x * s_in to bfloat16 (`product_dtype`)."""
    with numba_backend.forced(isa, path):
        y, args = run(case, "numba", library, dtype, numba_backend)
    ref = testing.truth(**args)
    product = numba_backend.product_dtype(dtype) if path == "gemm" else "float32"
    tol = testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype=dtype,
                            product_dtype=product)
    testing.assert_within(y, ref, tol, what=f"numba {isa} {path} {case.id} {dtype}")


@pytest.mark.parametrize(("batch", "k", "n", "e"), [
    ((1,), 1, 1, 1), ((2,), 33, 17, 3), ((37,), 100, 40, 4), ((5, 3), 257, 16, 8), ((1,), 4096, 33, 4),
    ((9,), 63, 1, 2), ((0,), 64, 9, 2),
], ids=lambda v: str(v))
def test_every_kernel_on_awkward_shapes(forced, batch, k, n, e):
    for bias in (False, True):
        check_close(testing.random_case(np.random.default_rng(n), batch, k, n, e, bias), "numba", "numpy",
                    "float32", numba_backend)


@pytest.mark.parametrize(("batch", "k", "n", "e"), [((6,), 37, 17, 2), ((11,), 1000, 33, 4), ((1,), 4096, 16, 8)],
                         ids=lambda v: str(v))
def test_every_kernel_is_exact_on_dyadic_inputs(forced, batch, k, n, e):
    case = testing.dyadic_case(np.random.default_rng(k), batch, k, n, e, bias=True)
    y, args = run(case, "numba", "numpy", "float32", numba_backend)
    np.testing.assert_array_equal(y, testing.truth(**args).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_lookups_are_exact_on_dyadic_inputs(isa):
    """Below the gemm path's batch sizes bfloat16 inputs take the float32 lookups, which round only the output."""
    pytest.importorskip("torch")
    m = min(numba_backend.GEMM_MIN_M, numba_backend.BF16_GEMM_MIN_M) - 1
    case = testing.dyadic_case(np.random.default_rng(m), (m,), 1000, 33, 4, bias=True)
    with numba_backend.forced(isa):
        y, args = run(case, "numba", "torch", "bfloat16", numba_backend)
    np.testing.assert_array_equal(testing.to_float64(y), testing.round_to(testing.truth(**args), "bfloat16"))


def check_fast(case, library, dtype):
    """The fast mode within `testing.fast_tolerance` of the reference, on a NaN-poisoned output."""
    args = case.arguments(library, dtype)
    with arrays.poisoned_outputs():
        y = mosbits.matmul(**args, backend="numba", precision="fast")
    assert arrays.library(y) == library and arrays.dtype_name(y) == dtype
    ref = testing.truth(**args)
    tol = testing.fast_tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype=dtype)
    testing.assert_within(y, ref, tol, what=f"numba fast {case.id} {dtype}")
    return y, ref


@pytest.mark.parametrize(("library", "dtype"), LIBRARIES, ids=[f"{lib}-{d}" for lib, d in LIBRARIES])
@pytest.mark.parametrize("isa", ISAS)
@given(case=testing.layer_cases(max_k=2100))
def test_fast_mode_stays_within_its_bound(isa, library, dtype, case):
    with numba_backend.forced(isa):
        check_fast(case, library, dtype)


@pytest.mark.parametrize(("batch", "k", "n", "e"), [
    ((1,), 1, 1, 1), ((2,), 33, 17, 3), ((37,), 100, 40, 4), ((5, 3), 1025, 65, 8), ((1,), 4096, 33, 4),
    ((9,), 2500, 1, 2), ((0,), 64, 9, 2), ((3,), 2048, 128, 4),
], ids=lambda v: str(v))
@pytest.mark.parametrize("isa", ISAS)
def test_fast_mode_on_awkward_shapes(isa, batch, k, n, e):
    case = testing.random_case(np.random.default_rng(n), batch, k, n, e, bias=True)
    if case.x.size:
        case.x[(0,) * (case.x.ndim - 1)] = 0
    with numba_backend.forced(isa):
        check_fast(case, "numpy", "float32")


@pytest.mark.parametrize(("batch", "k", "n"), [((4,), 1, 3), ((3,), 37, 70), ((2,), 1024, 64), ((5,), 3000, 33)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("isa", ISAS)
def test_fast_mode_is_exact_on_a_unit_grid(isa, batch, k, n):
    case = testing.fast_exact_case(np.random.default_rng(k), batch, k, n, bias=True)
    with numba_backend.forced(isa):
        y = mosbits.matmul(**case.arguments("numpy", "float32"), backend="numba", precision="fast")
    np.testing.assert_array_equal(y, testing.truth(**case.arguments("numpy", "float32")).astype(np.float32))


def test_a_peaked_router_with_subnormal_gates_stays_within_tolerance(forced):
    """Logits 1e3 apart leave gates far below 2^-126, which the kernels flush to zero."""
    case = testing.random_case(np.random.default_rng(7), (5,), 300, 20, 4, bias=True)
    case = dataclasses.replace(case, router=case.router * np.float32(3000))
    check_close(case, "numba", "numpy", "float32", numba_backend)


def test_auto_runs_the_fast_mode_on_numba():
    args = testing.random_case(np.random.default_rng(3), (2,), 300, 20, 2).arguments("numpy", "float32")
    np.testing.assert_array_equal(mosbits.matmul(**args, precision="fast"),
                                  mosbits.matmul(**args, backend="numba", precision="fast"))
    layer = mosbits.MoSLinearWeights(args["packed"], args["experts"], args["router"], args["bias"])
    np.testing.assert_array_equal(layer(args["x"], precision="fast"),
                                  mosbits.matmul(**args, backend="numba", precision="fast"))


FAST_NMSE = 1e-4
"""The fast mode's target: normalised mean squared error against the reference on random inputs."""


@pytest.mark.parametrize(("n", "k"), [(512, 4096), (256, 11008)], ids=lambda v: str(v))
@pytest.mark.parametrize("isa", ISAS)
def test_fast_mode_nmse_on_random_layers(isa, n, k):
    """On the benchmark's layers (N(0, 1) inputs) and the harness's random cases, M = 8."""
    rng = np.random.default_rng(k)
    layer = workloads.random_layer(rng, n, k, 4, "numpy", "float32")
    case = testing.random_case(rng, (8,), k, n, 4).arguments("numpy", "float32")
    for args in ({"x": rng.standard_normal((8, k)).astype(np.float32), "packed": layer.packed,
                  "experts": layer.experts, "router": layer.router}, case):
        with numba_backend.forced(isa):
            y = mosbits.matmul(**args, backend="numba", precision="fast")
        assert testing.nmse(y, testing.truth(**args)) <= FAST_NMSE


def test_a_forced_isa_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(numba_backend, "host_isas", lambda: ["portable"])
    args = testing.random_case(np.random.default_rng(0), (2,), 40, 9, 2).arguments("numpy", "float32")
    with numba_backend.forced("avx512"), pytest.raises(ValueError, match="this CPU supports only portable"):
        mosbits.matmul(**args, backend="numba")
    monkeypatch.setenv(numba_backend.ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="'sse9' is not one of avx512, avx2, portable"):
        mosbits.matmul(**args, backend="numba")


def test_the_batch_size_picks_the_path(monkeypatch):
    assert numba_backend.selected_path(numba_backend.GEMM_MIN_M - 1, "portable") == ("lookup", "")
    assert numba_backend.selected_path(numba_backend.GEMM_MIN_M, "portable") == ("gemm", "")
    assert numba_backend.selected_path(10_000, "avx2") == ("lookup", "")
    assert numba_backend.selected_path(numba_backend.BF16_GEMM_MIN_M - 1, "avx512", bf16=True) == ("lookup", "")
    assert numba_backend.selected_path(numba_backend.BF16_GEMM_MIN_M, "avx512", bf16=True) == ("gemm", "")
    monkeypatch.setenv(numba_backend.PATH_ENV_VAR, "lookup")
    assert numba_backend.selected_path(10_000, "portable") == ("lookup", "")
    monkeypatch.setenv(numba_backend.PATH_ENV_VAR, "dense")
    args = testing.random_case(np.random.default_rng(0), (2,), 40, 9, 2).arguments("numpy", "float32")
    with pytest.raises(ValueError, match="'dense' is not one of lookup, gemm"):
        mosbits.matmul(**args, backend="numba")


def test_tensors_that_need_gradients_go_to_the_torch_backend():
    torch = pytest.importorskip("torch")
    args = testing.random_case(np.random.default_rng(0), (2,), 40, 9, 2).arguments("torch", "float32")
    args["x"].requires_grad_(True)
    with pytest.raises(ValueError, match="not differentiable"):
        mosbits.matmul(**args, backend="numba")
    mosbits.matmul(**args).sum().backward()
    assert args["x"].grad is not None and torch.isfinite(args["x"].grad).all()
    with torch.no_grad():
        mosbits.matmul(**args, backend="numba")


@pytest.mark.parametrize("lanes", [8, 16])
def test_row_blocks_transpose_bytes_within_blocks(lanes):
    data = np.random.default_rng(lanes).integers(0, 256, (21, 12), dtype=np.uint8)
    blocks = layout.row_blocks(data, lanes)
    assert blocks.shape == (-(-21 // lanes), 12 * lanes)
    for n in range(21):
        for j in range(12):
            assert blocks[n // lanes, lanes * j + n % lanes] == data[n, j]
    assert not blocks.reshape(-1, 12, lanes).transpose(0, 2, 1).reshape(-1, 12)[21:].any()


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("isa", ISAS)
def test_several_blocks_of_tokens_at_k_4096(isa, precision):
    """Tables are built per block of TABLE_BYTES (64 tokens at K = 4096): 70 tokens take the loop twice, and
    the second block must land in rows 64..69 of the output."""
    kp = 4096
    step = max(1, numba_backend._kernels.TABLE_BYTES // (16 * kp))
    args = testing.random_case(np.random.default_rng(65), (step + 6,), kp, 40, 4, True).arguments("numpy",
                                                                                                  "float32")
    with numba_backend.forced(isa, "lookup"), arrays.poisoned_outputs():
        y = mosbits.matmul(**args, backend="numba", precision=precision)
    ref = testing.truth(**args)
    tolerance = testing.fast_tolerance if precision == "fast" else testing.tolerance
    tol = tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype="float32")
    testing.assert_within(y, ref, tol, what=f"numba {isa} {precision} M={step + 6} K={kp}")


def test_bfloat16_tiles_past_the_first():
    """The bfloat16 gemm path unpacks BF16_TILE_ROWS rows at a time: N = 1100 and 64 tokens take two tiles."""
    pytest.importorskip("torch")
    m, n = numba_backend.BF16_GEMM_MIN_M, numba_backend.BF16_TILE_ROWS + 76
    assert numba_backend.selected_path(m, ISAS[0], bf16=True) == ("gemm", "")
    case = testing.random_case(np.random.default_rng(n), (m,), 100, n, 4, True)
    y, args = run(case, "numba", "torch", "bfloat16", numba_backend)
    ref = testing.truth(**args)
    tol = testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype="bfloat16",
                            product_dtype="bfloat16")
    testing.assert_within(y, ref, tol, what=f"numba bfloat16 gemm M={m} N={n}")


def test_bfloat16_patterns_round_as_torch_rounds():
    """The bfloat16 lookup path converts in and out inside the compiled call: bit for bit torch's round to
    nearest even on every finite value and infinity (random bit patterns, ties, subnormals), NaN stays NaN."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    values = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint32).view(np.float32),
        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2.0**-149, -(2.0**-133), 3.4e38, np.inf, -np.inf, 0.0, -0.0,
                  np.nan], np.float32)])
    bits = np.empty((1, values.size), np.int16)
    numba_backend._kernels.float32_to_bfloat16(values[None, :].copy(), values.size, bits)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(bits[0][finite], expected[finite])
    back = np.empty((1, values.size), np.float32)
    numba_backend._kernels.bfloat16_to_float32(bits, back)
    np.testing.assert_array_equal(back[0], torch.from_numpy(bits[0]).view(torch.bfloat16).float().numpy())
    assert np.isnan(back[0][~finite]).all()
