# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""What the converters of original checkpoints (MoE-LLaVA, Uni-MoE) share: the error they raise, how they list
keys in it, reading config fields, weight files and vision-tower configs.

Each converter owns its key mapping; the helpers here only read files and report problems, so that every converter
refuses the same way (one :class:`ConversionError` naming the keys) and reads the same file formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig

MAX_LISTED_KEYS = 40
"""Keys named in one error message; the rest are counted."""

VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted faithfully (the message says what and why)."""


def key_listing(keys: Sequence[str]) -> str:
    """``"N key(s): a, b, ..."``, sorted, naming at most :data:`MAX_LISTED_KEYS` of them."""
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f", ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{len(keys)} key(s): {shown}{more}"


def require_field(config: Mapping[str, Any], name: str, where: str) -> Any:
    """``config[name]``, or a :class:`ConversionError` saying that ``where`` lacks it."""
    if config.get(name) is None:
        raise ConversionError(f"{where} has no {name!r}, which the conversion needs")
    return config[name]


def first_field(config: Mapping[str, Any], names: Sequence[str], default: Any = None) -> Any:
    """The value of the first of ``names`` that ``config`` sets (not None), else ``default``."""
    return next((config[n] for n in names if config.get(n) is not None), default)


def load_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One weight file: ``.safetensors`` with safetensors, anything else (``.bin``, ``.pt``) with
    ``torch.load(weights_only=True)`` on the CPU (never unpickling arbitrary objects)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(path))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping name -> tensor)")
    return dict(loaded)


def find_state_dict_files(src: str | os.PathLike) -> list[Path] | None:
    """The weight files of a checkpoint folder: ``model.safetensors`` (or its index's shards), else
    ``pytorch_model.bin`` (or its index's shards); None when the folder holds neither."""
    src = Path(src)
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (src / single).is_file():
            return [src / single]
        if (src / index).is_file():
            shards = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            missing = [shard for shard in shards if not (src / shard).is_file()]
            if missing:
                raise ConversionError(f"{src / index} names shards that are not in {src}: {', '.join(missing)}")
            return [src / shard for shard in shards]
    return None


def load_original_state_dict(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an original checkpoint folder: ``model.safetensors`` (or its shards), else
    ``pytorch_model.bin`` (or its shards), the latter read with ``torch.load(weights_only=True)``."""
    files = find_state_dict_files(src)
    if files is None:
        raise ConversionError(f"{src} holds no model.safetensors or pytorch_model.bin (nor a sharded index of either)")
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        state_dict.update(load_weight_file(path))
    return state_dict


def load_vision_config(path: str | os.PathLike, allowed: Sequence[str] = VISION_MODEL_TYPES) -> PreTrainedConfig:
    """A vision-tower config from a JSON file, or from a folder's ``config.json``; a full CLIP/SigLIP config (as
    the Hub's ``openai/clip-vit-*`` folders hold) gives its ``vision_config``.

    Args:
        path: the file or folder.
        allowed: the vision ``model_type`` values the caller's model supports.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConversionError(f"vision config {path} does not exist")
    fields = json.loads(path.read_text())
    model_type = fields.pop("model_type", None)
    if model_type in ("clip", "siglip"):
        if not isinstance(fields.get("vision_config"), dict):
            raise ConversionError(f"{path} is a {model_type} config without a vision_config")
        fields = dict(fields["vision_config"])
        fields.pop("model_type", None)
        model_type += "_vision_model"
    if model_type not in allowed:
        raise ConversionError(
            f"vision config {path} has model_type {model_type!r}; supported: "
            + ", ".join(repr(t) for t in allowed)
            + " (or a full config holding one as its vision_config)"
        )
    for name in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        fields.pop(name, None)
    return AutoConfig.for_model(model_type, **fields)


def vision_prefix(expected_keys: Sequence[str], module: str = "model.vision_tower") -> str:
    """Where a transformers vision model's tensors live under ``module``: ``CLIPVisionModel`` keeps them directly
    there (``module.embeddings...``), ``SiglipVisionModel`` under ``module.vision_model.``."""
    nested = any(k.startswith(f"{module}.vision_model.") for k in expected_keys)
    return f"{module}.vision_model." if nested else f"{module}."


__all__ = [
    "ConversionError",
    "MAX_LISTED_KEYS",
    "find_state_dict_files",
    "first_field",
    "key_listing",
    "load_original_state_dict",
    "load_vision_config",
    "load_weight_file",
    "require_field",
    "vision_prefix",
]
