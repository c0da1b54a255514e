"""Checks that a checkpoint folder is whole before anything of it is uploaded.

A push that uploads a config without its weights, a truncated shard or a model whose expert weights would be
randomly initialised on load publishes something broken that looks fine. These checks read every weight file's
header and, unless told not to, load the model and refuse missing, unexpected or mis-shaped weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that must not be published as it is; the message says what is wrong and what to do."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}: is it a folder written by save_pretrained?") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); save the model again") from None


def _check_safetensors(path: Path) -> set[str]:
    """The tensor names in ``path``, after safetensors has checked its header and that the file covers every
    tensor the header describes (a truncated file fails here)."""
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path.name} in {path.parent}; save the model again")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"corrupt weight file {path}: {error}; save the model again") from None


def check_weight_files(folder: str | os.PathLike) -> set[str]:
    """Check the model or adapter weights in ``folder`` (single file or sharded with an index) and return the
    tensor names they hold. Raises :class:`CheckpointError` naming the missing or damaged file."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        _read_json(folder / "adapter_config.json")
        return _check_safetensors(folder / ADAPTER_WEIGHTS)
    _read_json(folder / "config.json")
    if (folder / MODEL_INDEX).is_file():
        weight_map = _read_json(folder / MODEL_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / MODEL_INDEX} has no weight_map; save the model again")
        names: set[str] = set()
        for shard in sorted(set(weight_map.values())):
            names |= _check_safetensors(folder / shard)
        listed = set(weight_map)
        if listed != names:
            missing = sorted(listed - names)[:5]
            raise CheckpointError(f"{MODEL_INDEX} lists tensors that no shard holds (e.g. {missing}); save again")
        return names
    if not (folder / MODEL_WEIGHTS).is_file():
        found = sorted(path.name for path in folder.iterdir() if path.suffix in (".safetensors", ".bin", ".pt"))
        raise CheckpointError(
            f"{folder} has a config.json but no {MODEL_WEIGHTS} or {MODEL_INDEX} (found: {found or 'no weight files'}); "
            "save the model with save_pretrained, which writes safetensors"
        )
    return _check_safetensors(folder / MODEL_WEIGHTS)


def load_checked(folder: str | os.PathLike):
    """Load the model saved in ``folder`` with its Auto class and refuse missing, unexpected or mis-shaped weights
    (transformers would only warn, and initialise missing weights randomly). Returns the model."""
    import transformers
    from transformers import AutoConfig

    from ..registration import AUTO_MODEL_CLASSES

    config = AutoConfig.from_pretrained(folder)
    auto_names = [name for name in AUTO_MODEL_CLASSES.get(type(config), {}) if name != "AutoModel"]
    auto_class = getattr(transformers, (auto_names or ["AutoModelForCausalLM"])[0])
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        details = "; ".join(f"{kind.replace('_', ' ')}: {keys[:5]}" for kind, keys in problems.items())
        raise CheckpointError(f"{folder} does not load cleanly ({details}); refusing to publish it")
    return model


def load_checked_adapter(folder: str | os.PathLike, base_model: str | os.PathLike | None = None):
    """Load the PEFT adapter in ``folder`` onto its base model (``base_model``, or the local folder its
    ``adapter_config.json`` names) and refuse an adapter whose weights do not match the modules the config
    creates. Returns the ``PeftModel``, or None where no local base model is available (only the weight files are
    checked then)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    base = base_model or _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        return None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    expected = {_without_adapter_name(key) for key in get_peft_model_state_dict(model)}
    stored = {_without_adapter_name(key) for key in _check_safetensors(folder / ADAPTER_WEIGHTS)}
    if expected != stored:
        details = f"missing keys: {sorted(expected - stored)[:5]}; unexpected keys: {sorted(stored - expected)[:5]}"
        raise CheckpointError(f"the adapter in {folder} does not match its config on {base} ({details})")
    return model


def _without_adapter_name(key: str) -> str:
    return key.replace(".default.", ".")
