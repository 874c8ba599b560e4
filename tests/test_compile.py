"""Packed models in graphs: torch.compile and torch.jit.trace record one ``mosbits::packed_linear`` node per
packed layer (`mosbits.hf.operator`) and compute what the eager model computes, bit for bit (layers that read one
input sharing one call, as eagerly)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
mh = pytest.importorskip("mosbits.hf")
from conftest import DEVICE  # noqa: E402
from test_hf import MODELS  # noqa: E402

OPERATOR = torch.ops.mosbits.packed_linear.default


def packed_llama(num_experts=4):
    torch.manual_seed(0)
    model = MODELS["llama"]().eval()
    mh.binarize(model, num_experts=num_experts)
    mh.pack(model)
    return model.to(DEVICE)


def recording_backend(graphs):
    """A torch.compile backend that keeps each FX graph and runs it as traced (no other compiler in between)."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def operator_nodes(graphs):
    return sum(node.target is OPERATOR for gm in graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("num_experts", [1, 4])
def test_a_compiled_packed_model_gives_the_eager_logits(num_experts):
    model = packed_llama(num_experts)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    graphs = []
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend=recording_backend(graphs))
        got = compiled(ids).logits
        again = compiled(ids.flip(1)).logits
        expected_again = model(ids.flip(1)).logits
    assert operator_nodes(graphs) == 14  # q, k, v, o, gate, up, down in 2 blocks
    assert_same_logits(got, expected)
    assert_same_logits(again, expected_again)


def assert_same_logits(got, expected):
    """Bit for bit on the CPU. On CUDA (an H200, 2026-12-04) the whole model's eager and graph logits agreed to the
    4 printed decimals but not bit for bit, while each layer alone does (the fullgraph test below): the cause, in
    the rest of the model's CUDA ops, is not pinned down. There the bound is the CUDA vs CPU test's in test_hf
    (float32 sums in another order: about K u = 96 x 6e-8 per layer, a few layers deep); a wrong layer is off by
    order 1."""
    if got.device.type == "cpu":
        assert torch.equal(got, expected)
    else:
        assert float((got - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_layer_compiles_with_fullgraph(dtype):
    """One node for the layer, no graph break, and the eager layer's output for x of any leading shape and of a
    dtype other than the layer's (cast in, computed in the layer's dtype, cast back)."""
    layer = packed_llama().model.layers[0].mlp.down_proj.to(dtype)
    graphs = []
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=recording_backend(graphs))
    with torch.no_grad():
        for shape in [(1, 96), (3, 5, 96)]:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
            assert torch.equal(compiled(x), layer(x)), shape
    assert operator_nodes(graphs) >= 1


def test_a_compiled_model_runs_its_dense_head_as_the_eager_model_does():
    """The lm_head (`mosbits.hf.DecodeLinear`) is one ``mosbits::dense_linear`` node, which for a token or two runs
    the numba dense kernel as the eager head does (inductor would compile ``nn.Linear`` to torch's matrix product):
    the compiled logits of one token are the eager ones, bit for bit, and of a prompt too."""
    pytest.importorskip("numba", reason="packed models keep a plain nn.Linear head without the numba backend")
    model = packed_llama()
    graphs = []
    compiled = torch.compile(model, backend=recording_backend(graphs))
    with torch.no_grad():
        for length in (1, 9):
            ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)
            assert_same_logits(compiled(ids).logits, model(ids).logits)
    dense = torch.ops.mosbits.dense_linear.default
    assert sum(node.target is dense for gm in graphs for node in gm.graph.nodes) == len(graphs)


def test_a_compiled_model_serves_layers_that_read_one_input_by_one_call(monkeypatch):
    """Under torch.compile, the nodes of q, k and v (and of gate and up) are served as the eager layers are: the
    first computes all of them in one group call (`mosbits.hf.fusion`), the others get their kept outputs; the
    logits are the eager ones, bit for bit."""
    import mosbits

    model = packed_llama()
    compiled = torch.compile(model, backend=recording_backend([]))
    calls = []
    group_call = mosbits.PreparedGroup.__call__
    monkeypatch.setattr(mosbits.PreparedGroup, "__call__", lambda self, x: calls.append(1) or group_call(self, x))
    with torch.no_grad():
        for length in (1, 9):
            ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)
            expected = model(ids).logits
            calls.clear()
            assert_same_logits(compiled(ids).logits, expected)
            assert len(calls) == 4, length  # (q, k, v) and (gate, up) in 2 blocks
    shared = [m.__dict__["_shared_input"] for m in model.modules() if "_shared_input" in m.__dict__]
    assert shared and all(group.sharing for group in shared)


def test_jit_trace_records_the_operator_not_a_constant():
    layer = packed_llama().model.layers[1].self_attn.q_proj
    x1, x2 = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x1)
        assert "mosbits::packed_linear" in str(traced.graph)
        assert torch.equal(traced(x2), layer(x2))


def test_the_operator_serves_a_live_layer_from_its_prepared_layer(monkeypatch):
    """In a compiled model each node runs its layer's prepared layer (no per-call ``mosbits.matmul``), and sees
    what the eager layer sees after its buffers change in place or are replaced."""
    import mosbits

    model = packed_llama()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    compiled = torch.compile(model, backend=recording_backend([]))
    calls = []
    unprepared = mosbits.matmul
    monkeypatch.setattr(mosbits, "matmul", lambda *a, **k: calls.append(1) or unprepared(*a, **k))
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        assert_same_logits(compiled(ids).logits, model(ids).logits)
        assert not calls, "a live layer's node must not take the unprepared path"
        layer.s_out.mul_(2)
        assert_same_logits(compiled(ids).logits, model(ids).logits)
        layer.s_in = layer.s_in * 0.5
        assert_same_logits(compiled(ids).logits, model(ids).logits)
    assert not calls


def test_the_operator_on_tensors_of_no_live_layer_computes_what_matmul_does(monkeypatch):
    """A direct call with copies of a layer's buffers, and an E = 1 layer's signs with a router that is not its
    zero row, are not served by the layer's prepared layer but by ``mosbits.matmul``."""
    import mosbits

    calls = []
    unprepared = mosbits.matmul
    monkeypatch.setattr(mosbits, "matmul", lambda *a, **k: calls.append(1) or unprepared(*a, **k))
    for num_experts in (4, 1):
        layer = packed_llama(num_experts).model.layers[0].self_attn.o_proj
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        signs = layer.signs.clone() if num_experts > 1 else layer.signs
        router = layer.router.clone() if num_experts > 1 else torch.ones(1, 64, device=DEVICE)
        with torch.no_grad():
            s_in, s_out = (layer.s_in.clone(), layer.s_out.clone()) if num_experts > 1 else (layer.s_in, layer.s_out)
            got = OPERATOR(x, signs, 64, s_in, s_out, router, layer.bias, "exact")
            assert len(calls) == 1, num_experts
            want = unprepared(x, mosbits.PackedSigns(signs, (64, 64)), mosbits.Experts(layer.s_in, layer.s_out),
                              router, bias=layer.bias)
        assert torch.equal(got, want), num_experts
        calls.clear()
