"""Convert a checkpoint in the BinaryMoS authors' layout (dongwonjo/BinaryMoS) to a mosbits packed model.

The authors' released models are Llama checkpoints whose binarized linear layers (q, k, v, o, gate, up and down of
every decoder layer) hold, per module ``<m>`` with N outputs, K inputs and E experts:

    <m>.weight              (N, K) latent weight (fp16); only its sign reaches the output
    <m>.in_channel_scale    (E, K)
    <m>.out_channel_scale   (E, N)
    <m>.gate_linear.weight  (E, K) the router
    <m>.bias                (N,), optional

and whose config.json adds ``num_expert`` (E) to the usual LlamaConfig keys. Their layer computes
``((x * (g @ in_scale)) @ sign(W).T) * (g @ out_scale) + bias`` with ``g = softmax(x @ gate.T)``.

`convert_binarymos` writes the mosbits layout of docs/FORMAT.md section 8: ``<m>.signs`` (the packed bits of
sign(W)), ``<m>.s_in``, ``<m>.s_out``, ``<m>.router`` (left out when E = 1: one expert has gate 1 whatever the
router says) and ``<m>.bias``; every other tensor is copied unchanged; config.json is a plain LlamaConfig with a
mosbits ``quantization_config``. The result loads with `mosbits.hf.load` (or ``from_pretrained`` after
``import mosbits.hf``).

Sign of zero: ``torch.sign(0) = 0`` in the authors' forward, but one bit holds only +1 or -1, so a latent weight of
exactly +0.0 or -0.0 packs as +1 (FORMAT.md section 2). The converted layer then differs from the authors' by
``x_k * s_in_k * s_out_n`` in output n for each such weight (n, k); `Conversion.zero_weights` counts them.

Memory: shards are converted one at a time, module by module, each tensor written as soon as it is produced, so
the converter holds one module's tensors and the temporaries of packing it: a few times the largest tensor, less
than one shard.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import mosbits
from mosbits.format import row_bytes
from mosbits.hf.config import MoSConfig
from mosbits.hf.remote import finish_folder

SOURCE_TENSORS = ("weight", "in_channel_scale", "out_channel_scale", "gate_linear.weight")
"""Required tensors of a binarized module in the authors' layout; ``bias`` is optional."""
MARKER = "in_channel_scale"
"""The suffix that identifies a binarized module."""
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "generation_config.json")
"""Files copied unchanged from the source folder when present."""
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
DTYPE_NAMES = {torch.uint8: "U8", **{dtype: name for name, dtype in FLOAT_DTYPES.items()}}
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
              "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
"""Bytes per element of the safetensors dtypes that dense tensors may have (they are copied byte for byte)."""


