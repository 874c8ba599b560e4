"""save/load: round trips, atomic writes, and a FormatError naming the layer for every kind of bad file."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import mosbits
from mosbits import testing


def layer(seed=0, n=17, k=37, e=3, bias=True, dtype="float32", library="numpy"):
    case = testing.random_case(np.random.default_rng(seed), (1,), k, n, e, bias)
    args = case.arguments(library, dtype)
    return mosbits.MoSLinearWeights(args["packed"], args["experts"], args["router"], args["bias"])


def assert_same(a, b):
    for get in (lambda m: m.packed.data, lambda m: m.experts.s_in, lambda m: m.experts.s_out,
                lambda m: m.router):
        np.testing.assert_array_equal(testing.to_float64(get(a)), testing.to_float64(get(b)))
    assert a.packed.shape == b.packed.shape
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        np.testing.assert_array_equal(testing.to_float64(a.bias), testing.to_float64(b.bias))


def test_round_trip_numpy(tmp_path):
    layers = {"model.layers.0.mlp.up": layer(0), "attn.q": layer(1, n=4, k=100, e=1, bias=False, dtype="float16")}
    mosbits.save(tmp_path / "m.safetensors", layers)
    loaded = mosbits.load(tmp_path / "m.safetensors")
    assert list(loaded) == sorted(layers)
    for name in layers:
        assert_same(layers[name], loaded[name])
    x = np.random.default_rng(2).standard_normal((3, 37)).astype(np.float32)
    np.testing.assert_array_equal(loaded["model.layers.0.mlp.up"](x), layers["model.layers.0.mlp.up"](x))


def test_round_trip_torch_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    original = layer(3, dtype="bfloat16", library="torch")
    mosbits.save(tmp_path / "b.safetensors", {"l": original})
    loaded = mosbits.load(tmp_path / "b.safetensors", framework="torch")["l"]
    assert loaded.router.dtype == torch.bfloat16 and loaded.packed.data.dtype == torch.uint8
    assert_same(original, loaded)
    with pytest.raises(mosbits.FormatError, match=r"bfloat16.*framework='torch'"):
        mosbits.load(tmp_path / "b.safetensors")


def test_metadata_and_tensor_names(tmp_path):
    from safetensors import safe_open

    mosbits.save(tmp_path / "m.safetensors", {"a.b": layer(bias=False)})
    with safe_open(tmp_path / "m.safetensors", "numpy") as f:
        assert f.metadata() == {"mosbits.format": "1", "a.b.shape": "17,37"}
        assert sorted(f.keys()) == ["a.b.router", "a.b.s_in", "a.b.s_out", "a.b.signs"]
        assert f.get_tensor("a.b.signs").dtype == np.uint8


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    mosbits.save(target, {"l": layer(0)})
    before = target.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        mosbits.save(target, {"l": layer(1)})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_rejects_bad_layers(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        mosbits.save(tmp_path / "x", {})
    with pytest.raises(TypeError, match=r"layers\['l'\] must be MoSLinearWeights"):
        mosbits.save(tmp_path / "x", {"l": (1, 2)})
    assert not (tmp_path / "x").exists()


def test_layer_container_checks_consistency():
    good = layer()
    with pytest.raises(ValueError, match="router"):
        mosbits.MoSLinearWeights(good.packed, good.experts, good.router[:, :5])
    with pytest.raises(ValueError, match="bias"):
        mosbits.MoSLinearWeights(good.packed, good.experts, good.router, np.ones(3, np.float32))


def raw_tensors(**overrides):
    good = layer()
    tensors = {"l.signs": good.packed.data, "l.s_in": good.experts.s_in, "l.s_out": good.experts.s_out,
               "l.router": good.router, "l.bias": good.bias}
    tensors.update(overrides)
    return {k: v for k, v in tensors.items() if v is not None}


GOOD_META = {"mosbits.format": "1", "l.shape": "17,37"}
BAD_FILES = {
    "unknown-version": (raw_tensors(), {**GOOD_META, "mosbits.format": "2"}, "version '2' is not supported"),
    "no-version": (raw_tensors(), {"l.shape": "17,37"}, "no 'mosbits.format' metadata"),
    "missing-router": (raw_tensors(**{"l.router": None}), GOOD_META, "layer 'l': missing tensor(s) l.router"),
    "missing-shape": (raw_tensors(), {"mosbits.format": "1"}, "layer 'l': metadata 'l.shape'"),
    "loose-shape": (raw_tensors(), {**GOOD_META, "l.shape": " 17,37"}, "must be 'N,K'"),
    "shape-vs-signs": (raw_tensors(), {**GOOD_META, "l.shape": "17,70"}, "layer 'l': PackedSigns.data"),
    "signs-dtype": (raw_tensors(**{"l.signs": layer().packed.data.astype(np.int8)}), GOOD_META,
                    "layer 'l': PackedSigns.data must be uint8"),
    "s_out-shape": (raw_tensors(**{"l.s_out": np.ones((3, 16), np.float32)}), GOOD_META,
                    "layer 'l': experts.s_out"),
    "router-E": (raw_tensors(**{"l.router": np.ones((2, 37), np.float32)}), GOOD_META, "layer 'l': router"),
    "bias-dtype": (raw_tensors(**{"l.bias": np.ones(17, np.float16)}), GOOD_META, "layer 'l': bias"),
    "padding": (raw_tensors(**{"l.signs": layer().packed.data | np.uint8(0x80)}), GOOD_META,
                "layer 'l': PackedSigns for shape (17, 37): padding bits"),
    "unexpected": (raw_tensors(**{"l.extra": np.ones(2, np.float32)}), GOOD_META, "unexpected tensor 'l.extra'"),
    "orphan-shape": (raw_tensors(), {**GOOD_META, "m.shape": "1,1"}, "'m.shape' describes a layer"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_format_error(tmp_path, name):
    tensors, metadata, message = BAD_FILES[name]
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(mosbits.FormatError) as info:
        mosbits.load(tmp_path / "bad.safetensors")
    assert message in str(info.value)


@pytest.mark.parametrize("cut", [1, 7, 8, 100, -1])
def test_truncated_file(tmp_path, cut):
    mosbits.save(tmp_path / "m.safetensors", {"l": layer()})
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:cut])
    with pytest.raises(mosbits.FormatError, match="not a readable safetensors file"):
        mosbits.load(tmp_path / "t.safetensors")


def test_header_lies_about_offsets(tmp_path):
    mosbits.save(tmp_path / "m.safetensors", {"l": layer()})
    data = (tmp_path / "m.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["l.router"]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    (tmp_path / "o.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    with pytest.raises(mosbits.FormatError):
        mosbits.load(tmp_path / "o.safetensors")


def test_missing_file_is_not_a_format_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        mosbits.load(tmp_path / "nope.safetensors")


def test_saved_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        mosbits.save(tmp_path / "m.safetensors", {"l": layer()})
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def with_header(data, edit):
    """The file bytes ``data`` with its JSON header text passed through ``edit`` (a str -> str function), the
    length prefix updated and the data buffer unchanged."""
    (size,) = struct.unpack("<Q", data[:8])
    text = edit(data[8:8 + size].decode().rstrip(" "))
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + data[8 + size:]


def entry_of(text, key):
    """The JSON text of the header entry ``key`` (safetensors writes no spaces)."""
    header = json.loads(text)
    return f'"{key}":{json.dumps(header[key], separators=(",", ":"))}'


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('"__metadata__":{', '"__metadata__":{"mosbits.format":"1",', 1),
     "key 'mosbits.format' appears twice"),
    (lambda t: t[:-1] + "," + entry_of(t, "l.bias") + "}", "key 'l.bias' appears twice"),
    (lambda t: t.replace('"dtype":"F32","shape":[17]', '"dtype":"F32","shape":[17],"endian":"big"', 1),
     r"tensor entry 'l.bias' must have exactly the fields \['data_offsets', 'dtype', 'shape'\]"),
    (lambda t: t.replace('"__metadata__":{', '"__metadata__":{"x":NaN,', 1), "NaN is not a JSON number"),
    (lambda t: t.replace('"__metadata__":{', '"__metadata__":{"x":1,', 1), "__metadata__ must be an object of"),
], ids=["metadata-duplicate", "tensor-duplicate", "unknown-entry-field", "nan-number", "metadata-not-string"])
def test_headers_a_lenient_parser_would_accept_are_refused(tmp_path, edit, message):
    """FORMAT.md section 6: each key once, tensor entries with exactly three fields, plain JSON numbers; Python's
    json module (keeps the last duplicate, reads NaN) and safetensors' parser would each accept some of these."""
    mosbits.save(tmp_path / "m.safetensors", {"l": layer()})
    edited = with_header((tmp_path / "m.safetensors").read_bytes(), edit)
    (tmp_path / "bad.safetensors").write_bytes(edited)
    with pytest.raises(mosbits.FormatError, match=message):
        mosbits.load(tmp_path / "bad.safetensors")


