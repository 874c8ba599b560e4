"""Layers that read one input, served by one call: `mosbits.prepare_group`, the numba backend's group kernel and
the HF adapter's `SharedInput` plan. Every shared output must equal the layer's own call bit for bit, and no
kept output may reach a call it was not computed for."""

import copy
import pickle

import numpy as np
import pytest

import mosbits
from mosbits import arrays, dispatch, testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mh = pytest.importorskip("mosbits.hf")
from conftest import require_backend  # noqa: E402

from mosbits.hf import fusion  # noqa: E402

BACKENDS = [name for name in mosbits.backends.available() if name != "triton"]
NUMPY_BACKEND = "numba" if "numba" in BACKENDS else "reference"
"""A backend that takes NumPy arrays, with the fast precision where numba is installed."""
SHAPES = ((40, 70), (24, 70), (9, 70))
"""N x K of three layers that read one input (K = 70: a partial last group and padding bits)."""


def group_args(library="numpy", dtype="float32", experts=(4, 4, 1), m=3, seed=5):
    """x (m, K) and the layer arguments (without x) of three layers on that input."""
    rng = np.random.default_rng(seed)
    layers, x = [], None
    for (n, k), e in zip(SHAPES, experts, strict=True):
        args = testing.random_case(rng, (m,), k, n, e, True).arguments(library, dtype)
        first = args.pop("x")
        x = first if x is None else x
        layers.append(args)
    return x, layers