class CheckpointError(ValueError):
    """The source folder is not a checkpoint in the authors' layout that mosbits can convert; the message says
    which file, module or tensor is wrong."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the source checkpoint: its shard file name, safetensors dtype name and shape."""

    shard: str
    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `convert_binarymos` wrote.

    Attributes:
        out_dir: the output folder.
        num_experts: E of every packed layer.
        modules: full names of the packed modules, in the model's module order.
        shards: number of safetensors files written (as many as in the source).
        source_bytes: total size of the source safetensors files.
        output_bytes: total size of the written safetensors files.
        zero_weights: latent weights that were exactly +0.0 or -0.0 (sign 0 for the authors, +1 once packed).
    """

    out_dir: Path
    num_experts: int
    modules: list[str]
    shards: int
    source_bytes: int
    output_bytes: int
    zero_weights: int


def convert_binarymos(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Conversion:
    """Convert the authors' checkpoint in ``src_dir`` to a mosbits packed model in ``out_dir``.

    Args:
        src_dir: a folder with config.json (with ``num_expert``) and ``model.safetensors`` or sharded
            ``model-*.safetensors`` with ``model.safetensors.index.json``.
        out_dir: a folder that does not exist yet or is empty; it receives config.json, the shards under the same
            file names (and the index when the source has one) and the tokenizer files of `COPIED_FILES`.

    A module whose tensors are spread over two shards is supported: its packed tensors go to the shard that holds
    its latent weight.

    Raises:
        CheckpointError: not a Llama checkpoint, no or a bad ``num_expert``, a module missing a tensor or with a
            tensor of the wrong shape or dtype, a tensor the Llama model has with a shape the config contradicts,
            or a tensor the Llama model needs missing.
        FileNotFoundError: no config.json or no safetensors weights.
        FileExistsError: ``out_dir`` is not empty.
        ValueError: a latent weight holds NaN or inf (from `mosbits.pack`, naming the module).
    """
    src, out = Path(src_dir), Path(out_dir)
    config, num_experts = read_config(src)
    entries = read_entries(src)
    modules = plan_modules(config, num_experts, entries)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: convert into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    owned = {f"{m}.{suffix}" for m in modules for suffix in (*SOURCE_TENSORS, "bias")}
    shard_names = sorted({entry.shard for entry in entries.values()})
    weight_map: dict[str, str] = {}
    tensor_bytes = zero_weights = 0
    for shard in shard_names:
        dense = [key for key, entry in entries.items() if entry.shard == shard and key not in owned]
        packed = [m for m in modules if entries[f"{m}.weight"].shard == shard]
        written, zeros = convert_shard(src, out / shard, dense, packed, entries, num_experts)
        weight_map.update(dict.fromkeys(written, shard))
        tensor_bytes += sum(math.prod(shape) * ITEM_SIZES[dtype] for dtype, shape in written.values())
        zero_weights += zeros
    if (src / INDEX).exists():
        index = {"metadata": {"total_size": tensor_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config.quantization_config = MoSConfig(num_experts=num_experts, modules=modules)
    config.save_pretrained(out)
    finish_folder(out)
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return Conversion(out, num_experts, modules, len(shard_names),
                      sum((src / shard).stat().st_size for shard in shard_names),
                      sum((out / shard).stat().st_size for shard in shard_names), zero_weights)


def read_config(src: Path) -> tuple[LlamaConfig, int]:
    """The source config.json as a LlamaConfig (``num_expert`` removed, architecture ``LlamaForCausalLM``) and E."""
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the source must be a checkpoint folder")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}; the BinaryMoS authors' code and "
                              "this converter handle Llama checkpoints only (model_type 'llama')")
    if "num_expert" not in raw:
        raise CheckpointError(f"{path} has no 'num_expert': not a checkpoint of the BinaryMoS authors' code")
    num_experts = raw.pop("num_expert")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise CheckpointError(f"{path}: num_expert must be an integer >= 1, got {num_experts!r}")
    if "quantization_config" in raw:
        raise CheckpointError(f"{path} already has a quantization_config: not an unpacked BinaryMoS checkpoint")
    raw["architectures"] = ["LlamaForCausalLM"]
    return LlamaConfig.from_dict(raw), num_experts


def read_entries(src: Path) -> dict[str, Entry]:
    """Every tensor of the source checkpoint, from the safetensors headers (no tensor data is read).

    Raises:
        FileNotFoundError: neither ``model.safetensors.index.json`` nor ``model.safetensors``, or a shard the
            index names is missing.
        CheckpointError: a shard is not valid safetensors, a tensor has a dtype outside `ITEM_SIZES`, or the index
            names a tensor that its shard lacks.
    """
    if (src / INDEX).is_file():
        weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    elif (src / SINGLE).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(f"{src} has neither {INDEX} nor {SINGLE} (only safetensors checkpoints are read)")
    shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
    entries = {}
    for shard in shards:
        if not (src / shard).is_file():
            raise FileNotFoundError(f"{src / shard} not found (named in {INDEX})")
        try:
            with safe_open(src / shard, framework="pt") as f:
                for key in list(f.keys()):
                    view = f.get_slice(key)
                    entries[key] = Entry(shard, view.get_dtype(), tuple(view.get_shape()))
        except SafetensorError as err:
            raise CheckpointError(f"{src / shard} is not a valid safetensors file: {err}") from err
    unknown = sorted(key for key, entry in entries.items() if entry.dtype not in ITEM_SIZES)
    if unknown:
        raise CheckpointError(f"{unknown[0]} has dtype {entries[unknown[0]].dtype}, which this converter cannot copy")
    if weight_map is not None:
        wrong = sorted(k for k, shard in weight_map.items() if k not in entries or entries[k].shard != shard)
        if wrong:
            raise CheckpointError(f"{INDEX} places {wrong[0]!r} in {weight_map[wrong[0]]}, which does not hold it "
                                  f"({len(wrong)} such tensors)")
    return entries


def plan_modules(config: LlamaConfig, num_experts: int, entries: dict[str, Entry]) -> list[str]:
    """Check the source against the Llama model that ``config`` describes; return the binarized modules in the
    model's module order.

    The model is built on the meta device (no memory) for its tensor names and shapes. Each binarized module
    (a prefix with an ``in_channel_scale``) must be an ``nn.Linear`` of that model, with the tensors of
    `SOURCE_TENSORS` in float dtypes and the shapes of the module docstring, E equal to ``num_expert``, and a bias
    exactly when the model's linear has one. Every other tensor the model has must be present with its shape
    (``lm_head.weight`` may be absent when the embeddings are tied); tensors the model does not have are copied.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {key.removesuffix(f".{MARKER}") for key in entries if key.endswith(f".{MARKER}")}
    stray = sorted(key for key in entries if key.endswith(".gate_linear.weight")
                   and key.removesuffix(".gate_linear.weight") not in found)
    if stray:
        raise CheckpointError(f"{stray[0]} has no {stray[0].removesuffix('gate_linear.weight')}{MARKER}")
    if not found:
        raise CheckpointError(f"no tensor ends in .{MARKER}: no binarized module in the checkpoint")
    ordered = [name for name in linears if name in found]
    for name in [*ordered, *sorted(found - set(ordered))]:
        check_module(name, linears.get(name), num_experts, entries)
    owned = {f"{m}.{suffix}" for m in found for suffix in (*SOURCE_TENSORS, "bias")}
    for key, entry in entries.items():
        if key not in owned and key in expected and entry.shape != expected[key]:
            raise CheckpointError(f"{key} has shape {list(entry.shape)}, the config implies {list(expected[key])}")
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    needed = {key for key in expected if key.rpartition(".")[0] not in found} - tied
    missing = sorted(needed - set(entries))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[0]} ({len(missing)} tensors of the Llama model missing)")
    return ordered


