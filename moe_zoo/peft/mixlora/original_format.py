"""Read and write adapters in the format of the original MixLoRA package (``pip install mixlora``, TUDB-Labs).

Both formats say ``peft_type: "MIXLORA"`` in ``adapter_config.json``, so the config alone cannot tell them apart; the
weights file does:

- moe-zoo (``PeftModel.save_pretrained``): ``adapter_model.safetensors``, keys ``base_model.model.<...>.layers.{i}.``
  ``mlp.lora_A_<proj>`` with all experts stacked in one ``(E, r, in)`` tensor, config with every ``MixLoraConfig``
  field (``expert_forward``, ``router_init_range``, ...).
- original: ``adapter_model.bin`` (``torch.save``), keys ``mixlora.layers.{i}.mlp.<proj>.experts.{j}.lora_A.weight``,
  one tensor per expert, config with only the keys of ``mixlora.MixLoraConfig.export()``.

Converting is renaming plus stacking / unstacking: expert ``j`` of the original is row ``[j]`` of ours. Every key of a
loaded file must land on exactly one parameter of the PEFT model and every adapter parameter must be filled; anything
else is a ``ValueError`` naming the keys, never a silent random init.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .config import MIXLORA_PEFT_TYPE, ROUTING_STRATEGIES, MixLoraConfig

ORIGINAL_WEIGHTS_NAME = "adapter_model.bin"
"""The weights file the original package writes and reads (``torch.save`` of a flat state dict)."""
CONFIG_NAME = "adapter_config.json"
ORIGINAL_PREFIX = "mixlora.layers."
"""Every key of an original adapter starts with this, followed by the decoder layer index."""

ORIGINAL_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "down_proj",
    "up_proj",
)
"""Target names of the gate/up/down layout the original package knows (``mixlora.config.lora_target_modules``)."""

_REQUIRED_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "routing_strategy", "num_experts")
_IGNORED_KEYS = ("bias", "task_type", "base_model_name_or_path", "lora_init")
"""Config keys read elsewhere (``bias``, ``task_type``, ``base_model_name_or_path``) or only used at init
(``lora_init``: the loaded weights replace the init)."""
_TRAINING_KEYS = ("router_aux_loss_coef", "router_init_range", "jitter_noise")
"""Training-only keys the original reads when present (its ``export()`` never writes them); mapped one to one."""
_KNOWN_KEYS = set(_REQUIRED_KEYS) | set(_IGNORED_KEYS) | set(_TRAINING_KEYS)
_KNOWN_KEYS |= {"top_k", "use_rslora", "use_dora", "act_fn", "expert_lora", "router_loss"}
_EXPERT_LORA_OVERRIDES = ("r", "lora_alpha", "lora_dropout")
ORIGINAL_FORMAT_STRATEGIES = ("mixlora",)
"""Strategies this interop loads and exports. ``"mixlora-dynamic"`` and ``"mixlora-switch"`` are refused: the
original's ``export()`` does not write ``top_p`` / ``temperature`` / ``expert_capacity``, and its switch and top-p
details (weights, capacity order, temperature) are not checked against the package, so a converted adapter could
silently compute something else."""

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_STACKED_KEY = re.compile(r"^mlp\.lora_(?P<ab>[AB])_(?P<proj>\w+)$")


def is_original_mixlora_adapter(path: str | os.PathLike) -> bool:
    """True if ``path`` holds an adapter saved by the original package (``adapter_model.bin`` and no
    ``adapter_model.safetensors``), i.e. one to open with :func:`load_mixlora_adapter`, not
    ``PeftModel.from_pretrained``."""
    path = os.fspath(path)
    has_bin = os.path.isfile(os.path.join(path, ORIGINAL_WEIGHTS_NAME))
    has_safetensors = os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    return has_bin and not has_safetensors


def _read_config(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"{config_file} does not exist; an original MixLoRA adapter has {CONFIG_NAME}.")
    with open(config_file, encoding="utf8") as handle:
        return json.load(handle)


def _check_original_config(raw: Mapping[str, Any]) -> None:
    """Refuse what we would load wrongly: missing or unknown keys, other PEFT types, options we do not implement."""
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise ValueError(f"The original MixLoRA config lacks {missing}; its export() always writes {_REQUIRED_KEYS}.")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"The original MixLoRA config has keys moe-zoo does not know: {unknown}; known: {sorted(_KNOWN_KEYS)}."
        )
    if raw["peft_type"] != MIXLORA_PEFT_TYPE:
        raise ValueError(f"`peft_type` is {raw['peft_type']!r}, expected {MIXLORA_PEFT_TYPE!r}.")
    if raw["routing_strategy"] not in ORIGINAL_FORMAT_STRATEGIES:
        raise ValueError(
            f"`routing_strategy` {raw['routing_strategy']!r} is not supported for original-format adapters; "
            f"supported: {ORIGINAL_FORMAT_STRATEGIES} (moe-zoo's own format has {ROUTING_STRATEGIES})."
        )
    if raw.get("bias", "none") != "none":
        raise ValueError(f"`bias` is {raw['bias']!r}; only 'none' is supported (the original writes 'none').")
    expert = raw.get("expert_lora") or {}
    if raw.get("use_dora") or expert.get("use_dora"):
        raise ValueError("`use_dora` (MixDoRA) is set, but moe-zoo's MixLoRA has no DoRA; only LoRA experts load.")
    if "use_rslora" in expert and bool(expert["use_rslora"]) != bool(raw.get("use_rslora", False)):
        raise ValueError("`expert_lora.use_rslora` differs from `use_rslora`; moe-zoo uses one value for both.")


def _expert_lora(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``r`` / ``lora_alpha`` / ``lora_dropout`` overrides of ``expert_lora`` (the original also copies ``bias``,
    ``task_type`` ... into it; those repeat the top level and carry nothing)."""
    expert = raw.get("expert_lora")
    if not expert:
        return None
    return {key: expert[key] for key in _EXPERT_LORA_OVERRIDES if key in expert}


