# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Convert a checkpoint of the original MoE-LLaVA code (PKU-YuanGroup/MoE-LLaVA, DeepSpeed MoE layers) into a
``MoeLlavaForConditionalGeneration`` folder that ``AutoModelForImageTextToText.from_pretrained`` loads after
``import moe_zoo``.

Supported ``model_type``: ``moe_llava_phi`` (-> ``PhiConfig``), ``moe_llava_stablelm`` (-> ``StableLmConfig``) and
``moe_llava_qwen1_5`` (-> ``Qwen2Config``), plus their dense stage-II forms (``llava_phi``, ...). Every tensor of the
original is placed or the conversion fails naming it, and every tensor of the converted model comes from the
checkpoint (never a random init). The only tensors the original does not have are set to what computes the
original's function: the router's selection bias is zero (DeepSpeed's gate has none), transformers' Phi LM head bias
is zero when the original's head has none (MoE-LLaVA builds its Phi head without a bias), and the ``<image>`` rows
are described below.

The image token: the original splices image features at a ``-200`` sentinel that is not a token. transformers'
Llava needs a real token id, so by default ``image_token_id`` is the original vocabulary size ``V`` and the input
embedding and the LM head each get one row ``V``, set to the mean of the original rows (the LM head's bias, Phi's,
to the mean bias). The embedding row never reaches the model (image tokens are replaced by image features); the LM
head row leaves the logits of the ``V`` original tokens unchanged (one more column), and the saved
``generation_config`` suppresses the image token, so greedy decoding and sampling pick exactly as the original. The
softmax of a training loss has one more term (the mean logit), the only difference. ``image_token_id=<id < V>``
instead reuses a row the tokenizer never produces (real checkpoints have some: Phi-2's embedding has 51200 rows for
a 50295-token tokenizer), with no new row.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PhiConfig, PreTrainedConfig, Qwen2Config, StableLmConfig

from ...atomic_io import atomic_directory
from ..conversion_utils import ConversionError, load_original_state_dict, load_vision_config
from ..conversion_utils import first_field as _first
from ..conversion_utils import key_listing as _listing
from ..conversion_utils import require_field as _require
from ..conversion_utils import vision_prefix as _vision_prefix
from .configuration_moe_llava import MoeLlavaConfig

VARIANTS = ("phi", "stablelm", "qwen1_5")
"""Backbones the converter supports (``model_type`` ``moe_llava_<variant>``, or ``llava_<variant>`` when dense)."""

UNSUPPORTED_MODEL_TYPES = {
    "moe_llava_qwen": "Qwen-1 (vendored remote code with fused c_attn/w1/w2 and no transformers architecture)",
    "moe_llava_mistral": "Mistral/OpenChat",
    "moe_llava_llama": "Llama",
    "moe_llava_minicpm": "MiniCPM",
}

VISION_TOWER_PREFIX = "model.image_tower.image_tower.vision_model."
"""Where the original keeps the vision tower (CLIP/SigLIP ``vision_model``)."""

DEFAULT_VISION_CONFIG_NAME = "vision_tower_config.json"


# --- state dict --------------------------------------------------------------------------------------------------


def _variant_of(name: str) -> str:
    variant = name.removeprefix("moe_").removeprefix("llava_")
    if variant not in VARIANTS:
        if name in UNSUPPORTED_MODEL_TYPES:
            raise ConversionError(
                f"model_type {name!r} ({UNSUPPORTED_MODEL_TYPES[name]}) is not supported; supported: "
                + ", ".join(f"moe_llava_{v}" for v in VARIANTS)
            )
        raise ConversionError(
            f"unknown MoE-LLaVA variant {name!r}; supported: " + ", ".join(f"moe_llava_{v}" for v in VARIANTS)
        )
    return variant


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_KEY = re.compile(r"^mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")
_GATE_KEY = re.compile(r"^mlp\.deepspeed_moe\.gate\.(.+)$")
_LAYER_PARTS = re.compile(r"^(self_attn|input_layernorm|post_attention_layernorm)\.")
_PROJECTOR = {
    "model.mm_projector.image_spatial_proj.0.": "linear_1.",
    "model.mm_projector.image_spatial_proj.2.": "linear_2.",
}
_FINAL_NORM = {"phi": "final_layernorm", "stablelm": "norm", "qwen1_5": "norm"}
_EXPERT_PARTS = {
    "phi": ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"),
    "stablelm": ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "qwen1_5": ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
}


def convert_state_dict(
    original_sd: Mapping[str, torch.Tensor],
    variant: str,
    num_layers: int,
    moe_layers: Sequence[int],
    num_experts: int | None = None,
    vision_prefix: str = "model.vision_tower.",
) -> dict[str, torch.Tensor]:
    """Rename and stack an original MoE-LLaVA state dict into ``MoeLlavaForConditionalGeneration``'s names.

    Args:
        original_sd: the original ``model.state_dict()`` (``model.layers.{i}.mlp.deepspeed_moe...`` names).
        variant: ``"phi"``, ``"stablelm"`` or ``"qwen1_5"`` (a ``model_type`` such as ``"moe_llava_phi"`` works too).
        num_layers: decoder layers of the language model.
        moe_layers: indices of the layers that hold an MoE block (the others keep their dense ``mlp``).
        num_experts: experts per MoE layer; None takes the largest expert index found plus one.
        vision_prefix: where the vision tower's modules live in the converted model (``model.vision_tower.`` for
            transformers' ``CLIPVisionModel``, ``model.vision_tower.vision_model.`` for ``SiglipVisionModel``).

    Mapping: ``deepspeed_moe.gate.wg.weight`` -> ``mlp.gate.weight``; the experts of a layer are stacked in expert
    order, ``gate_up_proj[e] = cat([gate_proj_e, up_proj_e])`` and ``down_proj[e]`` (StableLM, Qwen1.5), or
    ``up_proj``/``up_proj_bias``/``down_proj``/``down_proj_bias`` from ``fc1``/``fc2`` (Phi);
    ``model.mm_projector.image_spatial_proj.{0,2}`` -> ``model.multi_modal_projector.linear_{1,2}``;
    ``model.image_tower.image_tower.vision_model.*`` -> ``vision_prefix + *``; the rest of ``model.*`` ->
    ``model.language_model.*``; ``lm_head.*`` unchanged.

    Raises:
        ConversionError: listing every key it cannot place, and every expert, router or dense-FFN tensor missing.
    """
    variant = _variant_of(variant)
    moe_set = set(moe_layers)
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {i: {} for i in moe_set}
    gates: dict[int, dict[str, torch.Tensor]] = {i: {} for i in moe_set}
    dense_mlp: dict[int, set[str]] = {}
    unplaced: list[str] = []
    final_norm = f"model.{_FINAL_NORM[variant]}."
    dense_parts = ("fc1.", "fc2.") if variant == "phi" else ("gate_proj.", "up_proj.", "down_proj.")

    for key, tensor in original_sd.items():
        if key.startswith("lm_head."):
            out[key] = tensor
        elif key.startswith(VISION_TOWER_PREFIX):
            out[vision_prefix + key.removeprefix(VISION_TOWER_PREFIX)] = tensor
        elif any(key.startswith(p) for p in _PROJECTOR):
            prefix = next(p for p in _PROJECTOR if key.startswith(p))
            out["model.multi_modal_projector." + _PROJECTOR[prefix] + key.removeprefix(prefix)] = tensor
        elif key.startswith(("model.embed_tokens.", final_norm)):
            out["model.language_model." + key.removeprefix("model.")] = tensor
        elif (match := _LAYER_KEY.match(key)) and int(match.group(1)) < num_layers:
            layer, rest = int(match.group(1)), match.group(2)
            target = f"model.language_model.layers.{layer}."
            if _LAYER_PARTS.match(rest):
                out[target + rest] = tensor
            elif layer in moe_set and (expert := _EXPERT_KEY.match(rest)):
                index, part = int(expert.group(1)), expert.group(2)
                if part in _EXPERT_PARTS[variant] and (num_experts is None or index < num_experts):
                    experts[layer].setdefault(index, {})[part] = tensor
                else:
                    unplaced.append(key)
            elif layer in moe_set and (gate := _GATE_KEY.match(rest)):
                name = "weight" if gate.group(1) == "wg.weight" else gate.group(1)
                gates[layer][name] = tensor
            elif layer not in moe_set and rest.startswith("mlp.") and rest[4:].startswith(dense_parts):
                out[target + rest] = tensor
                dense_mlp.setdefault(layer, set()).add(rest)
            else:
                unplaced.append(key)
        else:
            unplaced.append(key)
    if unplaced:
        raise ConversionError(
            f"cannot place {_listing(unplaced)} (variant {variant!r}, {num_layers} layers, MoE layers "
            f"{sorted(moe_set)}); this converter does not know where they go, so it refuses rather than drop them"
        )

    missing = []
    for layer in sorted(moe_set):
        prefix = f"model.layers.{layer}.mlp.deepspeed_moe."
        if "weight" not in gates[layer]:
            missing.append(prefix + "gate.wg.weight")
        count = num_experts if num_experts is not None else max(experts[layer], default=-1) + 1
        if count < 1:
            missing.append(prefix + "experts.deepspeed_experts.*")
            continue
        for index in range(count):
            found = experts[layer].get(index, {})
            missing += [
                f"{prefix}experts.deepspeed_experts.{index}.{p}" for p in _EXPERT_PARTS[variant] if p not in found
            ]
    for layer in sorted(set(range(num_layers)) - moe_set):
        parts = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias") if variant == "phi" else _EXPERT_PARTS[variant]
        missing += [f"model.layers.{layer}.mlp.{p}" for p in parts if f"mlp.{p}" not in dense_mlp.get(layer, set())]
    if missing:
        raise ConversionError(f"the checkpoint lacks {_listing(missing)}")

    for layer in sorted(moe_set):
        target = f"model.language_model.layers.{layer}.mlp."
        for name, tensor in gates[layer].items():
            out[target + "gate." + name] = tensor
        bank = [experts[layer][index] for index in sorted(experts[layer])]
        if variant == "phi":
            out[target + "experts.up_proj"] = torch.stack([e["fc1.weight"] for e in bank])
            out[target + "experts.up_proj_bias"] = torch.stack([e["fc1.bias"] for e in bank])
            out[target + "experts.down_proj"] = torch.stack([e["fc2.weight"] for e in bank])
            out[target + "experts.down_proj_bias"] = torch.stack([e["fc2.bias"] for e in bank])
        else:
            gate_up = [torch.cat([e["gate_proj.weight"], e["up_proj.weight"]], dim=0) for e in bank]
            out[target + "experts.gate_up_proj"] = torch.stack(gate_up)
            out[target + "experts.down_proj"] = torch.stack([e["down_proj.weight"] for e in bank])
    return out


def append_image_token_rows(state_dict: dict[str, torch.Tensor]) -> int:
    """Give the input embedding and the LM head one more row (the ``<image>`` token), set to the mean of the
    existing rows (the LM head's bias to the mean bias). Returns the new row's id, the original vocabulary size."""
    embed_key = "model.language_model.embed_tokens.weight"
    vocab_size = state_dict[embed_key].shape[0]
    for key in (embed_key, "lm_head.weight", "lm_head.bias"):
        if key in state_dict:
            rows = state_dict[key]
            if rows.shape[0] != vocab_size:
                raise ConversionError(f"{key} has {rows.shape[0]} rows but the embedding has {vocab_size}")
            mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
            state_dict[key] = torch.cat([rows, mean], dim=0)
    return vocab_size


# --- configs -----------------------------------------------------------------------------------------------------


def build_text_config(original: Mapping[str, Any], variant: str, vocab_size: int) -> PreTrainedConfig:
    """The transformers config of the backbone (``PhiConfig``, ``StableLmConfig`` or ``Qwen2Config``) from the
    original config's fields, with ``vocab_size`` rows."""
    where = "config.json"
    if original.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {original['rope_scaling']!r} is not supported by the conversion")
    if original.get("tie_word_embeddings"):
        raise ConversionError(
            "tie_word_embeddings=True is not supported (MoE-LLaVA's backbones have their own LM head)"
        )
    heads = _require(original, "num_attention_heads", where)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": _require(original, "hidden_size", where),
        "intermediate_size": _require(original, "intermediate_size", where),
        "num_hidden_layers": _require(original, "num_hidden_layers", where),
        "num_attention_heads": heads,
        "num_key_value_heads": original.get("num_key_value_heads") or heads,
        "max_position_embeddings": _require(original, "max_position_embeddings", where),
        "initializer_range": original.get("initializer_range", 0.02),
        "tie_word_embeddings": False,
        "bos_token_id": original.get("bos_token_id"),
        "eos_token_id": original.get("eos_token_id"),
        "pad_token_id": original.get("pad_token_id"),
        "attention_dropout": original.get("attention_dropout", 0.0) or 0.0,
    }
    rope = {"rope_type": "default", "rope_theta": float(original.get("rope_theta", 10000.0))}
    if variant == "phi":
        rope["partial_rotary_factor"] = float(_first(original, ("partial_rotary_factor",), 0.5))
        return PhiConfig(
            **common,
            hidden_act=original.get("hidden_act", "gelu_new"),
            layer_norm_eps=_first(original, ("layer_norm_eps",), 1e-5),
            resid_pdrop=original.get("resid_pdrop", 0.0),
            embd_pdrop=original.get("embd_pdrop", 0.0),
            qk_layernorm=bool(original.get("qk_layernorm", False)),
            rope_parameters=rope,
        )
    if variant == "stablelm":
        # StableLM-epoch (the original's) names: rope_pct, norm_eps; transformers' StableLm: the others.
        rope["partial_rotary_factor"] = float(_first(original, ("partial_rotary_factor", "rope_pct"), 0.25))
        return StableLmConfig(
            **common,
            hidden_act=original.get("hidden_act", "silu"),
            layer_norm_eps=_first(original, ("layer_norm_eps", "norm_eps"), 1e-5),
            use_qkv_bias=bool(original.get("use_qkv_bias", False)),
            qk_layernorm=bool(original.get("qk_layernorm", False)),
            use_parallel_residual=bool(original.get("use_parallel_residual", False)),
            hidden_dropout=original.get("hidden_dropout", 0.0) or 0.0,
            rope_parameters=rope,
        )
    use_sliding_window = bool(original.get("use_sliding_window", False))
    return Qwen2Config(
        **common,
        hidden_act=original.get("hidden_act", "silu"),
        rms_norm_eps=_first(original, ("rms_norm_eps",), 1e-6),
        use_sliding_window=use_sliding_window,
        sliding_window=original.get("sliding_window") if use_sliding_window else None,
        max_window_layers=original.get("max_window_layers", common["num_hidden_layers"]),
        rope_parameters=rope,
    )


