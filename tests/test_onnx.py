"""ONNX export: the graph keeps the signs packed, uses standard operators only, and runs in onnxruntime within the
project's tolerance of the float64 reference (its product runs in float32)."""

import sys

import numpy as np
import pytest

import mosbits
from mosbits import export, testing
from mosbits.format import row_bytes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CASES = [
    # (k, n, e, bias, dtype)
    (1, 1, 1, False, "float32"),
    (37, 1, 4, True, "float32"),
    (33, 17, 1, True, "float32"),
    (100, 17, 4, False, "float16"),
    (64, 8, 2, True, "float16"),
    (300, 70, 3, True, "float32"),
    (45, 9, 4, True, "bfloat16"),
]


def make_layer(k, n, e, bias, dtype, seed=0):
    """(case, layer): a random case and its layer in ``dtype`` (torch for bfloat16, NumPy otherwise)."""
    library = "torch" if dtype == "bfloat16" else "numpy"
    if library == "torch":
        pytest.importorskip("torch")
    case = testing.random_case(np.random.default_rng(seed + 1000 * k + n), (1,), k, n, e, bias)
    args = case.arguments(library, dtype)
    return case, mosbits.MoSLinearWeights(args["packed"], args["experts"], args["router"], args["bias"])


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_outputs(y, x, layer, what):
    ref = testing.truth(x, layer.packed, layer.experts, layer.router, layer.bias)
    tol = testing.tolerance(x, layer.experts, layer.router, layer.bias, ref, out_dtype="float32",
                            product_dtype="float32")
    assert y.dtype == np.float32
    testing.assert_within(y, ref, tol, what=what)


@pytest.mark.parametrize(("k", "n", "e", "bias", "dtype"), CASES,
                         ids=[f"K{k}-N{n}-E{e}-{'bias' if b else 'nobias'}-{d}" for k, n, e, b, d in CASES])
def test_onnxruntime_matches_the_reference(tmp_path, k, n, e, bias, dtype):
    _, layer = make_layer(k, n, e, bias, dtype)
    export.onnx(layer, tmp_path / "layer.onnx")
    run = session(tmp_path / "layer.onnx")
    rng = np.random.default_rng(k + n)
    for batch in (1, 5):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        (y,) = run.run(["y"], {"x": x})
        check_outputs(y, x, layer, f"onnxruntime K{k} N{n} E{e} {dtype} batch {batch}")


@pytest.mark.parametrize(("k", "n", "e", "bias", "dtype"), CASES, ids=str)
def test_initializers_hold_packed_signs_and_no_dense_matrix(tmp_path, k, n, e, bias, dtype):
    _, layer = make_layer(k, n, e, bias, dtype)
    model = export.onnx(layer, tmp_path / "layer.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    signs = inits["signs"]
    assert signs.data_type == onnx.TensorProto.UINT8 and tuple(signs.dims) == (n, row_bytes(k))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(signs), testing.to_float64(layer.packed.data))
    floats = {name: tuple(t.dims) for name, t in inits.items()
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    expected = {"s_in": (e, k), "s_out": (e, n), "router": (e, k), **({"bias": (n,)} if bias else {})}
    assert {name: dims for name, dims in floats.items() if dims} == expected, "float initializers beyond scalars"
    assert all(inits[name].data_type == getattr(onnx.TensorProto, {"float32": "FLOAT", "float16": "FLOAT16",
                                                                   "bfloat16": "BFLOAT16"}[dtype])
               for name in expected)
    assert all(node.domain == "" for node in model.graph.node)
    assert {"BitShift", "BitwiseAnd", "MatMul", "Softmax"} <= {node.op_type for node in model.graph.node}
    assert model.opset_import[0].version >= 18
    overhead = (tmp_path / "layer.onnx").stat().st_size - layer.nbytes
    assert 0 < overhead < 4096, f"the file holds {overhead} bytes beyond the packed layer"


def test_metadata_and_dynamic_batch(tmp_path):
    _, layer = make_layer(33, 17, 4, True, "float32")
    model = export.onnx(layer, tmp_path / "layer.onnx")
    assert {p.key: p.value for p in model.metadata_props} == {"mosbits.format": "1", "shape": "17,33"}
    (x_info,), (y_info,) = model.graph.input, model.graph.output
    assert [d.dim_param or d.dim_value for d in x_info.type.tensor_type.shape.dim] == ["batch", 33]
    assert [d.dim_param or d.dim_value for d in y_info.type.tensor_type.shape.dim] == ["batch", 17]


def test_several_named_layers_in_one_model(tmp_path):
    layers = {"model.layers.0.q": make_layer(37, 5, 4, True, "float32")[1],
              "model.layers.0.k": make_layer(37, 3, 1, False, "float16")[1]}
    model = export.onnx(layers, tmp_path / "two.onnx")
    assert {p.key: p.value for p in model.metadata_props} == {
        "mosbits.format": "1", "model.layers.0.q.shape": "5,37", "model.layers.0.k.shape": "3,37"}
    run = session(tmp_path / "two.onnx")
    x = np.random.default_rng(3).standard_normal((4, 37)).astype(np.float32)
    outputs = run.run(["model.layers.0.q.y", "model.layers.0.k.y"], {"model.layers.0.q.x": x, "model.layers.0.k.x": x})
    for (name, layer), y in zip(layers.items(), outputs, strict=True):
        check_outputs(y, x, layer, name)


def test_rejects_what_is_not_layers(tmp_path):
    _, layer = make_layer(5, 2, 1, False, "float32")
    with pytest.raises(ValueError, match="non-empty mapping"):
        export.onnx({}, tmp_path / "x.onnx")
    with pytest.raises(TypeError, match=r"layers\['a'\] must be MoSLinearWeights"):
        export.onnx({"a": layer.packed}, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="non-empty strings"):
        export.onnx({"": layer}, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    _, layer = make_layer(5, 2, 1, False, "float32")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'mosbits\[onnx\]'"):
        export.onnx(layer, tmp_path / "x.onnx")