def equal(a, b):
    np.testing.assert_array_equal(testing.to_float64(a), testing.to_float64(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_returns_each_layers_own_output(backend):
    module = require_backend(backend)
    kinds = [(library, dtype) for library in dispatch.spec(backend).libraries
             for dtype in (("float32", "bfloat16") if library == "torch" else ("float32",))]
    for precision in dispatch.spec(backend).precisions:
        for library, dtype in kinds:
            for m in (1, 2, 5, 70):
                x, layers = group_args(library, dtype, m=m)
                prepared = [mosbits.prepare(**args, backend=backend, precision=precision) for args in layers]
                group = mosbits.prepare_group(prepared)
                with arrays.poisoned_outputs():
                    outputs = group(x)
                assert len(outputs) == 3
                for got, layer, args in zip(outputs, prepared, layers, strict=True):
                    assert got.dtype == x.dtype and tuple(got.shape) == (m, layer.shape[0])
                    equal(got, layer(x))
                    within_reference(got, x, args, dtype, precision, module)


def within_reference(y, x, args, dtype, precision, module):
    ref = testing.truth(x, **args)
    bound = testing.tolerance if precision == "exact" else testing.fast_tolerance
    extra = {"product_dtype": module.product_dtype(dtype)} if precision == "exact" else {}
    tol = bound(x, args["experts"], args["router"], args["bias"], ref, out_dtype=dtype, **extra)
    testing.assert_within(y, ref, tol, what=f"{module.__name__} {precision} {dtype} N = {ref.shape[-1]}")


def test_the_numba_group_kernel_serves_every_isa_and_path():
    numba_backend = require_backend("numba")
    for isa in numba_backend.host_isas():
        for path in ("lookup", "gemm"):
            for dtype in ("float32", "bfloat16"):
                x, layers = group_args("torch", dtype, m=4)
                with numba_backend.forced(isa=isa, path=path):
                    prepared = [mosbits.prepare(**args, backend="numba") for args in layers]
                    group = mosbits.prepare_group(prepared)
                    for got, layer in zip(group(x), prepared, strict=True):
                        equal(got, layer(x))


def test_a_group_needs_layers_that_can_share_a_call():
    _, layers = group_args()
    backend = NUMPY_BACKEND
    prepared = [mosbits.prepare(**args, backend=backend) for args in layers]
    with pytest.raises(TypeError, match="non-empty list of PreparedLayer"):
        mosbits.prepare_group([])
    with pytest.raises(TypeError, match="non-empty list of PreparedLayer"):
        mosbits.prepare_group([prepared[0], layers[1]])
    other_k = testing.random_case(np.random.default_rng(1), (3,), 64, 8, 4, True).arguments("numpy", "float32")
    del other_k["x"]
    with pytest.raises(ValueError, match="must share backend, precision, K"):
        mosbits.prepare_group([prepared[0], mosbits.prepare(**other_k, backend=backend)])
    if "fast" in dispatch.spec(backend).precisions:
        with pytest.raises(ValueError, match="must share backend, precision, K"):
            mosbits.prepare_group([prepared[0], mosbits.prepare(**layers[1], backend=backend, precision="fast")])


def test_a_group_checks_an_unusual_input_in_full():
    x, layers = group_args()
    group = mosbits.prepare_group([mosbits.prepare(**args, backend=NUMPY_BACKEND) for args in layers])
    with pytest.raises(ValueError, match=r"x must have shape \(..., K\) with K = 70"):
        group(x[:, :69])
    with pytest.raises(TypeError, match="x has dtype float16 but the layer"):
        group(x.astype(np.float16))


def tiny_llama(dtype=torch.float32, seed=0, tie=False):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return mh.random_packed(config, num_experts=4, dtype=dtype, seed=seed)


def shared(layer):
    """The layer's `SharedInput`, or None."""
    return layer.__dict__.get("_shared_input")


def groups_of(model):
    return {id(g): g for m in model.modules() if (g := shared(m)) is not None}


def unlinked(model):
    model = copy.deepcopy(model)
    for m in model.modules():
        m.__dict__.pop("_shared_input", None)
    return model


def test_packed_models_are_linked_where_they_are_built_or_loaded(tmp_path):
    model = tiny_llama()
    groups = groups_of(model)
    names = sorted(tuple(n.rpartition(".")[2] for n in (name for name, m in model.named_modules()
                                                         if m in g.members)) for g in groups.values())
    assert names == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert fusion.share_inputs(model) == 4 and len(groups_of(model)) == 4
    model.save_pretrained(tmp_path)
    assert len(groups_of(mh.load(tmp_path))) == 4
    student = mh.binarize(transformers.LlamaForCausalLM(model.config.get_text_config()), num_experts=2)
    assert not groups_of(student)
    assert len(groups_of(mh.pack(student))) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_shared_calls_generate_exactly_what_lone_calls_do(dtype, precision):
    model = tiny_llama(dtype)
    if precision not in dispatch.spec(model.model.layers[0].self_attn.q_proj.prepared().backend).precisions:
        pytest.skip(f"{precision} needs the numba backend")
    mh.set_precision(model, precision)
    alone = unlinked(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    options = {"do_sample": False, "max_new_tokens": 6, "output_logits": True, "return_dict_in_generate": True,
               "pad_token_id": 0}
    with torch.no_grad():
        shared, lone = model.generate(ids, **options), alone.generate(ids, **options)
        assert torch.equal(shared.sequences, lone.sequences)
        for a, b in zip(shared.logits, lone.logits, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(model(ids).logits, alone(ids).logits)
    assert all(g.sharing for g in groups_of(model).values())


def attention(model):
    attn = model.model.layers[0].self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def alone(layer, x):
    return layer.prepared()(x)


def test_a_kept_output_goes_only_to_the_tensor_it_was_computed_from():
    model = tiny_llama()
    q, k, v = attention(model)
    group = shared(q)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert torch.equal(k(x), alone(k, x))  # k first: it computes for all three
        assert torch.equal(q(x), alone(q, x)) and torch.equal(v(x), alone(v, x)) and group.sharing
        q(x)
        x.add_(1)  # changed in place between q's call and k's: k must see the new values
        assert torch.equal(k(x), alone(k, x))
    assert not group.sharing


def test_a_member_called_with_another_input_stops_the_sharing():
    model = tiny_llama()
    q, k, v = attention(model)
    group = shared(q)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        q(x)
        other = x.clone()  # equal values, another tensor: as a cross-attention's k_proj reads the encoder's
        assert torch.equal(k(other), alone(k, other))
        assert not group.sharing
        assert torch.equal(v(x), alone(v, x)) and torch.equal(q(x), alone(q, x))


def test_a_member_never_called_stops_the_sharing():
    model = tiny_llama()
    q, _, _ = attention(model)
    group = shared(q)
    with torch.no_grad():
        q(torch.randn(1, 2, 64))
        x = torch.randn(1, 2, 64)
        assert torch.equal(q(x), alone(q, x))
    assert not group.sharing


def test_a_member_changed_after_the_shared_call_recomputes():
    model = tiny_llama()
    q, k, v = attention(model)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        q(x)
        k.s_out.mul_(2)
        assert torch.equal(k(x), alone(k, x))
        mh.set_precision(model, "exact")
        v.precision = "fast" if "fast" in dispatch.spec(v.prepared().backend).precisions else "exact"
        for layer in (q, k, v):
            assert torch.equal(layer(x), alone(layer, x))


def test_training_calls_do_not_share():
    model = tiny_llama()
    q = attention(model)[0]
    group = shared(q)
    mh.trainable_scales(model)
    x = torch.randn(1, 3, 64)
    y = q(x)
    assert y.requires_grad and all(entry is None for entry in group._pending)
    y.sum().backward()
    assert q.s_in.grad is not None


def test_copies_and_pickles_keep_the_plan_without_kept_outputs():
    model = tiny_llama()
    q, _, _ = attention(model)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        q(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        cq, ck, cv = attention(clone)
        group = shared(cq)
        assert group is shared(ck) and group.members == (cq, ck, cv)
        assert all(entry is None for entry in group._pending)
        with torch.no_grad():
            assert torch.equal(ck(x), alone(ck, x)) and torch.equal(cq(x), alone(cq, x))
        assert group.sharing


def test_inference_mode_calls_run_alone_and_generate_the_same():
    """Tensors made under torch.inference_mode have no version counter, so a kept output could not be checked:
    their calls run alone (and give what the shared calls give)."""
    model = tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    options = {"do_sample": False, "max_new_tokens": 4, "pad_token_id": 0}
    with torch.no_grad():
        expected = model.generate(ids, **options)
    with torch.inference_mode():
        got = model.generate(ids, **options)
    assert torch.equal(got, expected)
    assert all(g.sharing and all(entry is None for entry in g._pending) for g in groups_of(model).values())


def test_a_model_built_in_inference_mode_sees_its_buffers_change():
    with torch.inference_mode():
        model = tiny_llama()
        q, _, _ = attention(model)
        x = torch.randn(1, 2, 64)
        before = q(x)
        q.s_out.mul_(2)
        assert torch.equal(q(x), alone(q, x)) and not torch.equal(q(x), before)
