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

DoRA (``use_dora``, the original's MixDoRA): the original format has no key for DoRA magnitudes. The package (and
MoE-PEFT, which trains and saves these adapters) sets each magnitude to ``||W + s B A||`` from the loaded A and B when
it builds a ``LoraLinear``, so a trained magnitude never survives its save. We load the same way (every magnitude,
per expert and on the attention LoRA, recomputed from the loaded weights) and refuse to export magnitudes the reader
would not recompute, rather than change the adapter's outputs silently.

Routing strategies: the pip package (0.2.3) reads only ``"mixlora"``; MoE-PEFT, whose format it is, also writes
``"mixlora-dynamic"`` (``top_p``, ``temperature``) and ``"mixlora-switch"`` (``expert_capacity``, ``sparse_step``).
We load and export those keys; see ``docs/mixlora.md`` for where MoE-PEFT's routing of those strategies differs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import MIXLORA_PEFT_TYPE, ROUTING_STRATEGIES, MixLoraConfig
from .layer import MixLoraFeedForward, dora_weight_norm

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
    "dense",
    "fc1",
    "fc2",
    "qkv_proj",
    "gate_up_proj",
)
"""Target names the original package knows, in its order (``mixlora.config.lora_target_modules``: Llama's, then
Phi's ``dense`` / ``fc1`` / ``fc2``, then Phi-3's ``qkv_proj`` / ``gate_up_proj``)."""

_REQUIRED_KEYS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "routing_strategy", "num_experts")
_IGNORED_KEYS = ("bias", "task_type", "base_model_name_or_path", "lora_init")
"""Config keys read elsewhere (``bias``, ``task_type``, ``base_model_name_or_path``) or only used at init
(``lora_init``: the loaded weights replace the init)."""
_TRAINING_KEYS = ("router_aux_loss_coef", "router_init_range", "jitter_noise", "router_z_loss_coef")
"""Training-only keys the original reads when present (its ``export()`` never writes them); mapped one to one."""
STRATEGY_KEYS = {
    "mixlora": ("top_k",),
    "mixlora-dynamic": ("top_p", "temperature"),
    "mixlora-switch": ("expert_capacity", "sparse_step"),
}
"""The keys MoE-PEFT's ``MixLoraConfig.export()`` writes for each routing strategy (``moe_peft/adapters/mixlora/``
``config.py`` @40f8cb7). ``sparse_step`` is read by MoE-PEFT but used nowhere; it is written as null and ignored."""
_KNOWN_KEYS = set(_REQUIRED_KEYS) | set(_IGNORED_KEYS) | set(_TRAINING_KEYS)
_KNOWN_KEYS |= {"use_rslora", "use_dora", "act_fn", "expert_lora", "router_loss", "ffn_dropout"}
_KNOWN_KEYS |= {key for keys in STRATEGY_KEYS.values() for key in keys}
_EXPERT_LORA_OVERRIDES = ("r", "lora_alpha", "lora_dropout")
ORIGINAL_FORMAT_STRATEGIES = ROUTING_STRATEGIES
"""Strategies this interop loads and exports: all three, in MoE-PEFT's keys (the pip package reads only
``"mixlora"``; see :data:`PACKAGE_STRATEGIES`)."""
PACKAGE_STRATEGIES = ("mixlora",)
"""Strategies the pip ``mixlora`` package (0.2.3) itself can load (its ``MixLoraConfig.from_config`` asserts it)."""

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_STACKED_KEY = re.compile(r"^mlp\.lora_(?P<ab>[AB])_(?P<proj>\w+)$")
_MAGNITUDE_KEY = re.compile(r"(^mlp\.lora_magnitude_\w+$|\.lora_magnitude_vector$)")
"""Our DoRA magnitude keys (experts' ``mlp.lora_magnitude_<proj>``, PEFT's ``<proj>.lora_magnitude_vector``): the
original format has none, its readers recompute them."""


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
            f"supported: {ORIGINAL_FORMAT_STRATEGIES}."
        )
    if raw.get("bias", "none") != "none":
        raise ValueError(f"`bias` is {raw['bias']!r}; only 'none' is supported (the original writes 'none').")
    if float(raw.get("ffn_dropout") or 0.0) != 0.0:
        raise ValueError(
            f"`ffn_dropout` is {raw['ffn_dropout']}; MoE-PEFT's switch applies it to the whole FFN output in "
            "training, which moe-zoo does not implement (only 0 loads)."
        )
    expert = raw.get("expert_lora") or {}
    for key in ("use_rslora", "use_dora"):
        if key in expert and bool(expert[key]) != bool(raw.get(key, False)):
            raise ValueError(f"`expert_lora.{key}` differs from `{key}`; moe-zoo uses one value for both.")


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


def _hidden_act(base_model: nn.Module) -> str | None:
    """The activation name the base model's FFNs were built from (Gemma-2 names it ``hidden_activation``)."""
    config = getattr(base_model, "config", None)
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


