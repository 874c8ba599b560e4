"""Saved mosbits models load as what they are, or not at all: the code each saved folder carries.

A folder that ``save_pretrained`` writes from a model holding mosbits layers (packed, or a student still in
training) gets a config.json whose ``model_type`` is ``"mosbits"`` (the real one moves to
``mosbits_base_model_type``), an ``auto_map`` and a small module, ``mosbits_remote.py``:

- ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` (and so lm-eval-harness, pipelines, a
  serving stack) runs that module, which imports mosbits and loads the folder through `mosbits.hf.load`; without
  mosbits installed it raises an ImportError that says ``pip install 'mosbits[hf]'``.
- without ``trust_remote_code`` transformers refuses the folder (it knows no model type "mosbits"), instead of
  building a dense model with random linear weights, which is what a plain ``quant_method`` left to an unknown
  quantizer gets: transformers only warns about an unknown quantization method.

Why this mechanism: it is transformers' own way of shipping code with a checkpoint, every loader honours it, and
the refusal without it comes from transformers itself, so no tool can get the random dense model by accident.
The model in memory keeps its real class and config (``LlamaForCausalLM``, ``LlamaConfig``): only its config's
class is swapped, on that instance, for a subclass of the same name whose ``save_pretrained`` finishes the folder
(`mark`). Folders saved before this existed (``model_type`` of the base model) still load with `mosbits.hf.load`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from mosbits.io import write_atomically

MODEL_TYPE = "mosbits"
BASE_KEY = "mosbits_base_model_type"
MODULE = "mosbits_remote"
AUTO_MAP = {"AutoConfig": f"{MODULE}.MosbitsConfig", "AutoModelForCausalLM": f"{MODULE}.MosbitsForCausalLM"}

REMOTE_SOURCE = '''"""Loads this folder: a transformers model whose linear layers are mosbits layers
(1-bit BinaryMoS signs with token-adaptive scales). The kernels live in the mosbits package:
pip install 'mosbits[hf]'."""

try:
    import mosbits.hf.remote as _remote
except ImportError as err:
    raise ImportError("this model's linear layers are mosbits BinaryMoS layers (1-bit signs): "
                      "pip install 'mosbits[hf]' to load it") from err


class MosbitsConfig:
    """AutoConfig entry: the model's own config (e.g. LlamaConfig), read by mosbits."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return _remote.load_config(pretrained_model_name_or_path, **kwargs)


class MosbitsForCausalLM:
    """AutoModelForCausalLM entry: the model with its mosbits layers, loaded by mosbits.hf.load."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        return _remote.load_model(pretrained_model_name_or_path, *args, **kwargs)
'''
"""The module written beside config.json. Its import of mosbits sits in a try block, so that transformers'
import check (which skips try blocks) lets the module itself say what to install."""

_MARKED: dict[type, type] = {}


def mark(model: Any) -> Any:
    """Make ``save_pretrained`` of ``model`` write the mosbits folder (module docstring); return ``model``.

    Swaps ``model.config``'s class, on this instance only, for a subclass of the same name that overrides
    ``save_pretrained`` (and survives pickling, so ``torch.save`` / ``torch.load`` of the model keeps it);
    idempotent."""
    mark_config(model.config)
    return model


def mark_config(config: PretrainedConfig) -> PretrainedConfig:
    """`mark` for a config alone; returns it."""
    base = type(config)
    if base in _MARKED.values():
        return config
    if base not in _MARKED:
        _MARKED[base] = type(base.__name__, (base,), {"save_pretrained": _save_pretrained,
                                                      "__reduce_ex__": _reduce_marked,
                                                      "__module__": base.__module__,
                                                      "__qualname__": base.__qualname__,
                                                      "__doc__": base.__doc__})
    config.__class__ = _MARKED[base]
    return config


def _reduce_marked(self: PretrainedConfig, protocol: int) -> tuple[Any, tuple[Any, ...]]:
    """Pickle a marked config as its base class and state, marked again when unpickled (the subclass itself has
    no importable name)."""
    return _unpickle_marked, (type(self).__bases__[0], dict(self.__dict__))


def _unpickle_marked(base: type, state: dict[str, Any]) -> PretrainedConfig:
    config = base.__new__(base)
    config.__dict__.update(state)
    return mark_config(config)


def _save_pretrained(self: PretrainedConfig, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``PretrainedConfig.save_pretrained``, then config.json rewritten for mosbits and the loader module written."""
    result = super(type(self), self).save_pretrained(save_directory, *args, **kwargs)
    finish_folder(save_directory)
    return result


