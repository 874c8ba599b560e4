"""The Triton backend beyond the shared harness: both kernel paths (GEMV and GEMM) on the same cases, the path
rule, the gates kernel, supports(), and the torch operator (opcheck, torch.compile, CUDA graphs).

On a CPU the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 before mosbits.backends.triton
is imported (``nox -s "tests(triton)"`` sets it); bfloat16 and CUDA-only checks are marked ``gpu`` and skipped.
On a GPU: ``MOSBITS_TEST_BACKENDS=triton MOSBITS_TEST_DEVICE=cuda python -m pytest -q``; with
``MOSBITS_TRITON_AUTOTUNE=0`` each kernel compiles one config (4-5 s a test less on an H200: each new
specialisation otherwise compiles and times all 7-8), and `test_every_autotune_config_matches_the_reference`
still runs every config.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEVICE, REQUIRED, require_backend
from hypothesis import given

import mosbits
from mosbits import arrays, reference, testing
from mosbits.format import padding_mask

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from mosbits.backends.triton import _host, _kernels, _op  # noqa: E402

PATHS = ("gemv", "gemm")
ON_CUDA = DEVICE.startswith("cuda") and torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device: MOSBITS_TEST_DEVICE=cuda")
DTYPES = ("float32", "float16", pytest.param("bfloat16", marks=[pytest.mark.gpu, NEEDS_CUDA]))

SHAPES = [
    ((1,), 1, 1, 1), ((3,), 7, 17, 5), ((2, 3), 33, 65, 3), ((5,), 1000, 17, 8), ((24,), 300, 150, 6),
    ((0,), 33, 5, 4), ((2, 0, 3), 9, 4, 2), ((), 40, 9, 7), ((17,), 64, 64, 2), ((2,), 95, 33, 1),
]
"""(batch, K, N, E): ragged K and N, one and several tiles of each kernel along M, N and K, empty batches."""


@pytest.fixture(scope="module")
def tb():
    """The backend module, if it can run on DEVICE (fails instead of skipping when the backend is required)."""
    module = require_backend("triton")
    if not ON_CUDA and not (DEVICE == "cpu" and _kernels.INTERPRET):
        message = (f"the triton backend cannot run on {DEVICE!r} here: set TRITON_INTERPRET=1 (CPU) before "
                   "pytest starts, or MOSBITS_TEST_DEVICE=cuda on a GPU")
        if "triton" in REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return module


def run_path(tb, args, path):
    with arrays.poisoned_outputs():
        y = tb.matmul(args["x"], args["packed"], args["experts"], args["router"], args["bias"], path=path)
    assert y.dtype == args["x"].dtype and y.device == args["x"].device
    return y


def product_dtype(tb, path, dtype):
    """The GEMV path keeps x * s_in in float32, so it is held to the float32 bound in every dtype."""
    return "float32" if path == "gemv" else tb.product_dtype(dtype)


def check_close(tb, case, path, dtype):
    args = case.arguments("torch", dtype, DEVICE)
    y = run_path(tb, args, path)
    ref = testing.truth(**args)
    tol = testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref, out_dtype=dtype,
                            product_dtype=product_dtype(tb, path, dtype))
    testing.assert_within(y, ref, tol, what=f"triton {path} {case.id} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("batch", "k", "n", "e"), SHAPES, ids=str)
def test_paths_match_reference(tb, path, dtype, batch, k, n, e):
    case = testing.random_case(np.random.default_rng(k * 1000 + n), batch, k, n, e, bias=bool(k % 2))
    check_close(tb, case, path, dtype)


@pytest.mark.parametrize("dtype", ("float32", "float16"))
@pytest.mark.parametrize("path", PATHS)
@given(case=testing.layer_cases())
def test_paths_match_reference_on_random_layers(tb, path, dtype, case):
    check_close(tb, case, path, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("batch", "k", "n", "e"), [
    ((4,), 1, 3, 1), ((3,), 37, 17, 2), ((2, 2), 100, 70, 4), ((19,), 257, 64, 8), ((1,), 4096, 8, 4),
    ((33,), 300, 130, 2),
], ids=str)
def test_paths_are_exact_on_dyadic_inputs(tb, path, dtype, batch, k, n, e):
    if product_dtype(tb, path, dtype) == "bfloat16" and e > 1:
        pytest.skip("a bfloat16 product rounds x * mean(s_in) (up to 9 significant bits): exact only for E = 1")
    case = testing.dyadic_case(np.random.default_rng(k + n), batch, k, n, e, bias=bool(n % 2))
    args = case.arguments("torch", dtype, DEVICE)
    y = run_path(tb, args, path)
    np.testing.assert_array_equal(testing.to_float64(y), testing.round_to(testing.truth(**args), dtype))


@pytest.mark.parametrize("path", PATHS)
def test_sign_edge_cases_and_padding_bits(tb, path):
    """Rows of all +1, all -1 and of zeros (which pack as +1); set padding bits past K must be ignored."""
    k = 45
    case = testing.dyadic_case(np.random.default_rng(3), (6,), k, 5, 2, bias=True)
    w = np.stack([np.ones(k), -np.ones(k), np.zeros(k), -np.zeros(k), case.w[0]]).astype(np.float32)
    args = dataclasses.replace(case, w=w).arguments("torch", "float32", DEVICE)
    y = run_path(tb, args, path)
    np.testing.assert_array_equal(testing.to_float64(y), testing.round_to(testing.truth(**args), "float32"))
    dirty = args["packed"].data | args["packed"].data.new_tensor(padding_mask(k))
    with pytest.raises(ValueError, match="padding bits"):
        mosbits.PackedSigns(dirty, (5, k)).validate()
    y_dirty = run_path(tb, {**args, "packed": mosbits.PackedSigns(dirty, (5, k))}, path)
    torch.testing.assert_close(y_dirty, y, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_strided_activations(tb, path):
    """Rows with a stride (read in place) and a transposed x (copied) give the contiguous result."""
    args = testing.random_case(np.random.default_rng(12), (6, 3), 50, 20, 3).arguments("torch", "float32", DEVICE)
    y = run_path(tb, args, path)
    wide = torch.zeros(6, 3, 64, device=DEVICE)
    wide[..., :50] = args["x"]
    torch.testing.assert_close(run_path(tb, {**args, "x": wide[..., :50]}, path), y, rtol=0, atol=0)
    transposed = args["x"].transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(run_path(tb, {**args, "x": transposed}, path), y, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_paths_are_deterministic(tb, path):
    args = testing.random_case(np.random.default_rng(4), (9,), 300, 70, 4).arguments("torch", "float16", DEVICE)
    torch.testing.assert_close(run_path(tb, args, path), run_path(tb, args, path), rtol=0, atol=0)


def test_path_rule(tb, monkeypatch):
    monkeypatch.delenv(tb.PATH_ENV, raising=False)
    assert tb.choose_path(0) == tb.choose_path(_host.GEMV_MAX_M) == "gemv"
    assert tb.choose_path(_host.GEMV_MAX_M + 1) == tb.choose_path(4096) == "gemm"
    assert tb.choose_path(1, "gemm") == "gemm" and tb.choose_path(4096, "gemv") == "gemv"
    monkeypatch.setenv(tb.PATH_ENV, "gemm")
    assert tb.choose_path(1) == "gemm" and tb.choose_path(1, "gemv") == "gemv"
    monkeypatch.setenv(tb.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="MOSBITS_TRITON_PATH must be one of"):
        tb.choose_path(1)
    with pytest.raises(ValueError, match="path must be one of"):
        tb.choose_path(1, "gemm2")
    assert [_host.m_bucket(m) for m in (1, 3, 16, 17, 5000)] == [1, 4, 16, 32, _host.M_BUCKET_MAX]


def test_auto_path_and_variable_pick_the_kernel_bitwise(tb, monkeypatch):
    """Each path rounds differently, so the auto result equals exactly one explicit path's result."""
    monkeypatch.delenv(tb.PATH_ENV, raising=False)
    case = testing.random_case(np.random.default_rng(5), (_host.GEMV_MAX_M + 2,), 333, 40, 4, bias=True)
    args = case.arguments("torch", "float16", DEVICE)
    one = {**args, "x": args["x"][:1]}
    by_path = {path: run_path(tb, args, path) for path in PATHS}
    assert not torch.equal(by_path["gemv"], by_path["gemm"])
    torch.testing.assert_close(mosbits.matmul(**args, backend="triton"), by_path["gemm"], rtol=0, atol=0)
    torch.testing.assert_close(mosbits.matmul(**one, backend="triton"), run_path(tb, one, "gemv"), rtol=0, atol=0)
    monkeypatch.setenv(tb.PATH_ENV, "gemv")
    torch.testing.assert_close(mosbits.matmul(**args, backend="triton"), by_path["gemv"], rtol=0, atol=0)


