"""ONNX export of a Hugging Face causal LM whose linear layers are `PackedMoSLinear`: the signs stay packed.

`mosbits.export.onnx(model, path)` lands here. The model is traced by torch's TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``: deprecated by torch since 2.9 but present, and it needs no package beyond
onnx; the dynamo exporter needs onnxscript). For the trace only, each `PackedMoSLinear` is swapped for an
`OnnxMoSLinear` that holds the same tensors under the same names and computes docs/FORMAT.md section 4:

    B     = UnpackSigns(signs)                                           # (N, K) float32 +1 / -1
    g     = Softmax(x @ router.T)                                        # float32, no rounding in between
    y     = ((x * (g @ s_in)) @ B.T) * (g @ s_out) + bias                # then Cast to the layer's dtype

``UnpackSigns`` is traced as one placeholder node, which is then replaced by the standard operators of
`mosbits.export.layers.sign_matrix_nodes`, the same decoder as the single-layer export's.

Constant folding is off, so the file holds the uint8 signs (N, 4 * ceil(K / 32)) as initializers and no dense
matrix; onnxruntime folds the unpacking into dense float32 signs at session start (N * K * 4 bytes per layer in
memory, as for the single-layer export of `mosbits.export`). Every other module is exported as torch traces it.

The graph: inputs ``input_ids`` and ``attention_mask``, int64 (batch, seq), both dimensions dynamic; output
``logits`` (batch, seq, vocab) in the model's dtype. Positions are ``cumsum(attention_mask) - 1`` (0 on padding), as
``generate`` computes them, so left padding works. One forward pass over whole sequences: no KV cache. Initializers
are named after the model's state_dict keys (``model.layers.0.self_attn.q_proj.signs``); model metadata holds
``mosbits.format`` and, per packed layer, ``<name>.shape`` = ``"N,K"``. The model is one protobuf: under 2 GiB.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import mosbits
from mosbits.export.layers import OPSET, sign_matrix_nodes
from mosbits.format import FORMAT_VERSION, PackedSigns
from mosbits.hf.layers import MoSLinear, PackedMoSLinear
from mosbits.hf.surgery import replace_module
from mosbits.io import FORMAT_KEY

PLACEHOLDER_DOMAIN = "mosbits"
PLACEHOLDER_OP = "UnpackSigns"
WRAPPER = "lm"
"""Attribute of `CausalLMLogits` that holds the model; stripped from initializer names."""


def export_model(model: nn.Module, path: str | os.PathLike) -> Any:
    """Export a causal LM packed by `mosbits.hf.pack` (see the module docstring); return the ``onnx.ModelProto``.

    Raises:
        ValueError: the model holds no `PackedMoSLinear`, or holds `MoSLinear` training layers (pack them first).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedMoSLinear)}
    training = [name for name, m in model.named_modules() if isinstance(m, MoSLinear)]
    if training:
        raise ValueError(f"{type(model).__name__} holds MoSLinear training layers (first: {training[0]!r}): "
                         "pack it with mosbits.hf.pack before exporting")
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no PackedMoSLinear: export a model packed by mosbits.hf.pack")
    metadata = {FORMAT_KEY: FORMAT_VERSION}
    metadata.update({f"{name}.shape": f"{m.out_features},{m.in_features}" for name, m in layers.items()})
    return export_causal_lm(model, path, metadata)