def _moe_fields(original: Mapping[str, Any]) -> dict[str, Any]:
    moe = original.get("moe") or {}
    if not moe.get("moe_enable", False):
        return {"moe_layers": "none"}  # a dense stage-I/II checkpoint
    if moe.get("use_residual"):
        raise ConversionError("moe.use_residual=True (residual MoE) is not supported")
    experts = _require(moe, "num_experts", "config.json's moe")
    if isinstance(experts, Sequence):
        if not experts or len(set(experts)) != 1:
            raise ConversionError(
                f"moe.num_experts {experts!r} varies by layer; moe_zoo needs one count for all layers"
            )
        experts = experts[0]
    top_k = _require(moe, "top_k_experts", "config.json's moe")
    if top_k not in (1, 2, -1):
        raise ConversionError(f"moe.top_k_experts={top_k!r}; DeepSpeed's gate (and this conversion) supports 1, 2, -1")
    layers = moe.get("moe_layers_idx")
    if layers is None:
        mode = moe.get("moe_mode", "sparse")
        if mode not in ("sparse", "first_half", "second_half", "dense"):
            raise ConversionError(f"moe.moe_mode {mode!r} with no moe_layers_idx")
        layers = "none" if mode == "dense" else mode
    fields = {
        "num_experts": int(experts),
        "num_experts_per_tok": int(top_k),
        "moe_layers": list(layers) if not isinstance(layers, str) else layers,
        "capacity_factor": moe.get("capacity_factor"),
        "eval_capacity_factor": moe.get("eval_capacity_factor"),
        "min_capacity": int(moe.get("min_capacity") or 0),
        "router_aux_loss_coef": float(moe.get("router_aux_loss_coef", 0.01)),
        "aux_loss_type": "gshard_top1_sum",
        # DeepSpeed's top-2 gate renormalises the two weights; its top-1 gate keeps the softmax probability.
        "norm_topk_prob": top_k != 1,
    }
    if top_k != -1:
        fields["router_type"] = "softmax_topk"
    return fields