@pytest.mark.parametrize("e", range(1, 9))
def test_gates_kernel_is_an_fp32_softmax(tb, e):
    rng = np.random.default_rng(e)
    m, k = 37, 1 + 150 * e
    x = rng.standard_normal((m, k)).astype(np.float32)
    router = (rng.standard_normal((e, k)) / np.sqrt(k)).astype(np.float32)
    with arrays.poisoned_outputs():
        g = _host.gates(torch.from_numpy(x).to(DEVICE), torch.from_numpy(router).to(DEVICE))
    assert g.dtype == torch.float32 and g.shape == (m, e)
    ref = reference.softmax(x.astype(np.float64) @ router.astype(np.float64).T)
    logit_mass = np.abs(x).astype(np.float64) @ np.abs(router).T.astype(np.float64)
    bound = testing.C * np.sqrt(k) * testing.UNIT_ROUNDOFF["float32"] * (1 + logit_mass.max(axis=1, keepdims=True))
    testing.assert_within(g, ref, bound * ref, what="gates")


def cpu_args(dtype="float32"):
    return testing.random_case(np.random.default_rng(6), (3,), 40, 9, 2).arguments("torch", dtype, "cpu")


def test_supports_says_why_not(tb, monkeypatch):
    numpy_args = testing.random_case(np.random.default_rng(6), (3,), 40, 9, 2).arguments("numpy", "float32")
    ok, reason = tb.supports(**numpy_args)
    assert not ok and "torch tensors" in reason
    monkeypatch.setattr(_kernels, "INTERPRET", True)
    assert tb.supports(**cpu_args()) == (True, "")
    assert tb.supports(**cpu_args("bfloat16")) == (
        False, "bfloat16 needs a GPU: the Triton interpreter has no bfloat16 arithmetic")
    monkeypatch.setattr(_kernels, "INTERPRET", False)
    ok, reason = tb.supports(**cpu_args())
    assert not ok and "'cuda'" in reason and "TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run this call: .*TRITON_INTERPRET=1"):
        mosbits.matmul(**cpu_args(), backend="triton")


