"""``mosbits inspect``, and corruption fuzzing of ``mosbits.load`` and inspect.

The fuzz tests mutate a valid two-layer file (flipped bytes, truncation, edited metadata, deleted or renamed
tensors, edited tensor entries) and demand that load and inspect either raise ``mosbits.FormatError``, never
another exception, or return exactly the original layers, except for tensor payload bytes the mutation changed.
Format v1 has no checksum: a changed sign bit (not a padding bit) or a changed float that stays finite is a valid
file with other weights, which no reader can tell from the original; inspect rejects floats that became NaN or
inf. Everything else (the length prefix, the JSON header, the metadata, tensor names, dtypes, shapes, offsets,
padding bits, the file's length) must be detected.
"""

import argparse
import importlib.util
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

import mosbits
from mosbits import arrays, cli, testing
from mosbits.cli import inspect as inspection
from mosbits.format import row_bytes


def make_layer(seed, n, k, e, bias, dtype):
    case = testing.random_case(np.random.default_rng(seed), (1,), k, n, e, bias)
    args = case.arguments("numpy", dtype)
    return mosbits.MoSLinearWeights(args["packed"], args["experts"], args["router"], args["bias"])


LAYERS = {"model.layers.0.q": make_layer(0, 5, 37, 3, True, "float32"),
          "model.layers.0.k": make_layer(1, 2, 9, 1, False, "float16")}


def _saved_bytes():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        mosbits.save(path, LAYERS)
        return path.read_bytes()


ORIGINAL = _saved_bytes()
HEADER_SIZE = struct.unpack("<Q", ORIGINAL[:8])[0]
HEADER = json.loads(ORIGINAL[8:8 + HEADER_SIZE])
DATA_START = 8 + HEADER_SIZE
METADATA = HEADER["__metadata__"]
ENTRIES = {key: entry for key, entry in HEADER.items() if key != "__metadata__"}
DTYPES = {"U8": "uint8", "F16": "float16", "F32": "float32"}


def inspect_cli(argv):
    """``mosbits inspect ARGV``'s exit status, through a parser built as mosbits.cli builds it."""
    parser = argparse.ArgumentParser(prog="mosbits inspect")
    inspection.add_arguments(parser)
    return inspection.run(parser.parse_args(argv))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(ORIGINAL)
    return path


