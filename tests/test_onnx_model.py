"""ONNX export of a whole Hugging Face model packed by mosbits.hf: the packed signs stay uint8 initializers,
standard operators unpack them, and onnxruntime's logits match the torch model's."""

import copy

import numpy as np
import pytest

import mosbits
from mosbits.format import row_bytes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
mh = pytest.importorskip("mosbits.hf")
from mosbits.export.model import export_causal_lm  # noqa: E402

VOCAB = 256


def tiny_llama(dtype=torch.float32, num_experts=4, attention_bias=False):
    """(dense, packed): a random 2-layer Llama (hidden 64) in ``dtype`` and its binarized, packed copy."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      attention_bias=attention_bias)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval().to(dtype)
    return dense, mh.pack(mh.binarize(copy.deepcopy(dense), num_experts=num_experts, seed=0)).eval()


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def inputs(batch, seq, seed, pad=0):
    """input_ids and attention_mask (batch, seq) int64; row 1 is left-padded by ``pad`` tokens."""
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:2, :pad] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize(("num_experts", "bias"), [(4, False), (1, True)], ids=["E4", "E1-bias"])
def test_packed_llama_runs_in_onnxruntime(tmp_path, num_experts, bias):
    """Shapes other than the traced (2, 8), with left padding. Both sides compute in float32 and differ only in
    summation order: per layer a relative error of about sqrt(K) 2^-24 (K <= 96); measured about 3e-7 on the
    logits of the two decoder layers, so the bound 1e-5 has a margin of 30x."""
    _, model = tiny_llama(num_experts=num_experts, attention_bias=bias)
    mosbits.export.onnx(model, tmp_path / "model.onnx")
    run = session(tmp_path / "model.onnx")
    for batch, seq, pad in [(1, 5, 0), (3, 11, 4)]:
        ids, mask = inputs(batch, seq, seed=seq, pad=pad)
        (got,) = run.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        want = torch_logits(model, ids, mask).numpy()
        valid = mask.bool().numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        relative = np.linalg.norm(got[valid] - want[valid]) / np.linalg.norm(want[valid])
        assert relative <= 1e-5, f"batch {batch} seq {seq}: onnxruntime logits differ by {relative:.2e}"


def test_graph_holds_packed_signs_and_no_dense_matrix(tmp_path):
    _, model = tiny_llama()
    proto = mosbits.export.onnx(model, tmp_path / "model.onnx")
    inits = {t.name: t for t in proto.graph.initializer}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, mh.PackedMoSLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        signs = inits[f"{name}.signs"]
        assert signs.data_type == onnx.TensorProto.UINT8 and tuple(signs.dims) == (layer.out_features,
                                                                                   row_bytes(layer.in_features))
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(signs), layer.signs.numpy())
        assert tuple(inits[f"{name}.s_in"].dims) == (4, layer.in_features)
    dense_shapes = {(m.out_features, m.in_features) for m in layers.values()}
    dense_shapes |= {(k, n) for n, k in dense_shapes}
    floats = [t for t in inits.values() if t.data_type != onnx.TensorProto.UINT8]
    assert not [t.name for t in floats if tuple(t.dims) in dense_shapes]
    assert not [t.name for t in proto.graph.initializer if t.name.startswith("lm.")]
    assert not [n for n in proto.graph.node if n.op_type == "Constant"
                and any(a.t.data_type == onnx.TensorProto.FLOAT and len(a.t.dims) == 2 for a in n.attribute)]
    ops = {n.op_type for n in proto.graph.node}
    assert {"BitShift", "BitwiseAnd", "Softmax", "MatMul"} <= ops and all(n.domain == "" for n in proto.graph.node)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["mosbits.format"] == "1" and props["model.layers.1.mlp.down_proj.shape"] == "64,96"
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_file_size_against_a_dense_fp16_export(tmp_path, capsys):
    """fp16 models: the packed export holds half the weight bytes of the dense one here (hidden 64: the E = 4
    experts outweigh the signs they scale, and the fp16 embeddings stay), while the unpacking nodes add about 7 KB
    of graph per layer, so the tiny files are about the same size. onnxruntime runs the fp16 graph too; its logits
    differ from torch's CPU fp16 ones by fp16 rounding (measured 6e-4 relative)."""
    dense, packed = tiny_llama(torch.float16)
    mosbits.export.onnx(packed, tmp_path / "packed.onnx")
    export_causal_lm(dense, tmp_path / "dense.onnx")
    sizes = {name: (tmp_path / f"{name}.onnx").stat().st_size for name in ("packed", "dense")}
    weights = {name: sum(len(t.raw_data) for t in onnx.load(tmp_path / f"{name}.onnx").graph.initializer)
               for name in sizes}
    with capsys.disabled():
        print(f"\ntiny Llama fp16 ONNX: packed {sizes['packed']} B file ({weights['packed']} B initializers), "
              f"dense {sizes['dense']} B file ({weights['dense']} B initializers)")
    assert weights["packed"] < 0.55 * weights["dense"]
    ids, mask = inputs(2, 7, seed=3)
    (got,) = session(tmp_path / "packed.onnx").run(["logits"], {"input_ids": ids.numpy(),
                                                                 "attention_mask": mask.numpy()})
    want = torch_logits(packed, ids, mask).float().numpy()
    assert got.dtype == np.float16
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 4e-3


def test_model_export_restores_the_packed_layers_and_mode(tmp_path):
    _, model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    model.train()
    mosbits.export.onnx(model, tmp_path / "model.onnx")
    assert model.model.layers[0].self_attn.q_proj is layer and model.training


def test_unpacked_or_training_models_are_refused(tmp_path):
    dense, _ = tiny_llama()
    with pytest.raises(ValueError, match="holds no PackedMoSLinear"):
        mosbits.export.onnx(dense, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="MoSLinear training layers"):
        mosbits.export.onnx(mh.binarize(copy.deepcopy(dense)), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
