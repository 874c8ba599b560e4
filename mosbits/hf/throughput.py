"""Whole-model speed: batch-1 greedy decode and prefill of packed models against their dense bfloat16 twins.

Decode is bound by the bytes read per token. `bytes_per_token` counts them for one decode step (the packed
linears, the dense lm_head, one embedding row, the KV cache read at the step's context, every other weight), and
the floor is those bytes over the machine's measured read bandwidth. `measure` runs a model and reports tokens/s,
the floor, the share of each step spent inside the mosbits kernels (the backend call of each prepared layer, timed
around it) and the peak resident memory.

Models are named shapes (`SHAPES`: SmolLM2-135M, and LLaMA-7B width with 8 blocks, which fits beside its dense
twin in 24 GiB; per-block figures scale) or a local folder's config.json; the weights are random
(`mosbits.hf.random_packed`), since speed does not depend on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from mosbits.hf.layers import DecodeLinear, PackedMoSLinear

SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "llama-7b-width": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
        num_key_value_heads=32, tie_word_embeddings=False, max_position_embeddings=4096),
}
"""Named model shapes: SmolLM2-135M's (the real model's config), and LLaMA-7B's width and heads with 8 of its 32
blocks and SmolLM2's 49152-token vocabulary."""


def model_config(name_or_path: str) -> PretrainedConfig:
    """A config from `SHAPES` or from a local folder's config.json (a mosbits folder's base config).

    Raises:
        ValueError: neither a known name nor a folder with a config.json.
    """
    if name_or_path in SHAPES:
        return SHAPES[name_or_path]()
    from mosbits.hf.remote import base_config

    try:
        return base_config(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {name_or_path!r}: not one of {', '.join(SHAPES)} and not a folder with a "
                         f"config.json ({err})") from None