def rebuild(header, buffer=None):
    """A safetensors file from a header dict and a data buffer (the original one by default)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + (ORIGINAL[DATA_START:] if buffer is None else buffer)


def test_lists_every_layer(saved, capsys):
    assert inspect_cli([str(saved)]) == 0
    out = capsys.readouterr().out
    assert "2 layer(s), all valid" in out
    for name, layer in LAYERS.items():
        n, k = layer.packed.shape
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert f"{n} x {k}" in line and f"{layer.nbytes:,}" in line and f"{8 * layer.nbytes / (n * k):.3f}" in line
    assert f"file: {len(ORIGINAL):,} bytes (header {HEADER_SIZE:,})" in out


def test_json_output(saved, capsys):
    assert inspect_cli([str(saved), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] and info["format"] == "1" and info["file_bytes"] == len(ORIGINAL)
    by_name = {layer["name"]: layer for layer in info["layers"]}
    q, k = by_name["model.layers.0.q"], by_name["model.layers.0.k"]
    assert q == {"name": "model.layers.0.q", "n": 5, "k": 37, "experts": 3, "dtype": "float32", "bias": True,
                 "nbytes": LAYERS["model.layers.0.q"].nbytes, "bits_per_weight": 8 * q["nbytes"] / 185,
                 "fp16_bytes": 2 * (185 + 5)}
    assert (k["dtype"], k["bias"], k["experts"], k["fp16_bytes"]) == ("float16", False, 1, 36)
    assert info["weights"] == 185 + 18 and info["fp16_bytes"] == 2 * (185 + 5) + 36


def test_bfloat16_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    case = testing.random_case(np.random.default_rng(2), (1,), 40, 3, 2, True)
    args = case.arguments("torch", "bfloat16")
    mosbits.save(tmp_path / "b.safetensors", {"b": mosbits.MoSLinearWeights(
        args["packed"], args["experts"], args["router"], args["bias"])})
    assert inspect_cli([str(tmp_path / "b.safetensors")]) == 0
    assert "bfloat16" in capsys.readouterr().out
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert inspect_cli([str(tmp_path / "b.safetensors")]) == 2
    assert "pip install 'mosbits[torch]'" in capsys.readouterr().err


@pytest.mark.parametrize(("header_edit", "words"), [
    (lambda h: h["__metadata__"].update({"mosbits.format": "2"}), ["version '2' is not supported"]),
    (lambda h: h["__metadata__"].update({"model.layers.0.k.shape": "2,10"}), ["layer 'model.layers.0.k'"]),
    (lambda h: h.update({"model.layers.0.q.s_in": {**h["model.layers.0.q.s_in"], "shape": [37, 3]}}),
     ["layer 'model.layers.0.q'", "Experts.s_in (E, K)"]),
], ids=["version", "shape", "tensor-shape"])
def test_invalid_file_exits_1_naming_the_layer_and_the_problem(tmp_path, capsys, header_edit, words):
    header = json.loads(json.dumps(HEADER))
    header_edit(header)
    (tmp_path / "bad.safetensors").write_bytes(rebuild(header))
    assert inspect_cli([str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mosbits inspect: invalid file:")
    for word in words:
        assert word in err


def test_padding_bit_names_the_layer(tmp_path, capsys):
    begin, _ = ENTRIES["model.layers.0.k.signs"]["data_offsets"]
    data = bytearray(ORIGINAL)
    data[DATA_START + begin + 2] |= 0x80
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    assert inspect_cli([str(tmp_path / "bad.safetensors"), "--json"]) == 1
    captured = capsys.readouterr()
    assert "layer 'model.layers.0.k'" in captured.err and "padding bits" in captured.err
    assert json.loads(captured.out)["valid"] is False


def test_non_finite_scale_names_the_tensor(tmp_path, capsys):
    begin, _ = ENTRIES["model.layers.0.q.s_out"]["data_offsets"]
    data = bytearray(ORIGINAL)
    data[DATA_START + begin + 4:DATA_START + begin + 8] = struct.pack("<f", float("nan"))
    (tmp_path / "nan.safetensors").write_bytes(bytes(data))
    with pytest.raises(mosbits.FormatError, match=r"tensor model\.layers\.0\.q\.s_out holds 1 non-finite"):
        mosbits.load(tmp_path / "nan.safetensors")
    assert inspect_cli([str(tmp_path / "nan.safetensors")]) == 1
    assert "tensor model.layers.0.q.s_out holds 1 non-finite value(s)" in capsys.readouterr().err


def test_missing_path_and_usage_errors_exit_2(tmp_path, capsys):
    assert inspect_cli([str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert inspect_cli([str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as info:
        inspect_cli([])
    assert info.value.code == 2


def test_registered_in_the_cli(saved, capsys):
    assert cli.main(["inspect", str(saved)]) == 0
    assert "all valid" in capsys.readouterr().out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


def outcome(path, data):
    """Write ``data`` to ``path``; load's layers (None on FormatError), after checking that inspect agrees."""
    path.write_bytes(data)
    try:
        layers = mosbits.load(path)
    except mosbits.FormatError:
        layers = None
    try:
        info = inspection.describe(path)
    except mosbits.FormatError as err:
        assert layers is None or "non-finite" in str(err), f"inspect rejects what load accepts: {err}"
    else:
        assert layers is not None, "inspect accepts what load rejects"
        assert [layer.name for layer in info.layers] == list(layers)
    return layers


def assert_only_payload_changed(layers, data):
    """The loaded layers are the original ones, except that each tensor holds the bytes ``data`` has where the
    original file kept that tensor: names, dtypes, shapes and placement are all as before."""
    assert sorted(layers) == sorted(LAYERS)
    for name, layer in layers.items():
        parts = {"signs": layer.packed.data, "s_in": layer.experts.s_in, "s_out": layer.experts.s_out,
                 "router": layer.router, "bias": layer.bias}
        assert {f"{name}.{s}" for s, a in parts.items() if a is not None} == {k for k in ENTRIES if
                                                                            k.rpartition(".")[0] == name}
        for suffix, a in parts.items():
            if a is None:
                continue
            entry = ENTRIES[f"{name}.{suffix}"]
            assert arrays.dtype_name(a) == DTYPES[entry["dtype"]] and list(a.shape) == entry["shape"]
            begin, end = entry["data_offsets"]
            assert a.tobytes() == data[DATA_START + begin:DATA_START + end]


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(ORIGINAL) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes(scratch, flips):
    data = bytearray(ORIGINAL)
    for position, mask in flips:
        data[position] ^= mask
    layers = outcome(scratch, bytes(data))
    if layers is not None:
        assert_only_payload_changed(layers, data)