def test_cpu_tensors_outside_the_interpreter_get_a_clear_error():
    """TRITON_INTERPRET is read when the backend is imported: without it, CPU tensors are refused."""
    code = ("import numpy as np, mosbits\n"
            "from mosbits import testing\n"
            "args = testing.random_case(np.random.default_rng(0), (2,), 40, 9, 2).arguments('torch', 'float32')\n"
            "try:\n"
            "    mosbits.matmul(**args, backend='triton')\n"
            "except ValueError as err:\n"
            "    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "backend 'triton' cannot run this call" in out and "set TRITON_INTERPRET=1 before importing" in out


def op_args(case, path, device=DEVICE):
    a = case.arguments("torch", "float32", device)
    return (a["x"], a["packed"].data, a["packed"].shape[1], a["experts"].s_in, a["experts"].s_out, a["router"],
            a["bias"], path)


def test_operator_rejects_bad_arguments(tb):
    x, signs, k, s_in, s_out, router, bias, path = op_args(testing.random_case(np.random.default_rng(7), (2,), 40,
                                                                               9, 2, bias=True), "auto")
    op = torch.ops.mosbits.mos_matmul
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 41\)"):
        op(x, signs, 41, s_in, s_out, router, bias, path)
    with pytest.raises(ValueError, match=r"s_out must have shape \(2, 9\)"):
        op(x, signs, k, s_in, s_out[:, :8], router, bias, path)
    with pytest.raises(TypeError, match=r"router has dtype torch\.float16"):
        op(x, signs, k, s_in, s_out, router.half(), bias, path)
    with pytest.raises(TypeError, match="signs must be uint8"):
        op(x, signs.view(torch.int8), k, s_in, s_out, router, bias, path)
    with pytest.raises(ValueError, match="path must be one of"):
        op(x, signs, k, s_in, s_out, router, bias, "tiled")


@pytest.mark.parametrize("path", PATHS)
def test_operator_passes_opcheck(tb, path):
    case = testing.random_case(np.random.default_rng(8), (2, 3), 40, 17, 3, bias=True)
    results = torch.library.opcheck(torch.ops.mosbits.mos_matmul.default, op_args(case, path))
    assert set(results.values()) == {"SUCCESS"}, results


def test_fake_implementation_gives_shape_and_dtype(tb):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, signs, k, s_in, s_out, router, _, path = op_args(testing.random_case(np.random.default_rng(9), (2,), 40, 9,
                                                                            2), "auto")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (signs, s_in, s_out, router)]
        y = torch.ops.mosbits.mos_matmul(torch.empty(2, 0, 3, k, dtype=torch.float16), fake[0], k,
                                         *(t.half() for t in fake[1:]), None, path)
    assert y.shape == (2, 0, 3, 9) and y.dtype == torch.float16


