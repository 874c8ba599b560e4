"""Post-training BinaryMoS: calibrate a model block by block on a little text, then (optionally) distil it.

::

    report = mosbits.hf.calibrate(model, texts, tokenizer=tokenizer, num_experts=4, out="smollm2-mos")

What happens, for a model whose decoder blocks are found by `mosbits.hf.surgery.decoder_blocks`:

1. The calibration text is tokenized in chunks into ``samples`` windows of ``seq_len`` tokens, and the input of
   the first decoder block is recorded for every window (one embedding pass; the rest of the model is not run).
2. Two activation streams of shape (samples, seq_len, D) go through the blocks in order: the *teacher* stream,
   run through the full-precision blocks, and the *student* stream, run through the blocks already binarized.
3. For each block: its full-precision output on the teacher stream is the target; its linear layers become
   `MoSLinear`, started either as the paper does (``start="paper"``: every expert the rank-1 fit of |W|) or
   from the layers' inputs on the student stream (``start="data"``, `mosbits.hf.fitting`: least-squares scales,
   expert e fitted on the e-th cluster of the input tokens, the router from the cluster centres); then
   ``steps_per_block`` Adam steps on minibatches of the student stream minimise
   ``||block(x_student) - target||^2 / ||target||^2`` over the latent weights (clipped straight-through sign),
   scales and routers; the block is packed (`PackedMoSLinear`) and the student stream moves on through the
   packed block. Because each block learns to map the student's input to the teacher's output, errors of earlier
   blocks are corrected, not compounded.
4. Optionally, ``distill_steps`` of end-to-end distillation (`mosbits.hf.distill`'s loss) of the packed model's
   scales and routers, its signs frozen (`mosbits.hf.trainable_scales`).

Memory: `peak_memory` states the formula, term by term, for a given model and settings. On the CPU, the block
stage peaks at

    P                                           the model (dense blocks, then packed ones), and P again for the
                                                distillation's teacher copy when distill_steps > 0
    + 2 * samples * seq_len * D * 4             the two float32 streams (0 with offload_dir: disk-backed arrays)
    + 16 * p                                    one block's fp32 latents, gradients and Adam's two moments
    + 4 * batch_size * seq_len * a              one minibatch's autograd activations, a = sum over the block's
                                                linears of (K + N) + 4 * I + 4 * D floats per token

for P bytes of weights, D the hidden size, p the weights of the largest block's linears and I its widest linear.
With ``device="cuda"`` the last two terms are device memory and the model stays on the CPU: a 70B LLaMA
(P = 140 GB bf16 in host RAM; p = 0.86e9, D = 8192, I = 28672) calibrated on 128 x 2048 tokens needs 17 GB of
streams (in RAM or on disk) and 14 GB + 4 x 2048 x 0.4 MB = 17 GB for batch 4 on the device: one 80 GB GPU.
The distillation stage (streams and block gone, the model packed) peaks at

    P_packed + P                                the packed model and the teacher copy
    + 4 * batch_size * seq_len * b              a whole model's activations kept for the backward, b = blocks x
                                                (sum over a block's linears of N + 4 * I + 8 * D) + 3 * V
                                                + (blocks + 1) * D floats per token (V the vocabulary: student
                                                and teacher logits and their gradient; the teacher's hidden states)

which grows with the model's depth and width: 16 MB per token for a LLaMA-7B, 130 GB for 4 x 2048 tokens. With
``distill_checkpointing`` only each block's input is kept and one block's activations are recomputed at a time:
b = (blocks + 1) * D + (sum of N + 4 * I + 8 * D) + 3 * V + (blocks + 1) * D, 2 MB per token for LLaMA-7B.
These count live tensors; the process's RSS holds more, since the allocator keeps freed temporaries (on SmolLM2,
about 1.2x the distillation term plus about 0.3 GB for the Trainer).

Each finished block is written to ``out/calibration/`` with the run's settings; a rerun with the same settings
continues after the last finished block (the streams are recomputed through the finished blocks).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from mosbits.hf import fitting
from mosbits.hf.config import MoSConfig
from mosbits.hf.evaluate import distinct
from mosbits.hf.fusion import plan
from mosbits.hf.layers import MoSLinear, PackedMoSLinear, check_num_experts, trainable_scales
from mosbits.hf.surgery import (
    LINEAR_TYPES,
    _bias,
    _is_conv1d,
    _record,
    decoder_blocks,
    linear_shape,
    replace_module,
)
from mosbits.io import write_atomically

CHECKPOINT_DIR = "calibration"
MANIFEST = "manifest.json"
TEXT_CHUNK_CHARS = 1 << 16
"""Characters tokenized per tokenizer call: a long text or corpus is never tokenized in one call."""
STARTS = ("paper", "data")
"""Where each block's reconstruction starts: the paper's fit of |W| (all experts alike), or scales fitted to the
layers' inputs with experts on clusters of them (`mosbits.hf.fitting`)."""
START_TOKENS = 4096
"""Tokens of the student stream (whole windows, spread over the calibration set) that the data start fits on."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a calibration run depends on; a checkpoint folder is resumed only with equal settings."""

    num_experts: int = 4
    samples: int = 64
    seq_len: int = 256
    steps_per_block: int = 120
    batch_size: int = 4
    lr: float = 1e-2
    latent_lr: float = 1e-3
    seed: int = 0
    start: str = "paper"

    def __post_init__(self) -> None:
        check_num_experts(self.num_experts)
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.steps_per_block, bool) or not isinstance(self.steps_per_block, int) \
                or self.steps_per_block < 0:
            raise ValueError(f"steps_per_block must be an int >= 0, got {self.steps_per_block!r}")
        for name in ("lr", "latent_lr"):
            value = getattr(self, name)
            if not (isinstance(value, float | int) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


@dataclasses.dataclass
class BlockResult:
    """One block's reconstruction: relative squared error ``||out - target||^2 / ||target||^2`` over all
    calibration tokens, at the paper's start (``start``) and once packed (``packed``); seconds spent."""

    name: str
    start: float
    packed: float
    seconds: float
    resumed: bool = False


@dataclasses.dataclass
class CalibrationReport:
    """What `calibrate` did: the settings, one `BlockResult` per decoder block, the distillation losses (empty
    when ``distill_steps`` is 0) and the wall time of each stage in seconds."""

    settings: Settings
    blocks: list[BlockResult]
    distill_losses: list[float]
    seconds: dict[str, float]


def calibrate(model: nn.Module, data: Any, *, tokenizer: Any = None, num_experts: int = 4, samples: int = 64,
              seq_len: int = 256, steps_per_block: int = 120, batch_size: int = 4, lr: float = 1e-2,
              latent_lr: float = 1e-3, distill_steps: int = 0, distill_lr: float = 2e-3,
              distill_samples: int | None = None, distill_checkpointing: bool = False,
              device: str | torch.device | None = None, out: str | os.PathLike | None = None,
              offload_dir: str | os.PathLike | None = None, seed: int = 0, start: str = "paper",
              progress: bool = True) -> CalibrationReport:
    """Binarize ``model`` in place, block by block, on calibration text; leave it packed.

    Args:
        model: a dense transformers causal LM (float32, float16 or bfloat16) on the CPU.
        data: the calibration text: a string, a path to a UTF-8 text file (`pathlib.Path`), an iterable of
            strings, or a Hugging Face ``datasets`` dataset (also streamed) with a ``"text"`` column; read and
            tokenized in chunks only until ``samples * seq_len`` tokens are there.
        tokenizer: the model's tokenizer; default ``AutoTokenizer.from_pretrained(model.name_or_path)``.
        num_experts: E >= 1 experts per layer (1: OneBit-style, no router).
        samples, seq_len: the calibration set, ``samples`` windows of ``seq_len`` tokens.
        steps_per_block: Adam steps per decoder block, each on ``batch_size`` windows (0: paper start, packed).
        lr, latent_lr: Adam's learning rates (cosine decay to 0) of the scales and routers, and of the latent
            weights.
        distill_steps, distill_lr: end-to-end distillation of the packed model's scales and routers afterwards
            (`distill_scales`; 0: none). Its teacher is a copy of the dense model taken at the start: P more
            bytes of memory.
        distill_samples: windows of ``seq_len`` tokens the distillation draws its batches from: the first
            ``distill_samples`` windows of ``data`` (default: the ``samples`` calibration windows). More costs
            only tokenizing, since the teacher runs on each batch: on SmolLM2-135M, 80 steps on 256 windows
            reached held-out perplexity 59.8 against 72.0 on the 64 calibration windows (README).
        distill_checkpointing: recompute each decoder block's activations in the distillation's backward
            (transformers' gradient checkpointing) instead of keeping them: the same model, bit for bit, in more
            time (about 1.1x per step on SmolLM2 at 4 x 256 tokens, README), with the memory of `peak_memory`'s
            ``checkpointing`` (for a LLaMA-7B 2 MB per token instead of 16).
        device: where each block trains (default: "cuda" when available, else "cpu"); the model stays on CPU.
        out: a folder for per-block checkpoints (resumed by a rerun with the same settings) and, at the end, the
            packed model (``save_pretrained``) and the tokenizer. None: nothing is written.
        offload_dir: keep the two activation streams in disk-backed arrays in this folder instead of RAM.
        seed: seeds the routers' init and the minibatch order (one generator per block, so that a resumed run
            gives the same model as an uninterrupted one) and the distillation.
        start: each block's start before reconstruction (`STARTS`): ``"paper"``, every expert the rank-1 fit of
            |W|; ``"data"``, scales fitted to the layers' inputs on `START_TOKENS` student tokens, expert e on
            the e-th cluster of those tokens and the router from the cluster centres (`mosbits.hf.fitting`).
            "data" starts every block with a lower error, but on SmolLM2-135M it ended at a higher held-out
            perplexity (176.7 against 162.3 for E = 4; README), so "paper" is the default.
        progress: show a progress bar per stage.

    Returns:
        A `CalibrationReport`.

    Raises:
        ValueError: bad settings, no decoder blocks, a model that already holds mosbits layers, too little
            text, an ``out`` folder holding a different run, NaN or inf weights, or a diverged reconstruction.
    """
    settings = Settings(num_experts, samples, seq_len, steps_per_block, batch_size, lr, latent_lr, seed, start)
    device = training_device(device)
    if any(isinstance(m, MoSLinear | PackedMoSLinear) for m in model.modules()):
        raise ValueError("model already holds MoSLinear / PackedMoSLinear layers; calibrate a dense model")
    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise ValueError(f"distill_steps must be an int >= 0, got {distill_steps!r}")
    if distill_samples is None:
        distill_samples = samples
    if isinstance(distill_samples, bool) or not isinstance(distill_samples, int) or distill_samples < 1:
        raise ValueError(f"distill_samples must be an int >= 1 or None, got {distill_samples!r}")
    blocks = decoder_blocks(model)
    layers = {block: [f"{block}.{name}" for name, m in model.get_submodule(block).named_modules()
                      if isinstance(m, LINEAR_TYPES)] for block in blocks}
    if not any(layers.values()):
        raise ValueError(f"the decoder blocks of {type(model).__name__} hold no nn.Linear to binarize")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    began = time.perf_counter()
    more = bool(distill_steps) and distill_samples > samples
    windows = calibration_windows(tokenizer, data, distill_samples if more else samples, seq_len,
                                  "distill_samples" if more else "samples")
    # after the text is read: a run refused for too little text leaves no folder for a rerun to take as another run
    checkpoints = _Checkpoints(out, settings, model) if out is not None else None
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    model.requires_grad_(False)
    seconds: dict[str, float] = {}
    ids = windows[:samples]
    teacher = copy.deepcopy(model) if distill_steps else None
    hidden, block_kwargs = block_inputs(model, blocks[0], ids)
    streams = _Streams(hidden, offload_dir, batch_size, device, dtype)
    del hidden
    seconds["embed"] = time.perf_counter() - began

    results = []
    bar = tqdm(blocks, desc=f"calibrate (E={num_experts})", disable=not progress)
    for index, block_name in enumerate(bar):
        block_start = time.perf_counter()
        block = model.get_submodule(block_name).to(device)
        kwargs = _to_device(block_kwargs, device)
        streams.run_teacher(block, kwargs)
        saved = checkpoints.load_block(index) if checkpoints else None
        if saved is not None:
            _load_packed(model, layers[block_name], saved[0], num_experts, dtype)
            result = BlockResult(block_name, saved[1]["start"], saved[1]["packed"], saved[1]["seconds"], True)
            streams.run_student(block, kwargs)
        else:
            generator = torch.Generator().manual_seed(seed * 100_003 + index)
            inputs = _layer_inputs(model, block, layers[block_name], streams, kwargs) if start == "data" else None
            _binarize_block(model, layers[block_name], num_experts, generator)
            if inputs is not None:
                _data_start(model, inputs, num_experts, generator)
            start_error = streams.error(block, kwargs)
            if not math.isfinite(start_error):
                raise ValueError(f"block {block_name!r} gives non-finite outputs (relative error {start_error}): "
                                 "NaN or inf in its weights (norms, biases) or in its inputs")
            _reconstruct(block, block_name, streams, kwargs, settings, generator)
            _pack_block(model, layers[block_name])
            packed_error = streams.run_student(block, kwargs)
            result = BlockResult(block_name, start_error, packed_error, time.perf_counter() - block_start)
            if checkpoints:
                checkpoints.save_block(index, model, layers[block_name], result)
        block.to("cpu")
        results.append(result)
        bar.set_postfix_str(f"error {result.start:.3g} -> {result.packed:.3g}")
    streams.close()
    seconds["blocks"] = sum(r.seconds for r in results)
    _record(model, MoSConfig(num_experts=num_experts, modules=[n for b in blocks for n in layers[b]]))
    plan(model)

    losses: list[float] = []
    if distill_steps:
        began = time.perf_counter()
        losses = distill_scales(model, teacher, windows[:distill_samples], steps=distill_steps, lr=distill_lr,
                                checkpointing=distill_checkpointing,
                                batch_size=batch_size, seed=seed, device=device, progress=progress)
        seconds["distill"] = time.perf_counter() - began
        del teacher
    model.eval()
    if checkpoints:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        checkpoints.finish()
    return CalibrationReport(settings, results, losses, seconds)


DISTILL_MSE_WEIGHT = 0.0
"""The hidden-state term's weight in the distillation after calibration: KL only. On SmolLM2-135M, 30 steps
from the same calibrated model reached held-out perplexity 98.7 with KL only against 110.6 with the paper's
KL + 10 x hidden MSE, whose loss there is dominated by the massive activations that some blocks carry."""


def distill_scales(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, *, steps: int, lr: float,
                   batch_size: int, seed: int = 0, mse_weight: float = DISTILL_MSE_WEIGHT, checkpointing: bool = False,
                   device: str | torch.device = "cpu", progress: bool = True) -> list[float]:
    """End-to-end distillation (`mosbits.hf.distill`'s schedule; KL on the logits plus ``mse_weight`` x the
    hidden-state MSE) of a packed model's scales and routers, its signs frozen, on token windows
    (samples, seq_len); returns the loss of every step. ``checkpointing``: transformers' gradient checkpointing
    for this run (switched off again afterwards).

    Student and teacher train on ``device``'s type ("cuda": the Trainer's CUDA device; "cpu" even where a GPU is
    there) and are both back on the CPU afterwards, as `calibrate` promises."""
    from mosbits.hf.distillation import distill

    trainable_scales(model, True)
    try:
        return distill(model, teacher, windows, steps=steps, lr=lr, seq_len=windows.shape[1],
                       batch_size=batch_size, seed=seed, mse_weight=mse_weight, disable_tqdm=not progress,
                       gradient_checkpointing=checkpointing,
                       use_cpu=torch.device(device).type == "cpu")
    finally:
        trainable_scales(model, False)
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.to("cpu")
        teacher.to("cpu")


def peak_memory(model: nn.Module, samples: int, seq_len: int, batch_size: int, *, distill: bool = False,
                offloaded: bool = False, checkpointing: bool = False) -> dict[str, int]:
    """The terms of `calibrate`'s peak memory, in bytes, for ``model`` and these settings (module docstring).

    Returns:
        ``{"model", "teacher", "streams", "block", "minibatch", "distillation"}``: the block stage peaks at
        model + teacher + streams + block + minibatch on the CPU, the distillation stage (``distill``; else its
        term is 0) at the packed model + teacher + distillation. With ``checkpointing`` (``distill_checkpointing``)
        the distillation keeps each block's input and one block's activations at a time instead of all blocks'.
    """
    weights = sum(t.numel() * t.element_size() for t in distinct(model.state_dict().values()))
    width = model.get_input_embeddings().weight.shape[1]
    vocab = model.get_input_embeddings().weight.shape[0]
    shapes = [[(m.out_features, m.in_features) if isinstance(m, MoSLinear | PackedMoSLinear) else linear_shape(m)
               for m in model.get_submodule(block).modules() if isinstance(m, (*LINEAR_TYPES, MoSLinear,
                                                                                PackedMoSLinear))]
              for block in decoder_blocks(model)]
    block = max(shapes, key=lambda s: sum(n * k for n, k in s))
    widest = max(max(n, k) for n, k in block)
    per_token = sum(n + k for n, k in block) + 4 * widest + 4 * width
    activations = sum(n for n, _ in block) + 4 * widest + 8 * width
    kept = ((1 if checkpointing else len(shapes)) * activations + 3 * vocab
            + (2 if checkpointing else 1) * (len(shapes) + 1) * width)
    return {"model": weights, "teacher": weights if distill else 0,
            "streams": 0 if offloaded else 2 * samples * seq_len * width * 4,
            "block": 16 * sum(n * k for n, k in block), "minibatch": 4 * batch_size * seq_len * per_token,
            "distillation": 4 * batch_size * seq_len * kept if distill else 0}


def calibration_windows(tokenizer: Any, data: Any, samples: int, seq_len: int, name: str = "samples") -> torch.Tensor:
    """The first ``samples * seq_len`` tokens of ``data`` (see `calibrate`), as (samples, seq_len) int64;
    ``name`` is the setting that asked for ``samples`` windows (for the error).

    Texts are joined by blank lines and tokenized `TEXT_CHUNK_CHARS` characters at a time (cut at a line break
    where there is one); reading stops as soon as enough tokens are there.

    Raises:
        ValueError: the text holds fewer tokens than needed.
    """
    need = samples * seq_len
    ids: list[int] = []
    for chunk in _text_chunks(data):
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the calibration text holds {len(ids)} tokens; {name} x seq_len = {samples} x {seq_len} "
                         f"= {need} are needed: give more text or lower {name} / seq_len")
    return torch.tensor(ids[:need], dtype=torch.long).view(samples, seq_len)


