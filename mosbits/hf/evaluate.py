"""How good, how small and how fast a (binarized) causal LM is: perplexity, size, greedy generation speed."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mosbits.hf.distillation import token_blocks
from mosbits.hf.layers import PackedMoSLinear


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of seq_len tokens.

    The text is tokenized once and cut into full windows (the remainder is dropped), as the paper (and GPTQ)
    evaluate; each window predicts its tokens 2..seq_len from the preceding ones.

    Args:
        model: a causal LM returning ``logits`` (B, T, V).
        tokenizer: its tokenizer.
        text: the evaluation text.
        seq_len: window length in tokens.
        batch_size: windows per forward pass.
        max_windows: evaluate only the first max_windows windows (None: all).
        progress: show a progress bar.
    """
    windows = token_blocks(tokenizer, text, seq_len)[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=f"perplexity ({windows.shape[0]} x {seq_len} tokens)", disable=not progress,
                      leave=False):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="sum"))
    model.train(was_training)
    return math.exp(total / (windows.shape[0] * (seq_len - 1)))


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Bytes of a model's weights, each tied tensor counted once.

    Attributes:
        dense: every weight dense at ``float_bytes`` per value (the packed layers as their N x K dense weight and
            bias).
        packed: the packed layers as stored (1-bit signs) with their floats, and every other tensor, at
            ``float_bytes`` per float value.
        binary_weights: N * K summed over the packed layers.
        dense_layers: bytes of the packed layers' dense weights and biases alone.
        packed_layers: bytes of the packed layers alone (signs, experts, router, bias).
    """

    dense: int
    packed: int
    binary_weights: int
    dense_layers: int
    packed_layers: int

    @property
    def ratio(self) -> float:
        """dense / packed."""
        return self.dense / self.packed

    @property
    def bits_per_binary_weight(self) -> float:
        """Bits per weight of the packed layers, experts, router and bias included."""
        return 8 * self.packed_layers / max(self.binary_weights, 1)


def distinct(tensors: Iterable[torch.Tensor], seen: set[tuple[int, int]] | None = None) -> Iterator[torch.Tensor]:
    """The tensors whose (storage, offset) is not in ``seen`` yet (tied weights once), adding them to it."""
    seen = set() if seen is None else seen
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            yield t


def model_size(model: nn.Module, float_bytes: int = 2) -> ModelSize:
    """Dense and packed sizes of ``model``, with float tensors counted at ``float_bytes`` (2: fp16).

    Integer tensors (the packed signs) count their real bytes.
    """
    seen: set[tuple[int, int]] = set()

    def size(t: torch.Tensor) -> int:
        return t.numel() * (float_bytes if t.is_floating_point() else t.element_size())

    packed_layers = binary_weights = dense_layers = 0
    for module in model.modules():
        if isinstance(module, PackedMoSLinear):
            packed_layers += sum(size(t) for t in distinct(module.tensors(), seen))
            weights = module.in_features * module.out_features
            binary_weights += weights
            dense_layers += (weights + (module.out_features if module.bias is not None else 0)) * float_bytes
    rest = sum(size(t) for t in distinct(model.state_dict(keep_vars=True).values(), seen))
    return ModelSize(dense=rest + dense_layers, packed=rest + packed_layers, binary_weights=binary_weights,
                     dense_layers=dense_layers, packed_layers=packed_layers)


@torch.no_grad()
def generation_speed(model: nn.Module, tokenizer: Any, prompt: str, new_tokens: int = 32, repeats: int = 1) -> float:
    """Tokens per second of greedy generation (batch 1, KV cache on), best of ``repeats`` timed runs after one
    untimed warm-up of a few tokens. Exactly ``new_tokens`` tokens are generated (end-of-text ignored)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    options = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **options)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best