def test_calls_that_need_gradients_are_declined(tb):
    args = testing.random_case(np.random.default_rng(6), (3,), 40, 9, 2).arguments("torch", "float32", DEVICE)
    x = args["x"].requires_grad_(True)
    ok, reason = tb.supports(**args)
    assert not ok and "no autograd formula" in reason and "backend='torch'" in reason
    with pytest.raises(ValueError, match="no autograd formula"):
        mosbits.matmul(**args, backend="triton")
    with torch.no_grad():
        assert tb.supports(**args) == (True, "")
    y = tb.matmul(x, args["packed"], args["experts"], args["router"], None)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()


def test_torch_compile_traces_the_operator(tb):
    """One compiled graph serves both paths: the path is picked inside the operator from the runtime M."""
    case = testing.random_case(np.random.default_rng(10), (5,), 70, 33, 4, bias=True)
    a = case.arguments("torch", "float16", DEVICE)

    def layer(x):
        return tb.matmul(x, a["packed"], a["experts"], a["router"], a["bias"]) * 2

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="inductor" if ON_CUDA else "aot_eager")
    for rows in (a["x"], a["x"][:1]):
        torch.testing.assert_close(compiled(rows), layer(rows), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 7])
def test_prepared_layers_launch_directly_and_match_the_operator(tb, monkeypatch, rows):
    """A prepared layer skips the operator (its dispatch and checks cost more than the kernels at batch 1 on a
    GPU) and gives the operator's output bit for bit, on both paths and a strided x."""
    a = testing.random_case(np.random.default_rng(12), (rows,), 70, 33, 4, bias=True).arguments(
        "torch", "float16", DEVICE)
    layer = mosbits.prepare(a["packed"], a["experts"], a["router"], a["bias"], backend="triton")
    expected = tb.matmul(a["x"], a["packed"], a["experts"], a["router"], a["bias"])
    wide = a["x"].new_zeros((rows, 140))
    wide[:, ::2] = a["x"]
    monkeypatch.setattr(_op, "mos_matmul", None)  # a call through the operator would fail
    with torch.no_grad():
        torch.testing.assert_close(layer(a["x"]), expected, rtol=0, atol=0)
        torch.testing.assert_close(layer(wide[:, ::2]), expected, rtol=0, atol=0)


def test_prepared_layers_record_the_operator_in_compiled_graphs(tb):
    """Under torch.compile (fullgraph: no break allowed) and torch.jit.trace, a prepared layer calls the
    operator, so that the recorded graph holds it, and computes what the eager call does."""
    a = testing.random_case(np.random.default_rng(13), (5,), 70, 33, 4, bias=True).arguments(
        "torch", "float16", DEVICE)
    layer = mosbits.prepare(a["packed"], a["experts"], a["router"], a["bias"], backend="triton")
    with torch.no_grad():
        eager = layer(a["x"])
        compiled = torch.compile(lambda x: layer(x) * 2, fullgraph=True, dynamic=True,
                                 backend="inductor" if ON_CUDA else "aot_eager")
        torch.testing.assert_close(compiled(a["x"]), eager * 2, rtol=0, atol=0)
        traced = torch.jit.trace(lambda x: layer(x) * 2, a["x"])
        assert "mosbits::mos_matmul" in str(traced.graph)
        torch.testing.assert_close(traced(a["x"]), eager * 2, rtol=0, atol=0)


def test_autotune_has_one_config_in_the_interpreter_and_several_on_a_gpu(tb):
    assert not (_kernels.INTERPRET and _kernels.AUTOTUNE)
    for kernel in (_kernels.gemv_kernel, _kernels.gemm_kernel):
        assert (len(kernel.configs) == 1) == (not _kernels.AUTOTUNE)