def _check_act_fn(raw: Mapping[str, Any], base_model: nn.Module) -> None:
    """moe-zoo always uses the FFN's own activation; an ``act_fn`` naming another one cannot be honoured."""
    act_fn = raw.get("act_fn")
    hidden_act = _hidden_act(base_model)
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
    for key in ("top_p", "temperature"):
        if key in raw:
            extras[key] = float(raw[key])
    if "expert_capacity" in raw:
        extras["expert_capacity"] = raw["expert_capacity"]
    num_experts = int(raw["num_experts"])
    return MixLoraConfig(
        r=int(raw["r"]),
        lora_alpha=raw["lora_alpha"],
        lora_dropout=float(raw["lora_dropout"]),
        target_modules=_target_modules(raw),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        num_experts=num_experts,
        top_k=int(raw.get("top_k", min(2, num_experts))),
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
    DoRA magnitudes -> none (the format has no key for them); every other key keeps its path below the layer
    (``self_attn.q_proj.lora_A.weight``, ``mlp.moe_gate.weight``)."""
    split = _split_layer_key(our_key)
    if split is None:
        raise ValueError(f"{our_key!r} is not inside a decoder layer; the original format only stores layer weights.")
    layer, rest = split
    if _MAGNITUDE_KEY.search(rest):
        return []
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
    plan = {key: names for key in expected if (names := original_keys(key, num_experts))}
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


def dora_magnitudes(model: nn.Module, adapter_name: str):
    """``(module name, magnitude parameter, recomputed ||W + s B A||)`` for every DoRA magnitude of the adapter:
    each expert's (stacked ``(E, out)``) and PEFT's on the attention LoRA (``(out,)``)."""
    for name, module in model.named_modules():
        if isinstance(module, MixLoraFeedForward) and module.use_dora.get(adapter_name):
            for proj in module.targeted[adapter_name]:
                magnitude = getattr(module, f"lora_magnitude_{proj}")[adapter_name]
                norms = torch.stack([module.dora_norm(adapter_name, proj, e) for e in range(magnitude.shape[0])])
                yield f"{name}.{proj}", magnitude, norms
        elif isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_magnitude_vector", {}):
            magnitude = module.lora_magnitude_vector[adapter_name].weight
            lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            weight = module.get_base_layer().weight
            yield name, magnitude, dora_weight_norm(weight, lora_a, lora_b, module.scaling[adapter_name])


def _recompute_dora_magnitudes(model: nn.Module, adapter_name: str) -> None:
    """Set every DoRA magnitude to ``||W + s B A||`` of the loaded weights, as the original does on load."""
    with torch.no_grad():
        for _, magnitude, norms in dora_magnitudes(model, adapter_name):
            magnitude.copy_(norms.to(magnitude.dtype))


def _check_dora_magnitudes_survive_export(model: nn.Module, adapter_name: str) -> None:
    """The original format cannot carry a magnitude other than ``||W + s B A||`` (its readers recompute it)."""
    with torch.no_grad():
        lost = [
            name
            for name, magnitude, norms in dora_magnitudes(model, adapter_name)
            if not torch.allclose(magnitude, norms.to(magnitude.dtype), rtol=1e-5, atol=1e-6)
        ]
    if lost:
        raise ValueError(
            f"The DoRA magnitudes of {lost[:4]}{' ...' if len(lost) > 4 else ''} differ from ||W + s B A||. The "
            "original format has no key for DoRA magnitudes: the mixlora package and MoE-PEFT recompute them as "
            "||W + s B A|| on load, so exporting would change this adapter's outputs. Save it with save_pretrained "
            "(moe-zoo's format keeps the magnitudes)."
        )


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
    if config.use_dora:
        _recompute_dora_magnitudes(model, adapter_name)
    if not is_trainable:
        model.eval()
    return model


def _original_config(config: MixLoraConfig, hidden_act: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` the original's ``MixLoraConfig.export()`` would write for ``config`` (the pip
    package's for ``"mixlora"``, MoE-PEFT's :data:`STRATEGY_KEYS` for the other strategies)."""
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
    }
    strategy_values = {
        "top_k": config.top_k,
        "top_p": config.top_p,
        "temperature": config.temperature,
        "expert_capacity": config.expert_capacity,
        "sparse_step": None,
    }
    raw.update({key: strategy_values[key] for key in STRATEGY_KEYS[config.routing_strategy]})
    if config.routing_strategy == "mixlora-dynamic":
        raw["top_k"] = config.top_k  # MoE-PEFT ignores it there; it is the k of our load-balancing loss
    if config.use_rslora:
        raw["use_rslora"] = True
    if config.use_dora:
        raw["use_dora"] = True
    if config.expert_lora:
        raw["expert_lora"] = dict(config.expert_lora)
    if hidden_act is not None:
        raw["act_fn"] = hidden_act  # the original's transformers path needs it: it does not fall back to the FFN's
    return raw


def export_mixlora_adapter(peft_model: PeftModel, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``peft_model``'s MixLoRA adapter as the original package saves it (``adapter_config.json`` +
    ``adapter_model.bin``), so that ``mixlora.load_adapter_weights`` and ``inject_adapter_in_model`` read it
    (``"mixlora"`` routing; the other strategies are written in MoE-PEFT's keys, which the pip package refuses).
    DoRA magnitudes are not written (the format has no key): a ``ValueError`` if they differ from what the reader
    recomputes, ``||W + s B A||``."""
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, MixLoraConfig):
        raise ValueError(f"Adapter {adapter_name!r} is a {type(config).__name__}, not a MixLoraConfig.")
    raw = _original_config(config, _hidden_act(peft_model.get_base_model()))
    if config.use_dora:
        _check_dora_magnitudes_survive_export(peft_model, adapter_name)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = original_keys(key, config.num_experts)
        if not names:
            continue  # a DoRA magnitude: checked above to be what the reader recomputes
        parts = [tensor] if len(names) == 1 else list(tensor.unbind(0))
        weights.update(
            {name: part.detach().cpu().contiguous().clone() for name, part in zip(names, parts, strict=True)}
        )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf8") as handle:
        json.dump(raw, handle, indent=2)
    torch.save(weights, os.path.join(path, ORIGINAL_WEIGHTS_NAME))