def build_config(
    original: Mapping[str, Any],
    vision_config: PreTrainedConfig,
    vocab_size: int,
    image_token_id: int,
) -> MoeLlavaConfig:
    """``MoeLlavaConfig`` for an original MoE-LLaVA ``config.json`` (as a dict), the vision tower's config, the
    converted vocabulary size and the image token id."""
    variant = _variant_of(_require(original, "model_type", "config.json"))
    projector = _first(original, ("image_projector_type", "mm_projector_type"), "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"projector type {projector!r} is not supported (only 'mlp2x_gelu', Llava's two-layer GELU projector)"
        )
    select = original.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ConversionError(f"mm_vision_select_feature {select!r} is not supported ('patch' or 'cls_patch')")
    if original.get("mm_hidden_size") not in (None, vision_config.hidden_size):
        raise ConversionError(
            f"mm_hidden_size {original['mm_hidden_size']} does not match the vision config's hidden_size "
            f"{vision_config.hidden_size}: wrong vision config?"
        )
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = num_patches + (1 if vision_config.model_type == "clip_vision_model" else 0)
    text_config = build_text_config(original, variant, vocab_size)
    return MoeLlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        image_seq_length=tokens - 1 if select == "patch" else tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategies[select],
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        **_moe_fields(original),
    )


