"""The numba backend's dense kernel (`mosbits.backends.numba.dense`) and `mosbits.hf.layers.DecodeLinear`, which
serves a packed model's dense lm_head with it at decode batch sizes: against the float64 product within a bound
derived from K, exact where float32 sums are exact, and never on a call it cannot serve."""

import copy
import pickle
import re

import numpy as np
import pytest
from conftest import REQUIRED

from mosbits import arrays, dispatch, testing

torch = pytest.importorskip("torch")
if not dispatch.spec("numba").is_installed():
    if "numba" in REQUIRED:
        raise ImportError("MOSBITS_TEST_BACKENDS requires numba, which is not installed")
    pytest.skip("numba not installed: pip install 'mosbits[numba]'", allow_module_level=True)
numba_backend = dispatch.load("numba")
mh = pytest.importorskip("mosbits.hf")
from test_fusion import tiny_llama  # noqa: E402

from mosbits.hf import layers  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def case(v, k, m, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(v, k, generator=g) / k ** 0.5).to(dtype)
    x = torch.randn(*m, k, generator=g).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    return x, weight, b


def bound(x, weight, bias, ref, dtype):
    """C sqrt(K) eps_f32 times the mass sum_k |x_k w_vk| + |b_v| (float32 sums), plus the rounding to ``dtype``."""
    x64, w64 = testing.to_float64(x), testing.to_float64(weight)
    mass = np.abs(x64) @ np.abs(w64).T + (0 if bias is None else np.abs(testing.to_float64(bias)))
    k = weight.shape[1]
    return (testing.C * np.sqrt(k) * testing.UNIT_ROUNDOFF["float32"] * mass
            + testing.UNIT_ROUNDOFF[dtype] * np.abs(ref) + testing.HALF_SMALLEST_SUBNORMAL[dtype])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(("v", "k"), [(1, 2), (5, 7), (37, 10), (300, 576), (70, 4096)])