def _target_modules(raw: Mapping[str, Any]) -> list[str]:
    """The original accepts a list or a ``{name: bool}`` dict; PEFT wants the list of names."""
    targets = raw["target_modules"]
    if isinstance(targets, Mapping):
        return [name for name, on in targets.items() if on]
    if isinstance(targets, list):
        return list(targets)
    raise ValueError(f"`target_modules` must be a list or a dict of booleans, got {type(targets).__name__}.")


def _check_act_fn(raw: Mapping[str, Any], base_model: nn.Module) -> None:
    """moe-zoo always uses the FFN's own activation; an ``act_fn`` naming another one cannot be honoured."""
    act_fn = raw.get("act_fn")
    hidden_act = getattr(getattr(base_model, "config", None), "hidden_act", None)
    if act_fn is not None and act_fn != hidden_act:
        raise ValueError(
            f"`act_fn` is {act_fn!r} but the base model's FFN uses {hidden_act!r}; moe-zoo's MixLoRA experts always "
            "use the FFN's own activation."
        )


def mixlora_config_from_original(raw: Mapping[str, Any], base_model: nn.Module | None = None) -> MixLoraConfig:
    """Our :class:`MixLoraConfig` for an original ``adapter_config.json`` dict (``ValueError`` for what we lack)."""
    _check_original_config(raw)
    if base_model is not None:
        _check_act_fn(raw, base_model)
    extras = {key: raw[key] for key in _TRAINING_KEYS if key in raw}
    return MixLoraConfig(
        r=int(raw["r"]),
        lora_alpha=raw["lora_alpha"],
        lora_dropout=float(raw["lora_dropout"]),
        target_modules=_target_modules(raw),
        use_rslora=bool(raw.get("use_rslora", False)),
        num_experts=int(raw["num_experts"]),
        top_k=int(raw.get("top_k", 2)),
        routing_strategy=raw["routing_strategy"],
        expert_lora=_expert_lora(raw),
        task_type=raw.get("task_type", "CAUSAL_LM"),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        **extras,
    )


def _split_layer_key(key: str) -> tuple[str, str] | None:
    """``(layer index, rest)`` of a PEFT state-dict key such as ``base_model.model.model.layers.3.mlp.moe_gate.weight``,
    or None for a key outside the decoder layers."""
    match = _LAYER_KEY.match(key)
    return (match["layer"], match["rest"]) if match else None


def original_keys(our_key: str, num_experts: int) -> list[str]:
    """The original's keys holding the tensor of our PEFT state-dict key (one per expert for stacked tensors).

    ``...layers.{i}.mlp.lora_A_{proj}`` -> ``mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_A.weight`` for every j;
    every other key keeps its path below the layer (``self_attn.q_proj.lora_A.weight``, ``mlp.moe_gate.weight``)."""
    split = _split_layer_key(our_key)
    if split is None:
        raise ValueError(f"{our_key!r} is not inside a decoder layer; the original format only stores layer weights.")
    layer, rest = split
    stacked = _STACKED_KEY.match(rest)
    if stacked is None:
        return [f"{ORIGINAL_PREFIX}{layer}.{rest}"]
    proj, ab = stacked["proj"], stacked["ab"]
    return [f"{ORIGINAL_PREFIX}{layer}.mlp.{proj}.experts.{j}.lora_{ab}.weight" for j in range(num_experts)]


