"""ONNX graphs of packed layers, and the one ONNX decoder of the format-v1 bit layout (`sign_matrix_nodes`).

The graph keeps the signs packed: its initializers are the format-v1 bytes (uint8 (N, 4 * ceil(K / 32)), see
docs/FORMAT.md) and the float parameters in their own dtype, and standard operators (opset 18) rebuild the layer::

    bits   = BitwiseAnd(BitShift(Unsqueeze(signs, 2), [0..7], RIGHT), 1)   # (N, RB, 8) uint8, bit k % 8 of byte k // 8
    B      = Cast(Slice(Reshape(bits, (N, 8 * RB)), :K)) * 2 - 1           # (N, K) float32, +1 / -1
    g      = Softmax(x @ router.T)                                          # (batch, E)
    y      = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias                  # (batch, N)

Everything after the initializers runs in float32 (fp16 / bf16 parameters are widened by a Cast, exactly). The
file stays packed, but a runtime that folds constants (onnxruntime does, by default) builds the dense (N, K) float32
signs in memory at session start: N * K * 4 bytes, and a few times that at the peak.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mosbits import arrays
from mosbits.format import FORMAT_VERSION
from mosbits.io import FORMAT_KEY, MoSLinearWeights

OPSET = 18
"""BitwiseAnd needs opset 18; the model declares the IR version that opset requires (8), for older runtimes."""


def export_layers(layers: MoSLinearWeights | Mapping[str, MoSLinearWeights], path: str | os.PathLike) -> Any:
    """Write one layer, or name -> layer, as one ONNX model (see `mosbits.export.onnx`); return the checked
    ``onnx.ModelProto``."""
    import onnx as onnx_lib
    from onnx import helper

    from mosbits import __version__

    named = _named_layers(layers)
    nodes, initializers, inputs, outputs = [], [], [], []
    metadata = {FORMAT_KEY: FORMAT_VERSION}
    for name, layer in named.items():
        prefix = "" if name is None else f"{name}."
        layer_nodes, layer_inits = _layer_graph(prefix, layer)
        nodes += layer_nodes
        initializers += layer_inits
        n, k = layer.packed.shape
        inputs.append(helper.make_tensor_value_info(f"{prefix}x", onnx_lib.TensorProto.FLOAT, ["batch", k]))
        outputs.append(helper.make_tensor_value_info(f"{prefix}y", onnx_lib.TensorProto.FLOAT, ["batch", n]))
        metadata["shape" if name is None else f"{name}.shape"] = f"{n},{k}"
    graph = helper.make_graph(nodes, "mosbits", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mosbits", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(model, metadata)
    onnx_lib.checker.check_model(model, full_check=True)
    onnx_lib.save_model(model, os.fspath(path))
    return model


def _named_layers(layers: Any) -> dict[str | None, MoSLinearWeights]:
    """{None: layer} for one layer, else the mapping, checked."""
    if isinstance(layers, MoSLinearWeights):
        return {None: layers}
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError(f"layers must be a MoSLinearWeights or a non-empty mapping name -> MoSLinearWeights, "
                         f"got {type(layers).__name__}{' (empty)' if isinstance(layers, Mapping) else ''}")
    for name, layer in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layer names must be non-empty strings, got {name!r}")
        if not isinstance(layer, MoSLinearWeights):
            raise TypeError(f"layers[{name!r}] must be MoSLinearWeights, got {type(layer).__name__}")
    return dict(layers)


def _layer_graph(p: str, layer: MoSLinearWeights) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers of one layer, every name prefixed by ``p``: input ``{p}x``, output ``{p}y``."""
    from onnx import TensorProto, helper

    k = layer.packed.shape[1]
    node = helper.make_node
    nodes, inits = sign_matrix_nodes(p, f"{p}signs", f"{p}sign_matrix", k)
    inits.insert(0, _initializer(f"{p}signs", layer.packed.data))
    nodes.append(node("Transpose", [f"{p}sign_matrix"], [f"{p}signs_t"], perm=[1, 0]))  # (K, N)
    params = {"router": layer.router, "s_in": layer.experts.s_in, "s_out": layer.experts.s_out}
    if layer.bias is not None:
        params["bias"] = layer.bias
    for name, a in params.items():
        inits.append(_initializer(f"{p}{name}", a))
        if arrays.dtype_name(a) != "float32":
            nodes.append(node("Cast", [f"{p}{name}"], [f"{p}{name}_f32"], to=TensorProto.FLOAT))
    f32 = {name: f"{p}{name}" if arrays.dtype_name(a) == "float32" else f"{p}{name}_f32" for name, a in params.items()}
    nodes += [
        node("Transpose", [f32["router"]], [f"{p}router_t"], perm=[1, 0]),              # (K, E)
        node("MatMul", [f"{p}x", f"{p}router_t"], [f"{p}logits"]),                      # (batch, E)
        node("Softmax", [f"{p}logits"], [f"{p}gates"], axis=-1),
        node("MatMul", [f"{p}gates", f32["s_in"]], [f"{p}token_s_in"]),                 # (batch, K)
        node("MatMul", [f"{p}gates", f32["s_out"]], [f"{p}token_s_out"]),               # (batch, N)
        node("Mul", [f"{p}x", f"{p}token_s_in"], [f"{p}xs"]),                           # (batch, K)
        node("MatMul", [f"{p}xs", f"{p}signs_t"], [f"{p}product"]),                     # (batch, N)
    ]
    if "bias" in params:
        nodes += [node("Mul", [f"{p}product", f"{p}token_s_out"], [f"{p}scaled"]),
                  node("Add", [f"{p}scaled", f32["bias"]], [f"{p}y"])]
    else:
        nodes.append(node("Mul", [f"{p}product", f"{p}token_s_out"], [f"{p}y"]))
    return nodes, inits