@pytest.mark.parametrize(("value", "expected"), [(None, "True 7 8"), ("0", "False 1 1"), ("1", "True 7 8")])
def test_autotune_can_be_turned_off_for_fast_gpu_tests(value, expected):
    """MOSBITS_TRITON_AUTOTUNE=0 (read at import) leaves each kernel one config, outside the interpreter too."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _kernels.AUTOTUNE_ENV)}
    if value is not None:
        env[_kernels.AUTOTUNE_ENV] = value
    code = ("from mosbits.backends.triton import _kernels as k; "
            "print(k.AUTOTUNE, len(k.gemv_kernel.configs), len(k.gemm_kernel.configs))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == expected, result.stderr[-2000:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("path", "index"), [("gemv", i) for i in range(len(_kernels.GEMV_CONFIGS))]
                         + [("gemm", i) for i in range(len(_kernels.GEMM_CONFIGS))])
def test_every_autotune_config_matches_the_reference(tb, path, index, dtype):
    """Each config the autotuner may pick, run on its own (so that GPU runs may set MOSBITS_TRITON_AUTOTUNE=0 for
    the rest of the suite): ragged K and N, several blocks of N, and for the GEMM two or more M tiles."""
    config = (_kernels.GEMV_CONFIGS if path == "gemv" else _kernels.GEMM_CONFIGS)[index]
    case = testing.random_case(np.random.default_rng(index), (3 if path == "gemv" else 40,), 300, 150, 3, bias=True)
    a = case.arguments("torch", dtype, DEVICE)
    y = _host.launch(a["x"], a["packed"].data.view(torch.int32), 300, a["experts"].s_in, a["experts"].s_out,
                     a["router"], a["bias"], path, config)
    ref = testing.truth(**a)
    tol = testing.tolerance(a["x"], a["experts"], a["router"], a["bias"], ref, out_dtype=dtype,
                            product_dtype=product_dtype(tb, path, dtype))
    testing.assert_within(y, ref, tol, what=f"triton {path} config {config} {dtype}")


COMPILE_FOR_GPU = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mosbits.backends.triton import _kernels as kernels

assert not kernels.INTERPRET
pointers = {"gates_ptr": "*fp32", "words_ptr": "*i32"}
gates_config = triton.Config({"BLOCK_E": 4, "BLOCK_M": 16, "BLOCK_K": 128})
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for kernel, configs in ((kernels.gates_kernel, [gates_config]),
                                *((tuned.fn, [configs[0], configs[-1]]) for tuned, configs in (
                                    (kernels.gemv_kernel, kernels.GEMV_CONFIGS),
                                    (kernels.gemm_kernel, kernels.GEMM_CONFIGS)))):
            constants = {"NUM_EXPERTS": 3, "HAS_BIAS": True, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            for config in configs:
                constants.update(config.kwargs)
                signature = {p.name: "constexpr" if p.is_constexpr else
                             pointers.get(p.name, f"*{dtype}") if p.name.endswith("_ptr") else "i32"
                             for p in kernel.params}
                source = ASTSource(kernel, signature, {k: v for k, v in constants.items() if k in signature})
                triton.compile(source, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": config.num_warps, "num_stages": config.num_stages})
print("compiled")
"""


def test_kernels_compile_for_ampere_and_hopper():
    """Triton's bundled ptxas builds the GPU kernels (the first and the last autotune config) without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], env={**env, "TRITON_DEFAULT_FP_FUSION": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", (1, 16))
@pytest.mark.gpu
@NEEDS_CUDA
def test_cuda_graph_replays_the_layer(tb, path, dtype, m):
    case = testing.random_case(np.random.default_rng(11), (m,), 1000, 300, 4, bias=True)
    a = case.arguments("torch", dtype, DEVICE)
    static_x = a["x"].clone()
    run_path(tb, {**a, "x": static_x}, path)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tb.matmul(static_x, a["packed"], a["experts"], a["router"], a["bias"], path=path)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_y, run_path(tb, {**a, "x": new_x}, path), rtol=0, atol=0)


@pytest.mark.parametrize("m", (1, 16))
@pytest.mark.gpu
@NEEDS_CUDA
def test_cuda_graph_replays_a_prepared_layer(tb, m):
    """The prepared layer's direct launches (no operator) are captured and replayed as the eager call runs."""
    a = testing.random_case(np.random.default_rng(14), (m,), 1000, 300, 4, bias=True).arguments(
        "torch", "bfloat16", DEVICE)
    layer = mosbits.prepare(a["packed"], a["experts"], a["router"], a["bias"], backend="triton")
    static_x = a["x"].clone()
    with torch.no_grad():
        layer(static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_y, layer(new_x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("m", (1, 16, 512))
@pytest.mark.gpu
@NEEDS_CUDA
def test_llama_shapes_pass_the_benchmark_gate(tb, dtype, m):
    from mosbits.perf import workloads

    for shape in workloads.LLAMA_7B_SHAPES.values():
        workload = workloads.make_workload("triton", shape, m, 4, dtype, device=DEVICE)
        assert workload.gate() <= 1.0, (shape, m, dtype)
