"""The BinaryMoS linear layer as torch modules: `MoSLinear` for training, `PackedMoSLinear` for inference.

Shapes, for a layer with K inputs, N outputs and E experts, applied to x (..., K):

    gates = softmax(x @ router.T)            # (..., E), softmax in float32
    s_in  = gates @ S_in                     # (..., K)
    s_out = gates @ S_out                    # (..., N)
    y     = ((x * s_in) @ sign(W).T) * s_out + bias

The only difference between the two: `MoSLinear` uses ``torch.sign`` of its latent weight (as the BinaryMoS
authors do), which maps a weight of exactly 0 to 0; `PackedMoSLinear` holds one bit per weight, and
`mosbits.pack` maps 0 to +1.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mosbits
from mosbits import dispatch
from mosbits.experts import rank1_abs_factors
from mosbits.format import row_bytes
from mosbits.hf import operator
from mosbits.hf.operator import packed_linear


class SignSTE(torch.autograd.Function):
    """``torch.sign(w)`` forward; the clipped straight-through estimator backward: the gradient passes where
    ``|w| < 1`` and is zero elsewhere."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return torch.sign(w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() < 1).to(grad.dtype)


class _MoSShape(nn.Module):
    """What both layers share: K = in_features, N = out_features, E = num_experts, checked."""

    def __init__(self, in_features: int, out_features: int, num_experts: int) -> None:
        super().__init__()
        check_num_experts(num_experts)
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, bias={self.bias is not None}")


HALF_DTYPES = (torch.float16, torch.bfloat16)


class MoSLinear(_MoSShape):
    """A trainable BinaryMoS layer.

    Attributes:
        weight: (N, K) latent weight (trained; only its sign reaches the output).
        s_in: (E, K) input scales of the E experts (trained).
        s_out: (E, N) output scales (trained).
        router: ``nn.Linear(K, E, bias=False)`` (trained), or None when E = 1 (the OneBit-style layer, whose
            single expert always has gate 1).
        bias: (N,) or None, frozen.
        model_dtype: the dtype of the model the layer sits in (``dtype=``); `PackedMoSLinear.from_mos` packs
            the scales in it.

    For a float16 or bfloat16 model every tensor of the layer is float32 all the same: at the paper's learning
    rate (2e-5) an Adam step on a latent weight near |w| = 0.02 moves it by less than half the bfloat16 spacing
    there (1.2e-4), so half-precision latents would not train. Autocast (``bf16=True`` in the Trainer) runs the
    matmuls in half precision; without autocast the layer computes in float32 and returns x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, num_experts)
        self.model_dtype = dtype or torch.get_default_dtype()
        factory = {"device": device, "dtype": torch.float32 if self.model_dtype in HALF_DTYPES else dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.s_in = nn.Parameter(torch.ones(num_experts, in_features, **factory))
        self.s_out = nn.Parameter(torch.ones(num_experts, out_features, **factory))
        self.router = nn.Linear(in_features, num_experts, bias=False, **factory) if num_experts > 1 else None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, num_experts: int = 4,
                    generator: torch.Generator | None = None) -> MoSLinear:
        """The paper's initialisation from a pretrained layer.

        Args:
            weight: (N, K) pretrained weight (nn.Linear layout), copied as the latent weight.
            bias: (N,) or None, copied.
            num_experts: E >= 1.
            generator: seeds the router's default (kaiming-uniform) init; None uses torch's global RNG.

        Every expert starts as the rank-1 fit of |W| (`rank1_abs_factors`), so at step 0 the layer is OneBit's
        ``sign(W) * s_out s_in^T`` whatever the router says.
        """
        n, k = weight.shape
        layer = cls(k, n, num_experts, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        s_out, s_in = (f.to(weight.dtype) for f in rank1_abs_factors(weight))
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.s_in.copy_(s_in.expand(num_experts, k))
            layer.s_out.copy_(s_out.expand(num_experts, n))
            if bias is not None:
                layer.bias.copy_(bias)
            if layer.router is not None:  # drawn where the generator lives: the same router on any device
                router = torch.empty(layer.router.weight.shape, dtype=layer.router.weight.dtype,
                                     device=generator.device if generator is not None else "cpu")
                layer.router.weight.copy_(nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=generator))
        return layer

    def scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-wise scales for x (..., K) in the layer's dtype: s_in (..., K) and s_out (..., N), or (K,) and
        (N,) when E = 1."""
        if self.router is None:
            return self.s_in[0], self.s_out[0]
        gates = torch.softmax(self.router(x).float(), dim=-1).to(x.dtype)
        return gates @ self.s_in, gates @ self.s_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) in any float dtype -> y (..., N) in x's dtype (computed in the layer's dtype, or in
        autocast's)."""
        dtype, x = x.dtype, x.to(self.weight.dtype)
        s_in, s_out = self.scales(x)
        y = F.linear(x * s_in, SignSTE.apply(self.weight)) * s_out
        y = y if self.bias is None else y + self.bias
        return y.to(dtype)