@pytest.mark.parametrize("m", [(1,), (2,), (1, 1), (1, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_matches_the_float64_product(dtype, v, k, m, bias):
    x, weight, b = case(v, k, m, DTYPES[dtype], bias)
    if dtype == "bfloat16" and k % 2:
        assert "with even K" in numba_backend.dense_refusal(x, weight, b)
        return
    with arrays.poisoned_outputs():
        y = numba_backend.dense(x, weight, b)
    assert y.dtype == x.dtype and tuple(y.shape) == (*m, v)
    ref = testing.to_float64(x) @ testing.to_float64(weight).T
    if b is not None:
        ref = ref + testing.to_float64(b)
    testing.assert_within(y, ref, bound(x, weight, b, ref, dtype))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_dense_is_exact_where_float32_sums_are(dtype):
    """Entries in {-1, 0, 1} and K = 130: every partial sum is a small integer, exact in float32 and bfloat16."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-1, 2, (53, 130), generator=g).to(DTYPES[dtype])
    x = torch.randint(-1, 2, (2, 130), generator=g).to(DTYPES[dtype])
    bias = torch.randint(-4, 5, (53,), generator=g).to(DTYPES[dtype])
    expected = x.double() @ weight.double().T + bias.double()
    assert torch.equal(numba_backend.dense(x, weight, bias).double(), expected)


def test_dense_propagates_nan_and_inf():
    x, weight, _ = case(8, 64, (1,), torch.bfloat16, bias=False)
    weight[3, 5] = float("nan")
    weight[4, 7] = float("inf")
    x[0, 7] = 1.0
    y = numba_backend.dense(x, weight)
    assert torch.isnan(y[0, 3]) and torch.isinf(y[0, 4]) and torch.isfinite(y[0, [0, 1, 2, 5, 6, 7]]).all()


def test_dense_refuses_what_it_cannot_serve():
    x, weight, b = case(16, 64, (1,), torch.bfloat16)
    refusals = {
        "must be torch tensors": (x.float().numpy(), weight, b),
        "share one dtype": (x.float(), weight, b),
        "dtype must be one of bfloat16, float32, got torch.float16": (x.half(), weight.half(), b.half()),
        r"x must be \(\.\.\., K\) for weight \(V, K\) = \(16, 64\), got x \(1, 63\)": (x[:, :63], weight, b),
        "weight must be contiguous": (x, weight.T.contiguous().T, b),
        "with even K": (x[:, :63], weight[:, :63].contiguous(), b),
        "at most DENSE_MAX_M = 2 tokens, got 3": (x.expand(3, 64), weight, b),
        "4-byte aligned": (x, torch.cat([weight.new_zeros(1), weight.flatten()])[1:].view(16, 64), b),
    }
    for message, args in refusals.items():
        assert re.search(message, numba_backend.dense_refusal(*args)), message
        with pytest.raises(ValueError, match=message):
            numba_backend.dense(*args)
    trained = weight.clone().requires_grad_()
    assert "not differentiable" in numba_backend.dense_refusal(x, trained, b)
    with torch.no_grad():
        assert numba_backend.dense_refusal(x, trained, b) == ""


def test_packed_models_serve_their_dense_head_where_they_are_built_or_loaded(tmp_path):
    model = tiny_llama(torch.bfloat16)
    assert type(model.lm_head) is layers.DecodeLinear
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == ["lm_head"]
    model.save_pretrained(tmp_path)
    loaded = mh.load(tmp_path)
    assert type(loaded.lm_head) is layers.DecodeLinear
    assert loaded.state_dict().keys() == model.state_dict().keys()
    import transformers

    student = mh.binarize(transformers.LlamaForCausalLM(model.config.get_text_config()), num_experts=2)
    assert type(student.lm_head) is torch.nn.Linear
    assert type(mh.pack(student).lm_head) is layers.DecodeLinear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_head_runs_the_dense_kernel_for_a_token_or_two_and_torch_for_more(dtype, monkeypatch):
    head = tiny_llama(dtype).lm_head
    calls = []
    run = numba_backend.run_dense
    monkeypatch.setattr(numba_backend, "run_dense", lambda *a: calls.append(a[0].shape) or run(*a))
    with torch.no_grad():
        for m, served in ((1, True), (2, True), (3, False)):
            x = torch.randn(1, m, 64).to(dtype)
            calls.clear()
            y = head(x)
            assert bool(calls) == served
            expected = numba_backend.dense(x, head.weight, head.bias) if served else torch.nn.functional.linear(
                x, head.weight, head.bias)
            assert torch.equal(y, expected)
        monkeypatch.setenv("MOSBITS_BACKEND", "torch")
        calls.clear()
        assert torch.equal(head(x[:, :1]), torch.nn.functional.linear(x[:, :1], head.weight))
        assert not calls
    x = torch.randn(1, 1, 64).to(dtype)
    monkeypatch.delenv("MOSBITS_BACKEND")
    head(x).float().sum().backward()
    assert head.weight.grad is not None and not calls


def test_without_numba_the_head_stays_a_plain_linear(monkeypatch):
    installed = dispatch.BackendSpec.is_installed
    monkeypatch.setattr(dispatch.BackendSpec, "is_installed", lambda spec: spec.name != "numba" and installed(spec))
    model = tiny_llama(torch.bfloat16)
    assert type(model.lm_head) is torch.nn.Linear and layers.serve_dense_linears(model) == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_traces_record_the_plain_linear():
    head = tiny_llama(torch.bfloat16).lm_head
    with torch.no_grad():
        traced = torch.jit.trace(head, torch.randn(1, 1, 64, dtype=torch.bfloat16))
        other = torch.randn(1, 1, 64, dtype=torch.bfloat16)
        assert torch.equal(traced(other), torch.nn.functional.linear(other, head.weight))


def test_a_tied_head_stays_tied_and_copies_keep_the_class():
    model = tiny_llama(torch.bfloat16, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.lm_head) is layers.DecodeLinear
        assert clone.lm_head.weight is clone.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(clone.lm_head(x), model.lm_head(x))
