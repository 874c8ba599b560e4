"""The conformance vectors of tests/data (docs/FORMAT.md, section 9): the current code must pack the stored latent
weights to the stored bytes exactly, and every backend must reproduce the stored float64 outputs within the
project's tolerance, so that the format cannot drift silently."""

import importlib.util
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKENDS, require_backend
from safetensors.numpy import load_file

import mosbits
from mosbits import arrays, dispatch, reference, testing

DATA = Path(__file__).parent / "data"
FORMAT_MD = Path(__file__).parents[1] / "docs" / "FORMAT.md"


def _generator():
    """tests/data/make_vectors.py as a module (tests/data is not a package)."""
    spec = importlib.util.spec_from_file_location("make_vectors", DATA / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _generator()
VECTORS = {v.id: v for v in gen.VECTORS}


def load_vector(vector_id, library="numpy"):
    """(layer, io) of a stored vector; the layer's arrays on ``library`` (bfloat16 ones need torch)."""
    vector = VECTORS[vector_id]
    if vector.dtype == "bfloat16" or library == "torch":
        pytest.importorskip("torch")
        library = "torch"
    layer_path, io_path = gen.paths(vector)
    layers = mosbits.load(layer_path, framework=library)
    assert list(layers) == [gen.LAYER_NAME]
    return layers[gen.LAYER_NAME], load_file(io_path)


def as_dtype(x, like, dtype):
    """The float32 NumPy x in ``dtype`` on ``like``'s library (exact: the vectors' values fit the dtype)."""
    if arrays.is_torch(like):
        import torch

        return torch.from_numpy(x).to(getattr(torch, dtype))
    return x.astype(dtype)


def split(path):
    """(parsed JSON header, data buffer) of a safetensors file."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def hexdump(buffer):
    """16 bytes a line, ``0010: 00 00 ...``: the form docs/FORMAT.md prints."""
    return "\n".join(f"{i:04x}: {buffer[i:i + 16].hex(' ')}" for i in range(0, len(buffer), 16))


def test_the_folder_holds_exactly_the_table():
    expected = {p.name for v in gen.VECTORS for p in gen.paths(v)}
    assert {p.name for p in DATA.glob("*.safetensors")} == expected


@pytest.mark.parametrize("vector_id", VECTORS)
def test_packing_reproduces_the_stored_signs(vector_id):
    layer, io = load_vector(vector_id)
    stored = layer.packed.data.numpy() if arrays.is_torch(layer.packed.data) else layer.packed.data
    w = io["w"]
    assert layer.packed.shape == w.shape
    np.testing.assert_array_equal(mosbits.pack(w).data, stored)
    np.testing.assert_array_equal(reference.pack(w), stored)
    np.testing.assert_array_equal(reference.unpack(stored, w.shape), np.where(w >= 0, 1.0, -1.0))


@pytest.mark.parametrize("vector_id", VECTORS)
def test_the_reference_reproduces_the_stored_outputs(vector_id):
    """To float64 rounding: the float32 bound of `mosbits.testing.tolerance` scaled by 2^-53 / 2^-24. The vectors'
    outputs were computed by this very function; BLAS and libm on another machine may differ in the last bits."""
    layer, io = load_vector(vector_id)
    x = io["x"]
    ref = testing.truth(x, layer.packed, layer.experts, layer.router, layer.bias)
    tol64 = 2.0**-29 * testing.tolerance(x, layer.experts, layer.router, layer.bias, io["y"], out_dtype="float32")
    testing.assert_within(ref, io["y"], tol64, what=f"reference on {vector_id}")


@pytest.mark.parametrize("vector_id", VECTORS)
@pytest.mark.parametrize(("backend", "library"), [
    (name, lib) for name in BACKENDS for lib in dispatch.BACKENDS[name].libraries])
def test_every_backend_reproduces_the_stored_outputs(vector_id, backend, library):
    module = require_backend(backend)
    vector = VECTORS[vector_id]
    if vector.dtype == "bfloat16" and library == "numpy":
        pytest.skip("NumPy cannot hold bfloat16")
    layer, io = load_vector(vector_id, library)
    x = as_dtype(io["x"], layer.router, vector.dtype)
    ok, reason = module.supports(x, layer.packed, layer.experts, layer.router, layer.bias)
    if not ok:
        pytest.skip(f"{backend} does not run {library} {vector.dtype}: {reason}")
    with arrays.poisoned_outputs():
        y = layer(x, backend=backend)
    tol = testing.tolerance(x, layer.experts, layer.router, layer.bias, io["y"], out_dtype=vector.dtype,
                            product_dtype=module.product_dtype(vector.dtype))
    testing.assert_within(y, io["y"], tol, what=f"{backend} ({library}) on {vector_id}")


@pytest.mark.parametrize("vector_id", VECTORS)
def test_the_generator_reproduces_the_stored_files(vector_id, tmp_path):
    """Same header (as JSON: safetensors writes metadata keys in no fixed order) and same layer bytes; same w and
    x. The stored y is checked against the reference above."""
    vector = VECTORS[vector_id]
    if vector.dtype == "bfloat16":
        pytest.importorskip("torch")
    gen.write(vector, tmp_path)
    (new_layer, new_io), (old_layer, old_io) = gen.paths(vector, tmp_path), gen.paths(vector)
    assert split(new_layer) == split(old_layer)
    assert split(new_io)[0] == split(old_io)[0]
    fresh, stored = load_file(new_io), load_file(old_io)
    for name in ("w", "x"):
        assert fresh[name].tobytes() == stored[name].tobytes()


def test_format_md_prints_the_worked_file():
    header, buffer = split(gen.paths(VECTORS["worked-k3-n2-e2-f32-bias"])[0])
    text = FORMAT_MD.read_text()
    assert hexdump(buffer) in text
    for key, entry in header.items():
        if key != "__metadata__":
            assert f'"{key}":{json.dumps(entry, separators=(",", ":"))}' in text


def test_format_md_worked_values_are_what_the_stored_layer_computes():
    """Every number of FORMAT.md's worked example, recomputed step by step in float64 from the stored layer (and
    y by the reference), to the 9 decimals the page prints; then the fp32 digits and the io companion's tokens."""
    layer, io = load_vector("worked-k3-n2-e2-f32-bias")
    text = FORMAT_MD.read_text()
    block = text[text.index("For the token x = [1, 2, -1]"):text.index("In fp32 this y is")]
    printed = {name: np.array([float(v) for v in body.split(",")])
               for name, body in re.findall(r"\b(\w+)\s+=\s+\[([^\]]+)\]", block)}
    assert set(printed) == {"x", "logits", "g", "s_in", "s_out", "xs", "p", "y"}
    f64 = {name: np.asarray(a, np.float64) for name, a in (("router", layer.router), ("s_in", layer.experts.s_in),
                                                           ("s_out", layer.experts.s_out), ("bias", layer.bias))}
    signs = mosbits.unpack(layer.packed, np.float64)
    x = printed["x"]
    logits = f64["router"] @ x
    g = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    steps = {"logits": logits, "g": g, "s_in": g @ f64["s_in"], "s_out": g @ f64["s_out"]}
    steps["xs"] = x * steps["s_in"]
    steps["p"] = signs @ steps["xs"]
    steps["y"] = steps["p"] * steps["s_out"] + f64["bias"]
    for name, value in steps.items():
        np.testing.assert_allclose(printed[name], value, rtol=0, atol=5.1e-10, err_msg=name)
    reference_y = reference.matmul(x, layer.packed, layer.experts, f64["router"], f64["bias"])
    np.testing.assert_allclose(reference_y, steps["y"], rtol=0, atol=1e-15)
    fp32 = re.search(r"In fp32 this y is `([^`]+)`", text).group(1)
    assert fp32 == ", ".join(np.format_float_positional(v) for v in reference_y.astype(np.float32))
    tokens = re.search(r"also holds the tokens\s+\[([^\]]+)\] \(y = \[([^\]]+)\]\) and \[([^\]]+)\]", text)
    second, second_y, third = (np.array([float(v) for v in group.split(",")]) for group in tokens.groups())
    stored = {tuple(row) for row in io["x"].astype(np.float64)}
    assert {tuple(x), tuple(second), tuple(third)} <= stored
    np.testing.assert_allclose(reference.matmul(second, layer.packed, layer.experts, f64["router"], f64["bias"]),
                               second_y, rtol=0, atol=5.1e-10)
    np.testing.assert_array_equal(reference.matmul(third, layer.packed, layer.experts, f64["router"], f64["bias"]),
                                  f64["bias"])
