"""Packed layers that read the same input, served by one call: the runtime plan of a packed model.

In a decoder block, q_proj, k_proj and v_proj read the same hidden states, and so do gate_proj and up_proj.
Transformers calls them one after the other; at batch 1 each call costs tens of microseconds of Python and
conversions around a kernel of about the same length. `share_inputs` links such siblings into a `SharedInput`:
the first of them called with x computes every member's output for x in one `mosbits.PreparedGroup` call
(numba: one compiled call, one conversion of x) and keeps the others' outputs until they are called with the
same x. The on-disk format does not change (one layer per linear); the plan (`plan`: this sharing, and the
dense lm_head served by `mosbits.hf.layers.DecodeLinear` at decode batch sizes) is built when a packed model is
built or loaded (`mosbits.hf.load`, ``from_pretrained``, `mosbits.hf.pack`, `mosbits.hf.calibrate`,
`mosbits.hf.random_packed`), so no extra call is needed.

A kept output is returned only to its own layer, only for the very tensor it was computed from (the same
object, unchanged since: torch's version counter; tensors made under ``torch.inference_mode`` have none, so their
calls run alone) and only while that layer's prepared form is the one that
computed it. Where the assumption fails (a member called with another input, as a cross-attention's k_proj is,
or never called at all), a computed output goes unused: the group notices, stops sharing for good and its layers
run alone from then on, so a wrong guess costs one wasted computation, never a wrong output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import mosbits
from mosbits.hf.layers import PackedMoSLinear, serve_dense_linears

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                 ("w1", "w3"))
"""Sibling names whose layers read one input in the architectures transformers ships (LLaMA, Mistral, Qwen2,
OPT and others: q/k/v and gate/up; BERT-style attention; Mixtral-style experts' w1/w3)."""


class SharedInput:
    """Packed layers that read the same input (see the module docstring); each member's forward calls
    ``output(member, source, x)`` instead of running alone.

    Attributes:
        members: the layers, in call order of a forward.
        sharing: False once an output went unused; the layers then run alone.
    """

    def __init__(self, members: list[PackedMoSLinear]) -> None:
        self.members = tuple(members)
        self.sharing = True
        self._index = {id(member): i for i, member in enumerate(self.members)}
        self._pending: list[tuple[Any, int, Any, Any] | None] = [None] * len(self.members)
        self._group: tuple[tuple[Any, ...], mosbits.PreparedGroup | None] = ((), None)

    def output(self, layer: PackedMoSLinear, source: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (..., N) of ``layer`` for x (..., K) (``source`` cast to the layer's dtype, or ``source`` itself):
        the output kept for it when ``source`` is the tensor it was computed from, else the whole group's outputs
        computed now (one call), the others' kept."""
        if not self.sharing:
            return layer.prepared()(x)
        index = self._index[id(layer)]
        kept, self._pending[index] = self._pending[index], None
        if kept is not None:
            prepared = layer.prepared()
            if kept[0] is source and kept[1] == source._version and kept[3] is prepared:
                return kept[2]
            return self._stop(prepared, x)
        if self._pending.count(None) < len(self._pending):  # another member's output is still kept
            return self._stop(layer.prepared(), x)
        if source.is_inference():  # no version counter (torch.inference_mode): a kept output could not be checked
            return layer.prepared()(x)
        layers = tuple(member.prepared() for member in self.members)
        group = self._group_of(layers)
        if group is None:
            return layers[index](x)
        outputs = group(x)
        version = source._version
        self._pending = [None if i == index else (source, version, y, layers[i]) for i, y in enumerate(outputs)]
        return outputs[index]

    def _stop(self, prepared: mosbits.PreparedLayer, x: torch.Tensor) -> torch.Tensor:
        """Stop sharing (an output went unused: the members do not read one input) and run this layer alone."""
        self.sharing = False
        self._pending = [None] * len(self.members)
        return prepared(x)

    def prepared_group(self) -> mosbits.PreparedGroup | None:
        """The `mosbits.PreparedGroup` of the members' current prepared layers (rebuilt when one of them is), or
        None when they cannot share a call (different precision, dtype or backend)."""
        return self._group_of(tuple(member.prepared() for member in self.members))

    def _group_of(self, layers: tuple[mosbits.PreparedLayer, ...]) -> mosbits.PreparedGroup | None:
        """`prepared_group` for the members' prepared layers ``layers``, kept while they stay the same."""
        if self._group[0] != layers:
            try:
                group = mosbits.prepare_group(list(layers))
            except ValueError:
                group = None
            self._group = (layers, group)
        return self._group[1]

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the members and drop kept outputs and the prepared group."""
        return {"members": self.members, "sharing": self.sharing}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(list(state["members"]))
        self.sharing = state["sharing"]


def plan(model: nn.Module) -> None:
    """The runtime plan of a packed model, built where one is built or loaded: `share_inputs`, and the dense
    linears it keeps (its lm_head) served at decode batch sizes by `mosbits.hf.layers.DecodeLinear`."""
    share_inputs(model)
    serve_dense_linears(model)


def share_inputs(model: nn.Module) -> int:
    """Link the packed layers of ``model`` that read one input (`SHARED_INPUTS`: siblings under one parent with
    equal in_features) into `SharedInput` groups; returns how many groups there are. Idempotent; layers not in a
    group keep running alone."""
    count = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUTS:
            members = [children.get(name) for name in names]
            members = [m for m in members if isinstance(m, PackedMoSLinear)]
            if len(members) < 2 or len({m.in_features for m in members}) > 1:
                continue
            group = SharedInput(members)
            for member in members:
                member.__dict__["_shared_input"] = group
            count += 1
    return count


__all__ = ["SHARED_INPUTS", "SharedInput", "plan", "share_inputs"]