def export_causal_lm(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Any:
    """Export any transformers causal LM as the module docstring describes (dense layers stay dense; this is how
    the dense fp16 baseline of a size comparison is written); return the checked ``onnx.ModelProto``.

    The exporter's warnings about tracing, its own deprecation and advanced indexing (transformers' padding mask
    indexes with aranges, never negative) are silenced; the tests check the graph on other shapes and padding."""
    import onnx
    from onnx import helper

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(16, dtype=torch.int64).remainder(vocab).view(2, 8)
    buffer = io.BytesIO()
    training = model.training
    with warnings.catch_warnings(), swapped_for_export(model):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
        try:
            torch.onnx.export(CausalLMLogits(model).eval(), (ids, torch.ones_like(ids)), buffer, dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                              opset_version=OPSET, do_constant_folding=False,
                              custom_opsets={PLACEHOLDER_DOMAIN: 1})
        finally:
            model.train(training)
    proto = onnx.load_from_string(buffer.getvalue())
    strip_prefix(proto.graph, f"{WRAPPER}.")
    expand_placeholders(proto)
    helper.set_model_props(proto, metadata or {})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, os.fspath(path))
    return proto


class CausalLMLogits(nn.Module):
    """(input_ids, attention_mask) (batch, seq) -> logits (batch, seq, vocab) of a causal LM, without cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPER, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return getattr(self, WRAPPER)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                      use_cache=False).logits


class OnnxMoSLinear(nn.Module):
    """A `PackedMoSLinear` written with traceable torch operators (same buffers, same names), for export only."""

    def __init__(self, layer: PackedMoSLinear) -> None:
        super().__init__()
        self.in_features = layer.in_features
        for name in ("signs", "s_in", "s_out", "router", "bias"):
            self.register_buffer(name, getattr(layer, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> y (..., N) in x's dtype; x is rounded to the layer's dtype first and y after, as
        `PackedMoSLinear` does, and everything in between is float32."""
        dtype = self.s_in.dtype
        x32 = x.to(dtype).float()
        if self.router is None:
            s_in, s_out = self.s_in[0].float(), self.s_out[0].float()
        else:
            gates = torch.softmax(x32 @ self.router.float().T, dim=-1)
            s_in, s_out = gates @ self.s_in.float(), gates @ self.s_out.float()
        y = ((x32 * s_in) @ UnpackSigns.apply(self.signs, self.in_features).T) * s_out
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).to(x.dtype)


class UnpackSigns(torch.autograd.Function):
    """uint8 (N, 4 * ceil(K / 32)) format-v1 signs -> float32 (N, K) of +1 / -1 (`mosbits.unpack`); exported as
    one ``mosbits::UnpackSigns`` node that `expand_placeholders` replaces by standard operators."""

    @staticmethod
    def forward(ctx: Any, signs: torch.Tensor, k: int) -> torch.Tensor:
        return mosbits.unpack(PackedSigns(signs, (signs.shape[0], k)), torch.float32)

    @staticmethod
    def symbolic(g: Any, signs: Any, k: int) -> Any:
        return g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", signs, k_i=k)


def expand_placeholders(proto: Any) -> None:
    """Replace each ``mosbits::UnpackSigns`` node of ``proto`` by `sign_matrix_nodes` (in place, keeping the
    topological order) and drop the placeholder's opset."""
    from onnx import helper

    nodes = []
    for i, node in enumerate(proto.graph.node):
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            continue
        k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "k")
        decoded, inits = sign_matrix_nodes(f"unpack_signs_{i}.", node.input[0], node.output[0], k)
        nodes += decoded
        proto.graph.initializer.extend(inits)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [o for o in proto.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)


@contextlib.contextmanager
def swapped_for_export(model: nn.Module) -> Iterator[nn.Module]:
    """Replace every `PackedMoSLinear` of ``model`` by an `OnnxMoSLinear` sharing its tensors; put them back on
    exit."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedMoSLinear)}
    try:
        for name, layer in layers.items():
            replace_module(model, name, OnnxMoSLinear(layer))
        yield model
    finally:
        for name, layer in layers.items():
            replace_module(model, name, layer)


def strip_prefix(graph: Any, prefix: str) -> None:
    """Rename initializers ``prefix + name`` to ``name`` in an ONNX graph, and their uses by nodes."""
    renamed = {}
    for init in graph.initializer:
        if init.name.startswith(prefix):
            renamed[init.name] = init.name.removeprefix(prefix)
            init.name = renamed[init.name]
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