def test_an_empty_layer_name_is_refused(tmp_path):
    """A tensor key ``.signs`` names the layer "": FORMAT.md section 3 requires a non-empty name."""
    mosbits.save(tmp_path / "m.safetensors", {"l": layer()})
    edited = with_header((tmp_path / "m.safetensors").read_bytes(),
                         lambda t: t.replace('"l.', '".').replace('"l.shape"', '".shape"'))
    (tmp_path / "bad.safetensors").write_bytes(edited)
    with pytest.raises(mosbits.FormatError, match=r"tensor '\.bias' has an empty layer name"):
        mosbits.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="invalid layer name ''"):
        mosbits.save(tmp_path / "x.safetensors", {"": layer()})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor", ["s_in", "s_out", "router", "bias"])
def test_non_finite_parameters_are_refused(tmp_path, tensor, value):
    good = layer()
    mosbits.save(tmp_path / "m.safetensors", {"l": good})
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    begin, _ = json.loads(data[8:8 + size])[f"l.{tensor}"]["data_offsets"]
    data[8 + size + begin:8 + size + begin + 4] = struct.pack("<f", value)
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(mosbits.FormatError, match=rf"layer 'l': tensor l\.{tensor} holds 1 non-finite value"):
        mosbits.load(tmp_path / "bad.safetensors")