def dense_twin(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """The same config run by plain transformers: random weights in ``dtype``, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def bytes_per_token(model: nn.Module, context: int) -> dict[str, int]:
    """Bytes one batch-1 decode step reads, by part, at ``context`` tokens of KV cache.

    Parts: ``packed`` (every buffer of the `PackedMoSLinear` layers), ``dense linears`` (other linear layers of
    the decoder blocks, for a dense model), ``lm_head`` (the output projection, which is the embedding matrix
    when tied), ``embedding row`` (one row), ``kv cache`` (keys and values of every layer, model dtype), ``other``
    (norms and any remaining weight).
    """
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    packed_tensors = [t for m in model.modules() if isinstance(m, PackedMoSLinear) for t in m.tensors()]
    packed = sum(t.numel() * t.element_size() for t in packed_tensors)
    packed_ids = {id(t) for t in packed_tensors}
    seen = {id(embedding), id(head)} | packed_ids
    linears = other = 0
    for module in model.modules():
        for t in module.parameters(recurse=False):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(module, nn.Linear):
                linears += t.numel() * t.element_size()
            else:
                other += t.numel() * t.element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * context * embedding.element_size()
    return {"packed": packed, "dense linears": linears, "lm_head": head.numel() * head.element_size(),
            "embedding row": embedding.shape[1] * embedding.element_size(), "kv cache": kv, "other": other}


@dataclasses.dataclass
class Speed:
    """One model's measured speed.

    Attributes:
        decode_seconds: median seconds per generated token (batch 1, greedy, KV cache on).
        prefill_seconds: median seconds of one forward over the prefill tokens.
        prefill_tokens: tokens in that forward.
        kernel_share: fraction of the decode time spent inside the mosbits kernels (for numba the compiled call
            alone; 0 for dense; NaN on CUDA, where a host timer cannot see the kernels).
        call_share: fraction spent in the packed layers' backend calls, the kernels with the conversions of
            x and y around them (NaN on CUDA).
        bytes: `bytes_per_token` at the middle of the timed generation.
        peak_rss: peak resident bytes of the process while the model ran (Linux; 0 elsewhere); on CUDA the peak
            bytes allocated on the model's device instead.
    """

    decode_seconds: float
    prefill_seconds: float
    prefill_tokens: int
    kernel_share: float
    call_share: float
    bytes: dict[str, int]
    peak_rss: int

    @property
    def decode_tokens_per_s(self) -> float:
        return 1 / self.decode_seconds

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds

    def floor_tokens_per_s(self, bandwidth: float) -> float:
        """Tokens/s if each step took only the time to read its bytes at ``bandwidth`` bytes/s."""
        return bandwidth / sum(self.bytes.values())


@torch.no_grad()
def measure(model: nn.Module, prompt: int = 8, new_tokens: int = 32, prefill: int = 512, repeats: int = 3,
            seed: int = 0) -> Speed:
    """Greedy decode of ``new_tokens`` after a ``prompt``-token prompt and one ``prefill``-token forward, medians
    of ``repeats`` runs after a warm-up (first-call work, kernel compilation and layout derivation, untimed), on
    the model's device (CUDA: the clock is read after synchronising, and there is no kernel breakdown)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt), generator=generator).to(device)
    long_ids = torch.randint(0, vocab, (1, prefill), generator=generator).to(device)
    options = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens,
               "pad_token_id": 0}

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.generate(ids, **{**options, "min_new_tokens": 2, "max_new_tokens": 2})
    model(long_ids[:, :16])
    steps, kernel, calls = [], [], []
    for _ in range(repeats):
        with contextlib.nullcontext() if cuda else kernel_timer(model) as spent:
            start = clock()
            model.generate(ids, **options)
            elapsed = clock() - start
        steps.append(elapsed / new_tokens)
        kernel.append(math.nan if cuda else spent["kernels"][0] / elapsed)
        calls.append(math.nan if cuda else spent["calls"][0] / elapsed)
    prefills = []
    for _ in range(repeats):
        start = clock()
        model(long_ids, use_cache=False)
        prefills.append(clock() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return Speed(statistics.median(steps), statistics.median(prefills), prefill, statistics.median(kernel),
                 statistics.median(calls), bytes_per_token(model, prompt + new_tokens // 2), peak)


@contextmanager
def kernel_timer(model: nn.Module) -> Iterator[dict[str, list[float]]]:
    """Within the block, accumulate the seconds spent in the model's packed layers and in the numba dense kernel
    of its `DecodeLinear`s (the lm_head): ``"calls"`` (each backend call of a prepared layer, of a group of
    layers that share an input, `mosbits.hf.fusion`, or of the dense kernel, with the conversions of x and y
    around it) and ``"kernels"`` (for numba, the compiled call alone; for other backends the same as
    ``"calls"``)."""
    spent = {"calls": [0.0], "kernels": [0.0]}
    layers = [m for m in model.modules() if isinstance(m, PackedMoSLinear)]
    prepared = [layer.prepared() for layer in layers]
    groups = {id(g): g for layer in layers if (g := layer.__dict__.get("_shared_input")) is not None}
    served = [g for shared in groups.values() if (g := shared.prepared_group()) is not None]
    callers = prepared + [g for g in served if hasattr(g._run, "layers")]  # a backend's group; else layer by layer
    numba_layers = [p._run for p in prepared if hasattr(p._run, "kernel_seconds")]
    for run in numba_layers:
        run.kernel_seconds = spent["kernels"]
    wrapped = []
    for caller in callers:
        run = caller._run
        counts_kernels = not hasattr(run, "kernel_seconds") and not hasattr(run, "layers")

        def timed(x: Any, run: Any = run, counts_kernels: bool = counts_kernels) -> Any:
            start = time.perf_counter()
            out = run(x)
            seconds = time.perf_counter() - start
            spent["calls"][0] += seconds
            if counts_kernels:
                spent["kernels"][0] += seconds
            return out

        caller._run = timed
        wrapped.append((caller, run))
    patched = _time_dense_kernels(spent) if any(isinstance(m, DecodeLinear) for m in model.modules()) else []
    try:
        yield spent
    finally:
        for caller, run in wrapped:
            caller._run = run
        for owner, name, function in patched:
            setattr(owner, name, function)
        for run in numba_layers:
            run.kernel_seconds = None


def _time_dense_kernels(spent: dict[str, list[float]]) -> list[tuple[Any, str, Any]]:
    """Time the numba backend's dense path into ``spent`` (its `run_dense` into "calls", the compiled kernels into
    "kernels") by replacing the module attributes through which it is called; returns what to put back."""
    from mosbits.backends import numba as backend

    patched = [(backend, "run_dense", "calls"), (backend._kernels, "dense_bf16", "kernels"),
               (backend._kernels, "dense_f32", "kernels")]
    originals = []
    for owner, name, key in patched:
        function = getattr(owner, name)

        def timed(*args: Any, function: Any = function, key: str = key) -> Any:
            start = time.perf_counter()
            out = function(*args)
            spent[key][0] += time.perf_counter() - start
            return out

        setattr(owner, name, timed)
        originals.append((owner, name, function))
    return originals


def reset_peak_rss() -> None:
    """Reset Linux's peak-RSS mark of this process (``VmHWM``); no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident bytes of this process since the last `reset_peak_rss` (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) * 1024
    except (OSError, TypeError):
        return 0


__all__ = ["SHAPES", "Speed", "bytes_per_token", "dense_twin", "measure", "model_config"]