# --- files -------------------------------------------------------------------------------------------------------


def convert_moe_llava_original(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    vision_config: str | os.PathLike | None = None,
    image_token_id: int | None = None,
) -> Path:
    """Convert the original MoE-LLaVA checkpoint folder ``src`` into a moe_zoo folder ``dst`` (written atomically).

    Args:
        src: folder with the original ``config.json`` (``model_type`` ``moe_llava_{phi,stablelm,qwen1_5}``, the
            ``moe`` dict, ``mm_*`` fields) and ``model.safetensors`` or ``pytorch_model.bin``, vision tower included
            (``model.image_tower.image_tower.vision_model.*``).
        dst: the output folder (replaced if it exists).
        vision_config: the vision tower's config (a JSON file, or a folder with ``config.json``); default
            ``src/vision_tower_config.json``. The original names its tower (``mm_image_tower``) but does not save
            its config, so one of the two is required.
        image_token_id: None appends an ``<image>`` row at the original vocabulary size (see the module doc); an id
            below the vocabulary size reuses that row (it must be one the tokenizer never produces).

    Returns:
        ``Path(dst)``. Raises :class:`ConversionError` for anything it cannot convert faithfully.
    """
    from .modeling_moe_llava import MoeLlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} is not an original MoE-LLaVA checkpoint folder (no config.json)")
    original = json.loads((src / "config.json").read_text())
    variant = _variant_of(_require(original, "model_type", f"{src / 'config.json'}"))
    if vision_config is None:
        vision_config = src / DEFAULT_VISION_CONFIG_NAME
        if not vision_config.is_file():
            raise ConversionError(
                f"no vision tower config: {src} has no {DEFAULT_VISION_CONFIG_NAME}; pass the config.json of "
                f"{original.get('mm_image_tower') or 'the vision tower'} with --vision-config PATH"
            )
    tower = load_vision_config(vision_config)  # CLIP or SigLIP

    original_sd = load_original_state_dict(src)
    embed = original_sd.get("model.embed_tokens.weight")
    if embed is None:
        raise ConversionError("the checkpoint lacks model.embed_tokens.weight")
    vocab_size = embed.shape[0]
    if original.get("vocab_size") not in (None, vocab_size):
        raise ConversionError(f"config vocab_size {original['vocab_size']} != embedding rows {vocab_size}")
    if image_token_id is not None and not 0 <= image_token_id <= vocab_size:
        raise ConversionError(f"image_token_id {image_token_id} is outside [0, {vocab_size}]")
    special = [original.get(name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")]
    special = {i for value in special for i in (value if isinstance(value, list) else [value]) if i is not None}
    if image_token_id is not None and image_token_id in special:
        raise ConversionError(f"image_token_id {image_token_id} is the pad, bos or eos token")
    append = image_token_id is None or image_token_id == vocab_size
    config = build_config(original, tower, vocab_size + append, vocab_size if append else image_token_id)
    config.dtype = embed.dtype

    with torch.device("meta"):
        model = MoeLlavaForConditionalGeneration(config)
    expected = model.state_dict()
    converted = convert_state_dict(
        original_sd,
        variant,
        config.text_config.num_hidden_layers,
        config.moe_layer_indices,
        num_experts=config.num_experts if config.moe_layer_indices else None,
        vision_prefix=_vision_prefix(list(expected)),
    )
    del original_sd
    # Tensors the original has no counterpart for, set to the value that computes what the original computes:
    # the router's selection bias (moe_zoo's aux-loss-free balancing) is zero, and the LM head bias that
    # transformers' Phi has is zero where the original built its head without one (MoE-LLaVA's Phi does).
    for key, tensor in expected.items():
        if key not in converted and key.endswith("mlp.gate.selection_bias"):
            converted[key] = torch.zeros(tensor.shape, dtype=torch.float32)
    if "lm_head.bias" in expected and "lm_head.bias" not in converted and "lm_head.weight" in converted:
        converted["lm_head.bias"] = converted["lm_head.weight"].new_zeros(vocab_size)
    if append:
        append_image_token_rows(converted)
    unexpected = [k for k in converted if k not in expected]
    missing = [k for k in expected if k not in converted]
    if unexpected or missing:
        raise ConversionError(
            "the converted tensors do not match MoeLlavaForConditionalGeneration: "
            + (f"not in the model: {_listing(unexpected)}; " if unexpected else "")
            + (f"never filled from the checkpoint: {_listing(missing)}" if missing else "")
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ConversionError(f"shape mismatch for {_listing(wrong)}")
    model.load_state_dict(converted, strict=True, assign=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        suppress_tokens=[config.image_token_id],  # image features replace it; it is never an output
    )
    with atomic_directory(dst) as folder:
        model.save_pretrained(folder)
    return dst


__all__ = [
    "ConversionError",
    "append_image_token_rows",
    "build_config",
    "build_text_config",
    "convert_moe_llava_original",
    "convert_state_dict",
    "load_original_state_dict",
    "load_vision_config",
]