def sign_matrix_nodes(p: str, signs: str, out: str, k: int) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers (names prefixed by ``p``) that decode the format-v1 bytes named ``signs``, uint8
    (N, 4 * ceil(K / 32)), into ``out``, float32 (N, K) of +1 / -1, with shifts and masks only (opset 18). The
    only ONNX decoder of the bit layout: the layer graphs here and the model export (`mosbits.export.model`) use it.
    """
    from onnx import TensorProto, helper

    inits = [
        _initializer(f"{p}bit_shifts", np.arange(8, dtype=np.uint8)),
        _initializer(f"{p}bit_mask", np.array(1, dtype=np.uint8)),
        _initializer(f"{p}unsqueeze_axes", np.array([2], dtype=np.int64)),
        _initializer(f"{p}bits_shape", np.array([0, -1], dtype=np.int64)),
        _initializer(f"{p}slice_starts", np.array([0], dtype=np.int64)),
        _initializer(f"{p}slice_ends", np.array([k], dtype=np.int64)),
        _initializer(f"{p}slice_axes", np.array([1], dtype=np.int64)),
        _initializer(f"{p}two", np.array(2.0, dtype=np.float32)),
        _initializer(f"{p}one", np.array(1.0, dtype=np.float32)),
    ]
    node = helper.make_node
    nodes = [
        node("Unsqueeze", [signs, f"{p}unsqueeze_axes"], [f"{p}bytes"]),                  # (N, RB, 1)
        node("BitShift", [f"{p}bytes", f"{p}bit_shifts"], [f"{p}shifted"], direction="RIGHT"),  # (N, RB, 8)
        node("BitwiseAnd", [f"{p}shifted", f"{p}bit_mask"], [f"{p}bits"]),                # (N, RB, 8)
        node("Reshape", [f"{p}bits", f"{p}bits_shape"], [f"{p}bit_rows"]),                # (N, 8 RB)
        node("Slice", [f"{p}bit_rows", f"{p}slice_starts", f"{p}slice_ends", f"{p}slice_axes"],
             [f"{p}bit_matrix"]),                                                           # (N, K)
        node("Cast", [f"{p}bit_matrix"], [f"{p}bit_float"], to=TensorProto.FLOAT),
        node("Mul", [f"{p}bit_float", f"{p}two"], [f"{p}bit_double"]),
        node("Sub", [f"{p}bit_double", f"{p}one"], [out]),                                # (N, K) +1 / -1
    ]
    return nodes, inits


_ONNX_DTYPES = {"uint8": "UINT8", "int64": "INT64", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "float32": "FLOAT"}


def _initializer(name: str, a: Any) -> Any:
    """A TensorProto holding array ``a`` (NumPy, or torch on any device) in its own dtype, as little-endian raw
    bytes; bfloat16 (torch only) is stored as its 16-bit patterns."""
    from onnx import TensorProto, helper

    dtype = arrays.dtype_name(a)
    if arrays.is_torch(a):
        import torch

        a = a.detach().cpu().contiguous()
        a = a.view(torch.int16).numpy() if dtype == "bfloat16" else a.numpy()
    data = np.asarray(a, order="C")
    raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
    return helper.make_tensor(name, getattr(TensorProto, _ONNX_DTYPES[dtype]), data.shape, raw, raw=True)