def finish_folder(directory: str | os.PathLike) -> None:
    """Rewrite ``directory/config.json`` with ``model_type = "mosbits"`` (the model's own type under
    ``mosbits_base_model_type``) and `AUTO_MAP`, and write ``mosbits_remote.py``; both atomically."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") != MODEL_TYPE:
        config[BASE_KEY] = config.get("model_type")
    config["model_type"] = MODEL_TYPE
    config["auto_map"] = dict(AUTO_MAP)
    write_atomically(directory / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    write_atomically(directory / f"{MODULE}.py", REMOTE_SOURCE.encode())


def base_config(path: str | os.PathLike, keep_auto_map: bool = False, **hub_kwargs: Any) -> PretrainedConfig:
    """The model's own config (e.g. ``LlamaConfig``) from a saved folder's config.json, mosbits' or older.

    Args:
        path: the folder (or a hub id, resolved by transformers' ``cached_file`` with ``hub_kwargs``).
        keep_auto_map: keep ``auto_map`` (what the remote route needs, so that AutoModelForCausalLM then takes
            the folder's module); without it, loading with this config takes transformers' own model class.

    Raises:
        ValueError: config.json says ``model_type = "mosbits"`` without a known ``mosbits_base_model_type``.
    """
    from transformers.utils import cached_file

    file = cached_file(os.fspath(path), "config.json", **hub_kwargs)
    raw = json.loads(Path(file).read_text())
    if raw.get("model_type") == MODEL_TYPE:
        base = raw.pop(BASE_KEY, None)
        if base not in CONFIG_MAPPING:
            raise ValueError(f"{file}: model_type 'mosbits' needs {BASE_KEY} naming a transformers model type, "
                             f"got {base!r}")
        raw["model_type"] = base
    if not keep_auto_map:
        raw.pop("auto_map", None)
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    config._name_or_path = os.fspath(path)
    return config


def _hub_arguments() -> frozenset[str]:
    """The keyword arguments with which transformers' file lookup reads a folder or hub id (cache_dir, proxies,
    token, revision, ...), taken from its signature: ``AutoModel.from_pretrained`` passes them to the config's
    ``from_pretrained`` and also passes them again beside the unused keyword arguments that it returns, so
    one left among those becomes a duplicate argument (transformers 5.25 added ``proxies`` there)."""
    import inspect

    from transformers.utils.hub import cached_files

    parameters = inspect.signature(cached_files).parameters
    return frozenset(name for name, p in parameters.items()
                     if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD))


def load_config(path: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
    """What the folder's ``MosbitsConfig.from_pretrained`` returns: `base_config` with its ``auto_map``, with
    keyword arguments that name config attributes applied as ``from_pretrained`` applies them; honours
    ``return_unused_kwargs``."""
    return_unused = kwargs.pop("return_unused_kwargs", False)
    hub = {k: kwargs.pop(k) for k in _hub_arguments() if k in kwargs}
    for name in ("trust_remote_code", "code_revision", "_from_auto", "_from_pipeline", "name_or_path"):
        kwargs.pop(name, None)
    config = base_config(path, keep_auto_map=True, **hub)
    unused = {}
    for key, value in kwargs.items():
        if hasattr(config, key):
            setattr(config, key, value)
        else:
            unused[key] = value
    return (config, unused) if return_unused else config


def load_model(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """What the folder's ``MosbitsForCausalLM.from_pretrained`` returns: `mosbits.hf.load` of the folder."""
    from mosbits.hf.quantizer import load

    for name in ("trust_remote_code", "code_revision", "adapter_kwargs", "_from_auto"):
        kwargs.pop(name, None)
    if kwargs.get("quantization_config") is None:  # tools pass None for "the folder's own"
        kwargs.pop("quantization_config", None)
    return load(path, *args, **kwargs)