def check_module(name: str, linear: nn.Linear | None, num_experts: int, entries: dict[str, Entry]) -> None:
    """Raise `CheckpointError` unless module ``name`` is a consistent binarized linear (see `plan_modules`)."""
    if linear is None:
        raise CheckpointError(f"{name} has an {MARKER} but is not a linear layer of LlamaForCausalLM")
    missing = [suffix for suffix in SOURCE_TENSORS if f"{name}.{suffix}" not in entries]
    if missing:
        raise CheckpointError(f"{name} lacks {name}.{missing[0]}")
    known = {f"{name}.{suffix}" for suffix in (*SOURCE_TENSORS, "bias")}
    extra = sorted(key for key in entries if key.startswith(f"{name}.") and key not in known)
    if extra:
        raise CheckpointError(f"{extra[0]} is not a tensor of a BinaryMoS layer (expected {sorted(known)})")
    n, k = linear.out_features, linear.in_features
    shapes = {"weight": (n, k), "in_channel_scale": (num_experts, k), "out_channel_scale": (num_experts, n),
              "gate_linear.weight": (num_experts, k), "bias": (n,)}
    if (f"{name}.bias" in entries) != (linear.bias is not None):
        raise CheckpointError(f"{name} {'has' if linear.bias is None else 'lacks'} a bias, but the config says "
                              f"its layer has {'none' if linear.bias is None else 'one'}")
    for suffix, shape in shapes.items():
        entry = entries.get(f"{name}.{suffix}")
        if entry is None:
            continue
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{name}.{suffix} has dtype {entry.dtype}; expected F16, BF16 or F32")
        if entry.shape != shape:
            raise CheckpointError(f"{name}.{suffix} has shape {list(entry.shape)}, expected {list(shape)} "
                                  f"(N={n}, K={k} from the config, E={num_experts} from num_expert)")