def _text_chunks(data: Any) -> Iterator[str]:
    """The calibration text in order, in pieces of about `TEXT_CHUNK_CHARS` characters cut after a line break
    (or a space) where the piece has one."""
    if isinstance(data, Path):
        with data.open(encoding="utf-8") as f:
            while chunk := f.read(TEXT_CHUNK_CHARS):
                yield chunk + f.readline()
        return
    if isinstance(data, str):
        texts: Iterable[Any] = [data]
    elif isinstance(data, Iterable):
        texts = data
    else:
        raise TypeError(f"data must be a str, a pathlib.Path, an iterable of str or a datasets dataset, got "
                        f"{type(data).__name__}")
    for i, item in enumerate(texts):
        text = item["text"] if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise TypeError(f"data item {i} is a {type(text).__name__}, not a str (a dataset needs a 'text' column)")
        text = text if i == 0 else "\n\n" + text
        while len(text) > TEXT_CHUNK_CHARS:
            cut = max(text.rfind("\n", 0, TEXT_CHUNK_CHARS), text.rfind(" ", 0, TEXT_CHUNK_CHARS)) + 1
            cut = cut or TEXT_CHUNK_CHARS
            yield text[:cut]
            text = text[cut:]
        yield text


class _StopForward(Exception):
    """Raised by the hook on the first decoder block once its input is recorded."""