class PackedMoSLinear(_MoSShape):
    """An inference-only BinaryMoS layer on packed signs; forward is ``mosbits.matmul(..., backend="auto")``.

    Buffers (saved by ``state_dict``, so by ``save_pretrained``):
        signs: uint8 (N, 4 * ceil(K / 32)), the format-v1 bits of sign(W) (docs/FORMAT.md).
        s_in: (E, K), s_out: (E, N), float; their dtype is the layer's.
        router: (E, K) in the layer's dtype; None when E = 1 (then the gate is 1 and a zero router stands in).
        bias: (N,) or None.

    `trainable_scales` turns s_in, s_out and router into trainable ``nn.Parameter``s (same names, same
    ``state_dict``) and back; the signs never train.

    Attribute ``precision`` ("exact" by default, or "fast": `mosbits.precision`) is the ``precision=`` of its
    calls; `set_precision` sets it for a whole model. It is not saved.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, num_experts)
        self.precision = "exact"
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("signs", torch.zeros(out_features, row_bytes(in_features), dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("s_in", torch.ones(num_experts, in_features, **factory))
        self.register_buffer("s_out", torch.ones(num_experts, out_features, **factory))
        self.register_buffer("router", torch.zeros(num_experts, in_features, **factory) if num_experts > 1 else None)
        self.register_buffer("bias", torch.zeros(out_features, **factory) if bias else None)
        operator.track(self)

    @classmethod
    def from_mos(cls, layer: MoSLinear) -> PackedMoSLinear:
        """Pack a trained `MoSLinear`: signs of its latent weight (0 -> +1), copies of its scales, router and bias
        in the layer's ``model_dtype`` (rounded from float32 for a half-precision model)."""
        weight = layer.weight.detach()
        packed = cls(layer.in_features, layer.out_features, layer.num_experts, bias=layer.bias is not None,
                     device=weight.device, dtype=layer.model_dtype)
        with torch.no_grad():
            packed.signs.copy_(mosbits.pack(weight).data)
            packed.s_in.copy_(layer.s_in)
            packed.s_out.copy_(layer.s_out)
            if layer.router is not None:
                packed.router.copy_(layer.router.weight)
            if layer.bias is not None:
                packed.bias.copy_(layer.bias)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) in any float dtype -> y (..., N) in x's dtype, computed in the layer's dtype.

        Inference goes through `prepared`, or, for a layer linked with the siblings that read the same input
        (`mosbits.hf.fusion`), through one call for all of them; an input that needs gradients, or scales being
        trained (`trainable_scales`), go through ``mosbits.matmul``, whose automatic choice then takes a
        differentiable backend. Under ``torch.compile`` and ``torch.jit.trace``, inference is one
        ``torch.ops.mosbits.packed_linear`` node (`mosbits.hf.operator`)."""
        source, dtype = x, x.dtype
        s_in = self._held("s_in")
        if dtype != s_in.dtype:
            x = x.to(s_in.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or s_in.requires_grad):
            packed, experts, router, bias = self.matmul_args()
            return mosbits.matmul(x, packed, experts, router, bias=bias, precision=self.precision).to(dtype)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return packed_linear(x, self._held("signs"), self.in_features, s_in, self._held("s_out"),
                                 self._gate_router(), self._held("bias"), self.precision).to(dtype)
        y = self.infer(source, x)
        return y if y.dtype == dtype else y.to(dtype)

    def infer(self, source: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (..., N) in the layer's dtype of x (..., K), ``source`` cast to the layer's dtype (or ``source``
        itself), with no gradient: the prepared layer's output, or for a layer linked with the siblings that read
        the same input (`mosbits.hf.fusion`), the output of one call for all of them."""
        shared = self.__dict__.get("_shared_input")
        return self.prepared()(x) if shared is None else shared.output(self, source, x)

    def _held(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` (a buffer, or a parameter while `trainable_scales` is on), read from the module's
        dicts: ``nn.Module.__getattr__`` costs about a microsecond a name, several per call at batch 1."""
        buffers = self._buffers
        return buffers[name] if name in buffers else self._parameters[name]

    def prepared(self) -> mosbits.PreparedLayer:
        """This layer as a `mosbits.PreparedLayer` (validated once, backend chosen once), rebuilt when
        ``precision`` or ``MOSBITS_BACKEND`` changes, and when a buffer is replaced, moved or changed in place
        (tracked by identity and torch's version counter: the cached layer holds the old tensors, so an identity
        is never reused while it is cached). Writes that torch does not count (through ``buffer.data`` or a NumPy
        view of a buffer) are not seen: change buffers with in-place torch ops, ``load_state_dict`` or
        assignment. Buffers made under ``torch.inference_mode`` carry no version counter: such a layer is prepared
        anew on every call (correct, and slow)."""
        held = self._held
        signs, s_in, s_out, router, bias = held("signs"), held("s_in"), held("s_out"), held("router"), held("bias")
        try:
            key = (self.precision, os.environ.get(dispatch.ENV_VAR), id(signs), signs._version, id(s_in),
                   s_in._version, id(s_out), s_out._version, id(router), router is not None and router._version,
                   id(bias), bias is not None and bias._version)
        except RuntimeError:  # buffers made under torch.inference_mode have no version counter: never cached
            return mosbits.prepare(*self.matmul_args(), precision=self.precision)
        cached = self.__dict__.get("_prepared")
        if cached is None or cached[0] != key:
            cached = (key, mosbits.prepare(*self.matmul_args(), precision=self.precision))
            self.__dict__["_prepared"] = cached
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the prepared layer behind (it holds backend modules, which do not pickle);
        the copy prepares its own on its first forward."""
        state = self.__dict__.copy()
        state.pop("_prepared", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        operator.track(self)

    def serves(self, signs: torch.Tensor, in_features: int, s_in: torch.Tensor, s_out: torch.Tensor,
               router: torch.Tensor, bias: torch.Tensor | None, precision: str) -> bool:
        """Whether ``torch.ops.mosbits.packed_linear``'s arguments are this layer as it is now: its buffers (the
        same memory, shape, dtype and strides), its precision, and for E = 1 a zero router row."""
        held = self._held
        pairs = [(signs, held("signs")), (s_in, held("s_in")), (s_out, held("s_out")), (bias, held("bias"))]
        mine = held("router")
        if mine is not None:
            pairs.append((router, mine))
        elif router.shape != (1, self.in_features) or bool(router.any()):
            return False
        return (precision == self.precision and in_features == self.in_features
                and all(a is b or (a is not None and b is not None and a.data_ptr() == b.data_ptr()
                                   and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
                                   and a.stride() == b.stride()) for a, b in pairs))

    def tensors(self) -> list[torch.Tensor]:
        """signs, s_in, s_out, router (absent when E = 1) and bias (when there is one): the layer's tensors,
        buffers or, while `trainable_scales` is on, partly parameters."""
        return [t for t in (self.signs, self.s_in, self.s_out, self.router, self.bias) if t is not None]

    def matmul_args(self) -> tuple[mosbits.PackedSigns, mosbits.Experts, torch.Tensor, torch.Tensor | None]:
        """The layer as ``mosbits.matmul``'s (packed (N, K), experts, router (E, K), bias (N,) or None); with
        E = 1 the router is a zero (1, K) tensor (gate exactly 1)."""
        packed = mosbits.PackedSigns(self.signs, (self.out_features, self.in_features))
        return packed, mosbits.Experts(self.s_in, self.s_out), self._gate_router(), self.bias

    def _gate_router(self) -> torch.Tensor:
        """The router (E, K), or for E = 1 a zero (1, K) tensor (gate exactly 1)."""
        router = self._held("router")
        return router if router is not None else self._held("s_in").new_zeros(1, self.in_features)


class DecodeLinear(nn.Linear):
    """A dense ``nn.Linear`` whose inference on a token or two, on the CPU in bfloat16 or float32, runs the numba
    backend's dense kernel (`mosbits.backends.numba.dense`: the weight read once at memory speed; torch's
    matrix-vector product reached about half of that here); every other call is ``nn.Linear.forward``.

    Same parameters, ``state_dict`` and precision as the ``nn.Linear`` it was (`serve_dense_linears` changes the
    class of a model's own module, so tied weights stay tied); only the summation order differs. A packed model
    keeps its lm_head dense (the paper keeps it 16-bit), and at batch 1 that head is most of the bytes read per
    token. ``MOSBITS_BACKEND`` set to a backend other than numba turns it off. ``torch.compile`` records one
    ``torch.ops.mosbits.dense_linear`` node (`mosbits.hf.operator.dense_linear`: the same choice at run time) where no
    gradient is wanted, the plain ``nn.Linear`` otherwise; ``torch.jit.trace`` and ONNX export record the plain
    ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            return super().forward(x)
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)):
                return super().forward(x)
            return torch.ops.mosbits.dense_linear.default(x, self.weight, self.bias)
        return operator.dense_linear(x, self.weight, self.bias)


def serve_dense_linears(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a `DecodeLinear` (in place: the modules keep their identity and
    tensors); returns how many. Nothing changes where the numba backend is not installed."""
    if not dispatch.spec("numba").is_installed():
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for layer in layers:
        layer.__class__ = DecodeLinear
    return len(layers)


def check_num_experts(num_experts: Any) -> None:
    """Raise unless ``num_experts`` is an int >= 1."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def set_precision(model: nn.Module, precision: str) -> int:
    """Set the ``precision=`` ("exact" or "fast", `mosbits.precision`) of every `PackedMoSLinear` in ``model``;
    returns how many there are. "fast" runs on the numba backend only: the next forward raises elsewhere."""
    mosbits.precision.check(precision)
    layers = [m for m in model.modules() if isinstance(m, PackedMoSLinear)]
    for layer in layers:
        layer.precision = precision
    return len(layers)


TRAINABLE = ("s_in", "s_out", "router")


def trainable_scales(model: nn.Module, enabled: bool = True) -> int:
    """Make the scales and routers of every `PackedMoSLinear` in ``model`` trainable ``nn.Parameter``s
    (``enabled``), or plain buffers again; returns how many layers there are.

    The signs stay frozen bits. While enabled, ``model.parameters()`` yields the scales (for an optimizer, a
    ``transformers.Trainer`` or `mosbits.hf.distill`), and a forward under autograd runs on the differentiable
    torch backend; ``state_dict`` keys do not change either way. A model loaded packed in float16 or bfloat16
    trains its scales in that dtype: load it in float32 to train them at full precision.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedMoSLinear)]
    for layer in layers:
        for name in TRAINABLE:
            tensor = getattr(layer, name)
            if tensor is None:
                continue
            layer._parameters.pop(name, None)
            layer._buffers.pop(name, None)
            if enabled:
                layer.register_parameter(name, nn.Parameter(tensor.detach(), requires_grad=True))
            else:
                layer.register_buffer(name, tensor.detach())
    return len(layers)