def packed_entries(name: str, num_experts: int, entries: dict[str, Entry]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Output tensors of binarized module ``name``: key -> (dtype name, shape), in writing order.

    The float tensors share one dtype (FORMAT.md section 3): the widest of the source scales, bias and (when
    E > 1) router, so that no value is rounded.
    """
    n, k = entries[f"{name}.weight"].shape
    suffixes = ("in_channel_scale", "out_channel_scale", "bias", *(("gate_linear.weight",) if num_experts > 1 else ()))
    floats = [entries[f"{name}.{suffix}"] for suffix in suffixes if f"{name}.{suffix}" in entries]
    dtype = DTYPE_NAMES[functools.reduce(torch.promote_types, (FLOAT_DTYPES[e.dtype] for e in floats))]
    out = {f"{name}.signs": ("U8", (n, row_bytes(k))), f"{name}.s_in": (dtype, (num_experts, k)),
           f"{name}.s_out": (dtype, (num_experts, n))}
    if num_experts > 1:
        out[f"{name}.router"] = (dtype, (num_experts, k))
    if f"{name}.bias" in entries:
        out[f"{name}.bias"] = (dtype, (n,))
    return out


def convert_shard(src: Path, path: Path, dense: list[str], modules: list[str], entries: dict[str, Entry],
                  num_experts: int) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """Write one output shard: the ``dense`` tensors unchanged and the packed tensors of ``modules``; return its
    tensors (key -> (dtype name, shape)) and the number of latent weights that were exactly 0.

    The header is computed from the source headers first, then each tensor is read (from whichever source shard
    holds it), converted and written at once. Each read opens and closes its source file, so the pages that
    safetensors maps are released at once: memory holds one module's tensors, not a shard. The file is written
    under a temporary name and renamed when complete.
    """
    specs = {key: (entries[key].dtype, entries[key].shape) for key in sorted(dense)}
    for name in modules:
        specs.update(packed_entries(name, num_experts, entries))

    def read(key: str) -> torch.Tensor:
        with safe_open(src / entries[key].shard, framework="pt") as f:
            return f.get_tensor(key)

    tmp = path.with_name(f"{path.name}.tmp")
    zeros = 0
    with tmp.open("wb") as f:
        f.write(safetensors_header(specs))
        for key in sorted(dense):
            write_tensor(f, read(key))
        for name in modules:
            weight = read(f"{name}.weight")
            zeros += int((weight == 0).sum())
            for tensor in pack_module(name, weight, read, specs).values():
                write_tensor(f, tensor)
    os.replace(tmp, path)
    return specs, zeros


def pack_module(name: str, weight: torch.Tensor, read: Any,
                specs: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The mosbits tensors of binarized module ``name`` with latent ``weight`` (N, K), in the order of
    `packed_entries`; ``read(key)`` returns a source tensor."""
    try:
        signs = mosbits.pack(weight).data
    except ValueError as err:
        raise ValueError(f"{name}.weight: {err}") from err
    dtype = FLOAT_DTYPES[specs[f"{name}.s_in"][0]]
    sources = {"s_in": "in_channel_scale", "s_out": "out_channel_scale", "router": "gate_linear.weight",
               "bias": "bias"}
    out = {f"{name}.signs": signs}
    for suffix, source in sources.items():
        if f"{name}.{suffix}" in specs:
            out[f"{name}.{suffix}"] = read(f"{name}.{source}").to(dtype)
    return out


def safetensors_header(specs: dict[str, tuple[str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file whose tensors come in the order of ``specs``
    (key -> (dtype name, shape)), padded with spaces so that the data starts at a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (dtype, shape) in specs.items():
        size = math.prod(shape) * ITEM_SIZES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(f: Any, tensor: torch.Tensor) -> None:
    """Append the bytes of a CPU tensor, row-major, in the host's byte order (safetensors files are little-endian,
    as are the hosts torch is built for)."""
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