@torch.no_grad()
def block_inputs(model: nn.Module, first_block: str, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The input of the first decoder block for every window, float32 (samples, seq_len, D), and the keyword
    arguments the model passes to its blocks (position embeddings, mask), recorded for a batch of one window
    (they broadcast over any batch of windows of the same length). Only the layers before the first block run."""
    block = model.get_submodule(first_block)
    seen: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, hook_kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else hook_kwargs["hidden_states"]
        seen.append(hidden.detach().float())
        if not kwargs:
            kwargs.update({k: v for k, v in hook_kwargs.items()
                           if k not in ("hidden_states", "past_key_value", "past_key_values", "use_cache")})
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in ids:
            with contextlib.suppress(_StopForward):
                model(input_ids=row[None], use_cache=False)
    finally:
        handle.remove()
    if len(seen) != ids.shape[0]:
        raise RuntimeError(f"{type(model).__name__}'s forward never reached its first decoder block {first_block!r}")
    return torch.cat(seen), kwargs


class _Streams:
    """The teacher and student activation streams, (samples, seq_len, D) float32 each, in RAM or in two
    disk-backed arrays; blocks run on them in minibatches of ``batch_size`` windows on ``device``, computing in
    the model's ``dtype``."""

    def __init__(self, hidden: torch.Tensor, offload_dir: str | os.PathLike | None, batch_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.paths: list[Path] = []
        if offload_dir is None:
            self.teacher, self.student = hidden, hidden.clone()
        else:
            folder = Path(offload_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.teacher, self.student = (self._disk_array(folder / f"mosbits-{name}-{os.getpid()}.f32", hidden)
                                          for name in ("teacher", "student"))

    def _disk_array(self, path: Path, hidden: torch.Tensor) -> torch.Tensor:
        array = np.memmap(path, dtype=np.float32, mode="w+", shape=tuple(hidden.shape))
        self.paths.append(path)
        tensor = torch.from_numpy(array)
        tensor.copy_(hidden)
        return tensor

    @torch.no_grad()
    def run_teacher(self, block: nn.Module, kwargs: dict[str, Any]) -> None:
        """teacher <- block(teacher): the full-precision block's outputs, the targets of this block and the
        inputs of the next."""
        self._pass(block, kwargs, self.teacher, write=self.teacher)

    @torch.no_grad()
    def run_student(self, block: nn.Module, kwargs: dict[str, Any]) -> float:
        """student <- block(student); returns the relative error of the new student stream against the teacher
        stream."""
        return self._pass(block, kwargs, self.student, write=self.student)

    @torch.no_grad()
    def error(self, block: nn.Module, kwargs: dict[str, Any]) -> float:
        """Relative error ``||block(student) - teacher||^2 / ||teacher||^2``; the streams are left as they are."""
        return self._pass(block, kwargs, self.student, write=None)

    def _pass(self, block: nn.Module, kwargs: dict[str, Any], source: torch.Tensor,
              write: torch.Tensor | None) -> float:
        error = norm = 0.0
        for start in range(0, source.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            y = _run(block, source[rows].to(self.device), kwargs, self.dtype).float().cpu()
            target = self.teacher[rows]
            error += float((y - target).double().pow(2).sum())
            norm += float(target.double().pow(2).sum())
            if write is not None:
                write[rows] = y
        return error / max(norm, np.finfo(np.float64).tiny)

    def minibatch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of the student stream and their targets, on the device."""
        rows = torch.randint(0, self.student.shape[0], (self.batch_size,), generator=generator)
        return self.student[rows].to(self.device), self.teacher[rows].to(self.device)

    def close(self) -> None:
        """Drop the streams and delete their disk-backed files."""
        self.teacher = self.student = None
        for path in self.paths:
            path.unlink(missing_ok=True)


def training_device(device: str | torch.device | None) -> torch.device:
    """The device blocks train on: ``device``, or "cuda" when available and else "cpu" for None.

    Raises:
        ValueError: a string torch does not read as a device, or a CUDA device where torch sees none (said before
            any work starts, not at the first block).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: torch sees no CUDA device here (torch.cuda.is_available() is "
                         f"False); use 'cpu' or leave it unset")
    return device


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device``, through dicts, lists and tuples (a block's keyword
    arguments hold e.g. the rotary ``position_embeddings`` as a (cos, sin) tuple)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """A decoder block's output hidden states for ``hidden`` cast to the model's ``dtype`` (transformers blocks
    return a tensor or a tuple led by one)."""
    out = block(hidden.to(dtype), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _binarize_block(model: nn.Module, names: list[str], num_experts: int, generator: torch.Generator) -> None:
    """Replace the linears ``names`` of one block by `MoSLinear` with the paper's start (`MoSLinear.from_weight`).

    Raises:
        ValueError: a weight holds NaN or inf.
    """
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight.T if _is_conv1d(module) else module.weight
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise ValueError(f"{name}.weight holds {bad} NaN/inf value(s): calibrate a model with finite weights")
        layer = MoSLinear.from_weight(weight.detach(), _bias(module), num_experts, generator)
        replace_module(model, name, layer)


@torch.no_grad()
def _layer_inputs(model: nn.Module, block: nn.Module, names: list[str], streams: _Streams,
                  kwargs: dict[str, Any]) -> list[tuple[list[str], torch.Tensor]]:
    """The dense block's linears' inputs on `START_TOKENS` tokens of the student stream, float32 on the CPU:
    one (layer names, tokens (T, K)) entry per distinct input (q, k and v share one; gate and up another)."""
    student = streams.student
    count = max(1, min(student.shape[0], -(-START_TOKENS // student.shape[1])))
    rows = torch.linspace(0, student.shape[0] - 1, count).round().long()
    groups: dict[str, list[str]] = {}
    parts: dict[str, list[torch.Tensor]] = {}
    readers: dict[int, tuple[str, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            first, _ = readers.setdefault(id(x), (name, x))
            if first == name:
                parts.setdefault(name, []).append(x.detach().float().reshape(-1, x.shape[-1]).cpu())
            if name not in groups.setdefault(first, [first]):
                groups[first].append(name)
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        for start in range(0, count, streams.batch_size):
            readers.clear()
            _run(block, student[rows[start:start + streams.batch_size]].to(streams.device), kwargs, streams.dtype)
    finally:
        for handle in handles:
            handle.remove()
    return [(group, torch.cat(parts[first])) for first, group in groups.items()]


@torch.no_grad()
def _data_start(model: nn.Module, inputs: list[tuple[list[str], torch.Tensor]], num_experts: int,
                generator: torch.Generator) -> None:
    """Refit the experts and routers of a block's `MoSLinear`s (the paper's start) to their inputs
    (`mosbits.hf.fitting.data_start`): one clustering and one set of Grams per distinct input, shared by the
    layers that read it."""
    for names, x in inputs:
        labels, router = fitting.cluster_inputs(x, num_experts, generator) if num_experts > 1 else (None, None)
        device = model.get_submodule(names[0]).weight.device
        grams = fitting.input_grams(x.to(device), num_experts, None if labels is None else labels.to(device))
        for name in names:
            layer = model.get_submodule(name)
            s_out, s_in = fitting.data_start(layer.weight, grams, layer.s_out[0], layer.s_in[0])
            layer.s_out.copy_(s_out)
            layer.s_in.copy_(s_in)
            if router is not None:
                layer.router.weight.copy_(router)


def _reconstruct(block: nn.Module, name: str, streams: _Streams, kwargs: dict[str, Any], settings: Settings,
                 generator: torch.Generator) -> None:
    """``settings.steps_per_block`` Adam steps on the block's relative output error, cosine learning rates.

    Raises:
        ValueError: the loss became NaN or inf (the learning rates diverged).
    """
    steps = settings.steps_per_block
    if not steps:
        return
    layers = [m for m in block.modules() if isinstance(m, MoSLinear)]
    scales = [p for m in layers for name, p in m.named_parameters() if name not in ("weight", "bias")]
    optimizer = torch.optim.Adam([{"params": scales, "lr": settings.lr},
                                  {"params": [m.weight for m in layers], "lr": settings.latent_lr}])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    with torch.enable_grad():
        for step in range(steps):
            x, target = streams.minibatch(generator)
            y = _run(block, x, kwargs, streams.dtype).float()
            loss = (y - target).pow(2).mean() / target.pow(2).mean()
            value = loss.detach().item()
            if not math.isfinite(value):
                raise ValueError(f"the reconstruction loss of block {name!r} became {value} at step {step}: "
                                 f"lower lr ({settings.lr}) or latent_lr ({settings.latent_lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def _pack_block(model: nn.Module, names: list[str]) -> None:
    for name in names:
        replace_module(model, name, PackedMoSLinear.from_mos(model.get_submodule(name)))


def _load_packed(model: nn.Module, names: list[str], state: dict[str, torch.Tensor], num_experts: int,
                 dtype: torch.dtype) -> None:
    """Replace the linears ``names`` by `PackedMoSLinear` holding a checkpoint's tensors (keys ``name.buffer``)."""
    for name in names:
        module = model.get_submodule(name)
        n, k = linear_shape(module)
        device = module.weight.device
        layer = PackedMoSLinear(k, n, num_experts, bias=getattr(module, "bias", None) is not None, device=device,
                                dtype=dtype)
        prefix = f"{name}."
        layer.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
        replace_module(model, name, layer)


def _fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and of a slice of its input embeddings: a checkpoint folder is resumed
    for the same model only."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_diff_dict(), sort_keys=True, default=str).encode())
    digest.update(model.get_input_embeddings().weight[:8].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Checkpoints:
    """``out/calibration/``: manifest.json (the run's settings and model fingerprint, each finished block's
    result) and one safetensors file per finished block, each written atomically."""

    def __init__(self, out: str | os.PathLike, settings: Settings, model: nn.Module) -> None:
        self.out = Path(out)
        self.folder = self.out / CHECKPOINT_DIR
        self.run = {"settings": dataclasses.asdict(settings), "model": _fingerprint(model)}
        path = self.folder / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("run") != self.run:
                raise ValueError(f"out={str(self.out)!r} holds a different calibration run ({manifest.get('run')}; "
                                 f"this one is {self.run}): choose another folder or delete it")
            if manifest.get("complete"):
                raise ValueError(f"out={str(self.out)!r} already holds the finished model of this run: load it with "
                                 "mosbits.hf.load, or delete the folder to calibrate again")
            self.manifest = manifest
        elif self.out.exists() and any(self.out.iterdir()):
            raise ValueError(f"out={str(self.out)!r} exists and is not a mosbits calibration folder: choose a new "
                             "or empty folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.manifest = {"run": self.run, "blocks": [], "complete": False}
            self._write_manifest()

    def _block_path(self, index: int) -> Path:
        return self.folder / f"block-{index:04d}.safetensors"

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, recorded result) of block ``index`` when it finished in an earlier run, else None."""
        if index >= len(self.manifest["blocks"]):
            return None
        path = self._block_path(index)
        try:
            return load_file(path), self.manifest["blocks"][index]
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise ValueError(f"the checkpoint {path} of a finished block cannot be read ({err}): delete "
                             f"{self.folder} to start again") from err

    def save_block(self, index: int, model: nn.Module, names: list[str], result: BlockResult) -> None:
        state = {f"{name}.{key}": value.detach().cpu().contiguous()
                 for name in names for key, value in model.get_submodule(name).state_dict().items()}
        write_atomically(self._block_path(index), save(state))
        self.manifest["blocks"].append(dataclasses.asdict(result))
        self._write_manifest()

    def finish(self) -> None:
        """Mark the run complete and delete the per-block files (the saved model holds them)."""
        for index in range(len(self.manifest["blocks"])):
            self._block_path(index).unlink(missing_ok=True)
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_atomically(self.folder / MANIFEST, json.dumps(self.manifest, indent=1, default=float).encode())
