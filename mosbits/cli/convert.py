"""Convert a checkpoint of the BinaryMoS authors (dongwonjo/BinaryMoS) to a mosbits packed model.

SRC_DIR is a Llama checkpoint folder in the authors' layout: config.json with num_expert, and safetensors weights
(model.safetensors, or shards with model.safetensors.index.json) whose binarized linear layers hold a latent fp16
`weight`, `in_channel_scale`, `out_channel_scale` and `gate_linear.weight`. OUT_DIR receives a checkpoint that
loads with mosbits.hf.load(OUT_DIR), or AutoModelForCausalLM.from_pretrained(OUT_DIR) after `import mosbits.hf`:
1-bit packed signs instead of the latent weights, everything else copied (docs/FORMAT.md, section 8). Tensors are
converted and written one at a time, so memory stays below one shard.

A latent weight of exactly 0 (torch.sign gives 0 in the authors' forward) packs as +1.

Exit status: 0 on success; 1 when torch or transformers is missing, or the checkpoint cannot be converted (the
message names the file, module or tensor); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SUMMARY = "convert a BinaryMoS checkpoint of the paper's authors to a mosbits packed model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, metavar="SRC_DIR", help="the authors' checkpoint folder")
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="a new (or empty) folder for the packed model")


def run(args: argparse.Namespace) -> int:
    """Convert; print what was written. 0 on success, 1 on a missing dependency or a checkpoint error."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"mosbits convert-binarymos needs {' and '.join(missing)}: pip install 'mosbits[hf]'", file=sys.stderr)
        return 1
    from mosbits.hf.checkpoints import convert_binarymos

    try:
        result = convert_binarymos(args.src, args.out)
    except (OSError, ValueError) as err:
        print(f"mosbits convert-binarymos: {err}", file=sys.stderr)
        return 1
    print(f"converted {len(result.modules)} layers (E = {result.num_experts}) in {result.shards} shard(s): "
          f"{result.source_bytes / 1e6:.1f} MB -> {result.output_bytes / 1e6:.1f} MB, written to {result.out_dir}")
    if result.zero_weights:
        print(f"{result.zero_weights} latent weights were exactly 0: sign 0 in the authors' forward, +1 once packed")
    return 0