def _to_our_state_dict(
    weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], num_experts: int
) -> dict[str, torch.Tensor]:
    """Rename and stack the original's tensors into the keys and shapes of ``expected`` (our PEFT state dict);
    ``ValueError`` naming every unknown, missing or mis-shaped key."""
    plan = {key: original_keys(key, num_experts) for key in expected}
    wanted = {name for names in plan.values() for name in names}
    unknown = sorted(set(weights) - wanted)
    missing = sorted(wanted - set(weights))
    if unknown or missing:
        raise ValueError(
            f"The original MixLoRA weights do not match the model built from their config: unknown keys {unknown}, "
            f"missing keys {missing}. Each key must be one the config's target_modules / num_experts produce."
        )
    converted = {}
    for key, names in plan.items():
        tensors = [weights[name] for name in names]
        tensor = torch.stack(tensors) if _STACKED_KEY.match(_split_layer_key(key)[1]) else tensors[0]
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{names[0]}{' ...' if len(names) > 1 else ''} gives shape {tuple(tensor.shape)} for {key}, but the "
                f"model needs {tuple(expected[key].shape)} (check r, num_experts and the base model)."
            )
        converted[key] = tensor.to(expected[key].dtype)
    return converted


def load_mixlora_adapter(
    base_model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load an adapter saved by the original ``mixlora`` package into moe-zoo's MixLoRA ``PeftModel``.

    ``base_model`` is the model the adapter was trained on (loaded by the caller, as for
    ``PeftModel.from_pretrained``). The ``.bin`` is read with ``torch.load(weights_only=True)``: no pickled code runs.
    """
    path = os.fspath(path)
    weights_file = os.path.join(path, ORIGINAL_WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        ours = os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
        hint = " It looks like a moe-zoo adapter: use PeftModel.from_pretrained." if ours else ""
        raise ValueError(f"{weights_file} does not exist; the original MixLoRA saves its weights there.{hint}")
    config = mixlora_config_from_original(_read_config(path), base_model)
    config.inference_mode = not is_trainable
    weights = torch.load(weights_file, map_location="cpu", weights_only=True)
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = _to_our_state_dict(weights, expected, config.num_experts)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"PEFT did not place {unexpected} (a moe-zoo bug: the conversion produced them).")
    if not is_trainable:
        model.eval()
    return model


def _original_config(config: MixLoraConfig, hidden_act: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` the original's ``MixLoraConfig.export()`` would write for ``config``."""
    targets = config.target_modules
    if isinstance(targets, str) or not set(targets) <= set(ORIGINAL_TARGETS):
        raise ValueError(
            f"`target_modules` is {targets!r}; the original format needs a list of names from {ORIGINAL_TARGETS}."
        )
    if config.layers_to_transform is not None or config.rank_pattern or config.alpha_pattern:
        raise ValueError("`layers_to_transform`, `rank_pattern` and `alpha_pattern` have no original equivalent.")
    if float(config.lora_alpha) != int(config.lora_alpha):
        raise ValueError(f"`lora_alpha` is {config.lora_alpha}; the original requires an integer.")
    if config.lora_dropout <= 0:
        raise ValueError(f"`lora_dropout` is {config.lora_dropout}; the original's LoraLinear asserts it is > 0.")
    if config.routing_strategy not in ORIGINAL_FORMAT_STRATEGIES:
        raise ValueError(
            f"`routing_strategy` is {config.routing_strategy!r}; only {ORIGINAL_FORMAT_STRATEGIES} can be exported "
            "to the original format (its config would lose top_p / expert_capacity); save with save_pretrained."
        )
    raw: dict[str, Any] = {
        "bias": "none",
        "peft_type": MIXLORA_PEFT_TYPE,
        "task_type": config.task_type or "CAUSAL_LM",
        "base_model_name_or_path": config.base_model_name_or_path or "",
        "r": int(config.r),
        "lora_alpha": int(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "target_modules": [name for name in ORIGINAL_TARGETS if name in set(targets)],
        "routing_strategy": config.routing_strategy,
        "num_experts": config.num_experts,
        "top_k": config.top_k,
    }
    if config.use_rslora:
        raw["use_rslora"] = True
    if config.expert_lora:
        raw["expert_lora"] = dict(config.expert_lora)
    if hidden_act is not None:
        raw["act_fn"] = hidden_act  # the original's transformers path needs it: it does not fall back to the FFN's
    return raw


def export_mixlora_adapter(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``peft_model``'s MixLoRA adapter as the original package saves it (``adapter_config.json`` +
    ``adapter_model.bin``), so that ``mixlora.load_adapter_weights`` and ``inject_adapter_in_model`` read it."""
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, MixLoraConfig):
        raise ValueError(f"Adapter {adapter_name!r} is a {type(config).__name__}, not a MixLoraConfig.")
    hidden_act = getattr(peft_model.get_base_model().config, "hidden_act", None)
    raw = _original_config(config, hidden_act)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = original_keys(key, config.num_experts)
        parts = [tensor] if len(names) == 1 else list(tensor.unbind(0))
        weights.update(
            {name: part.detach().cpu().contiguous().clone() for name, part in zip(names, parts, strict=True)}
        )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf8") as handle:
        json.dump(raw, handle, indent=2)
    torch.save(weights, os.path.join(path, ORIGINAL_WEIGHTS_NAME))