def test_every_padding_bit_and_header_byte_is_checked(scratch):
    """One bit at a time: every padding bit, and one bit (the byte's position mod 8) of every byte of the length
    prefix and of the JSON header, except the spaces that pad the header (which may become other whitespace)."""
    positions = [(DATA_START + ENTRIES[f"{name}.signs"]["data_offsets"][0] + row * row_bytes(k) + bit // 8, bit % 8)
                 for name, layer in LAYERS.items() for n, k in [layer.packed.shape]
                 for row in range(n) for bit in range(k, 8 * row_bytes(k))]
    header_end = 8 + len(ORIGINAL[8:DATA_START].rstrip(b" "))
    positions += [(byte, byte % 8) for byte in range(header_end)]
    accepted = []
    for byte, bit in positions:
        data = bytearray(ORIGINAL)
        data[byte] ^= 1 << bit
        if outcome(scratch, bytes(data)) is not None:
            accepted.append((byte, bit))
    assert accepted == []


@FUZZ
@given(cut=st.integers(0, len(ORIGINAL) - 1))
def test_truncated(scratch, cut):
    assert outcome(scratch, ORIGINAL[:cut]) is None


@FUZZ
@given(junk=st.binary(min_size=1, max_size=16))
def test_appended_bytes(scratch, junk):
    assert outcome(scratch, ORIGINAL + junk) is None


SHAPE_TEXT = st.text(max_size=12) | st.from_regex(r"[0-9]{1,6},[0-9]{1,6}", fullmatch=True)


@FUZZ
@given(key=st.sampled_from(sorted(METADATA)), value=st.none() | SHAPE_TEXT)
@example(key="model.layers.0.q.shape", value="1" * 4301 + ",37")
def test_edited_or_deleted_metadata(scratch, key, value):
    header = json.loads(json.dumps(HEADER))
    if value is None:
        del header["__metadata__"][key]
    else:
        header["__metadata__"][key] = value
    layers = outcome(scratch, rebuild(header))
    assert layers is None or value == METADATA[key]


@FUZZ
@given(key=st.text(max_size=20) | st.sampled_from(["x.shape", "model.layers.0.v.shape", "mosbits.format"]),
       value=SHAPE_TEXT)
def test_added_metadata(scratch, key, value):
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"][key] = value
    layers = outcome(scratch, rebuild(header))
    if layers is not None:
        assert_only_payload_changed(layers, ORIGINAL)


TENSOR_NAMES = sorted(ENTRIES)
PLAUSIBLE_NAMES = st.sampled_from([f"{name}.{s}" for name in [*LAYERS, "model.layers.0.v", ""]
                                   for s in ("signs", "s_in", "s_out", "router", "bias", "weight")])


@FUZZ
@given(key=st.sampled_from(TENSOR_NAMES),
       new_name=st.none() | PLAUSIBLE_NAMES | st.text(max_size=20).filter(lambda s: s != "__metadata__"))
def test_deleted_or_renamed_tensor(scratch, key, new_name):
    """Rewritten as a well-formed safetensors file. Deleting the optional bias leaves a valid file: v1 keeps no
    list of a layer's tensors, so that cannot be detected."""
    tensors = load(ORIGINAL)
    moved = tensors.pop(key)
    if new_name is not None:
        tensors[new_name] = moved
    layers = outcome(scratch, save(tensors, metadata=METADATA))
    if new_name == key:
        assert layers is not None
    elif new_name is None and key.endswith(".bias"):
        assert layers is not None and layers[key.removesuffix(".bias")].bias is None
    else:
        assert layers is None


@FUZZ
@given(key=st.sampled_from(TENSOR_NAMES),
       field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       dtype=st.sampled_from(["U8", "I8", "BOOL", "F16", "I16", "U16", "F32", "I32", "U32", "F64", "I64"]),
       ints=st.lists(st.integers(0, 1200), max_size=3))
def test_edited_tensor_entry(scratch, key, field, dtype, ints):
    header = json.loads(json.dumps(HEADER))
    header[key][field] = dtype if field == "dtype" else ints
    layers = outcome(scratch, rebuild(header))
    assert layers is None or header[key] == HEADER[key]
