"""ONNX export of packed BinaryMoS layers and of packed Hugging Face models, for runtimes without mosbits kernels.

``mosbits.export.onnx(obj, path)`` writes either kind; both keep the signs packed and decode them with the same
standard operators (`mosbits.export.layers.sign_matrix_nodes`). Needs onnx (``pip install 'mosbits[onnx]'``);
models need torch and transformers too. ``import mosbits`` does not import this package until
``mosbits.export`` is first used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from mosbits.io import MoSLinearWeights


def onnx(layers: MoSLinearWeights | Mapping[str, MoSLinearWeights] | Any, path: str | os.PathLike) -> Any:
    """Write layers, or a packed Hugging Face model, as one ONNX model.

    Args:
        layers: one layer, or name -> layer (NumPy or torch arrays on any device; float16, bfloat16 or float32);
            or a transformers causal LM (``torch.nn.Module``) whose linear layers `mosbits.hf.pack` replaced:
            see `mosbits.export.model` for its graph (inputs ``input_ids`` and ``attention_mask``, output
            ``logits``).
        path: the ``.onnx`` file to write. The model is one protobuf, so the layers together must stay under 2 GiB.

    Returns:
        The ``onnx.ModelProto`` written, checked by ``onnx.checker``. A single layer has input ``x``
        (batch, K) float32 and output ``y`` (batch, N) float32; for a mapping, layer ``name`` has its own input
        ``<name>.x`` and output ``<name>.y``, and its tensors are named ``<name>.<tensor>``. The batch dimension
        is dynamic. Model metadata holds ``mosbits.format`` and, per layer, ``<name>.shape`` (``shape`` for a
        single layer) = ``"N,K"``.

    Raises:
        ImportError: onnx is not installed (``pip install 'mosbits[onnx]'``).
        TypeError / ValueError: ``layers`` is not a layer or a non-empty mapping of layers; or a model that holds
            no packed layer.
    """
    try:
        import onnx as onnx_lib  # noqa: F401
    except ImportError as err:
        raise ImportError("mosbits.export.onnx needs the onnx package: pip install 'mosbits[onnx]'") from err
    if _is_torch_module(layers):
        from mosbits.export.model import export_model

        return export_model(layers, path)
    from mosbits.export.layers import export_layers

    return export_layers(layers, path)


def _is_torch_module(obj: Any) -> bool:
    """True when ``obj`` is a ``torch.nn.Module`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


__all__ = ["onnx"]
