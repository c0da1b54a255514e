# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Convert checkpoints of the original Uni-MoE code (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs) into
``UniMoeForConditionalGeneration``, and the original's forward inputs into ours.

Two layouts of the language model's MoE are read (the rest is the same in both):

- **v1** (``Uni_MoE/Uni_MoE_speech``, ``model_type`` ``llava``): a ``MoeLayer`` in every decoder layer, router
  ``model.layers.{l}.mlp.gate.weight`` and experts ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``;
  top-k over the logits, then a softmax over the k selected (``router_type="topk_softmax"``), no aux loss.
- **8e** (``Uni_MoE/Uni_MoE_8e``, ``model_type`` ``llava_llama``): DeepSpeed ``MoE`` layers, router
  ``mlp.deepspeed_moe.gate.wg.weight`` and experts ``mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{proj}.weight``,
  each with an in-module loralib LoRA (``{proj}_lora_A.weight`` / ``{proj}_lora_B.weight``, scaling
  ``lora_alpha / lora_r``), merged here as ``W + s * B @ A`` (in float64, then cast back); softmax then top-k with
  the two weights renormalised (``router_type="softmax_topk"``) and DeepSpeed's GShard loss. Layers that are not MoE
  (``moe_type="sparse"``) are ``LlamaMLPLoRA``: the same merge into a dense FFN.

The rest: the CLIP tower ``model.vision_tower.vision_tower.vision_model.*`` -> ``model.vision_tower.*``; the
``mlp2x_gelu`` projector ``model.mm_projector.{0,2}.*`` -> ``model.multi_modal_projector.linear_{1,2}.*``; the
Whisper encoder ``model.audio_tower.audio_tower.*`` -> ``model.speech_encoder.*``; the speech aligner
``model.mm_audio_aligner.decoder.audio_decoder.*`` -> ``model.speech_connector.decoder.*``,
``model.mm_audio_aligner.projector.*`` -> ``model.speech_connector.projector.*`` and ``model.query_tokens`` ->
``model.speech_connector.query_tokens``; ``model.embed_tokens`` / ``model.norm`` / ``model.layers.{l}`` (attention
and norms) -> ``model.language_model.*``; ``lm_head.weight`` unchanged.

Dropped on purpose (the original's forward never reads them):

- ``model.audio_tower.encoder.*`` and ``model.audio_tower.decoder.*``: ``WhisperAudioTower`` *inherits*
  ``WhisperModel``, so its ``__init__`` builds a second, random Whisper next to the ``audio_tower`` it uses;
- ``model.mm_audio_aligner.decoder.audio_decoder.embed_tokens.weight``: the aligner's decoder reads the query tokens
  as ``inputs_embeds``, never token ids (ours is built with a one-row embedding, filled with zeros);
- ``model.layers.{l}.self_attn.rotary_emb.inv_freq``: a cache of transformers 4.31; it is checked to be the plain
  base-10000 frequencies that our config computes (the original ignores any ``rope_theta``);
- in the extra files of e2 checkpoints: PEFT's ``*.lora_A.*`` / ``*.lora_B.*`` / ``*.base_layer.*`` pieces that the
  original's ``load_state_dict(strict=False)`` ignores after ``merge_and_unload``.

Filled without a checkpoint tensor, with the value that computes the original's function: each router's
``selection_bias`` (zeros: the original has no aux-loss-free balancing) and the connector decoder's unused one-row
``embed_tokens`` (zeros). Every other original key must be placed and every target tensor filled, or the conversion
fails with a :class:`ConversionError` naming the keys; nothing is ever left at a random init.

Placeholders: the original splices features at the sentinels -200 (image), -300 (speech) and -400 (video) of
``input_ids``. Ours expands each to one placeholder token per feature vector (:func:`convert_original_inputs`); the
ids are ``image_token_id = vocab_size`` and video / speech / audio the next three, beyond the vocabulary (our model
never embeds placeholders and the LM head has no rows for them).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, GenerationConfig, LlamaConfig, PreTrainedConfig
from transformers import initialization as init

from ...atomic_io import atomic_directory
from ..conversion_utils import (
    ConversionError,
    find_state_dict_files,
    first_field,
    key_listing,
    load_vision_config,
    load_weight_file,
    require_field,
    vision_prefix,
)
from .configuration_uni_moe import UniMoeConfig

if TYPE_CHECKING:
    from .modeling_uni_moe import UniMoeForConditionalGeneration

LAYOUTS = ("v1", "8e")
"""The MoE layouts this converter reads (see the module docstring)."""

IMAGE_SENTINEL, SPEECH_SENTINEL, VIDEO_SENTINEL = -200, -300, -400
"""The original's ``IMAGE_TOKEN_INDEX``, ``AUDIO_TOKEN_INDEX`` (Whisper speech) and ``VIDEO_TOKEN_INDEX``."""
IGNORE_INDEX = -100

ROPE_BASE = 10000.0
"""The original's rotary base: its ``LlamaRotaryEmbedding`` is built with the default base, whatever the config."""

EXTRA_FILES = ("non_lora_trainables.bin", "mm_audio_aligner.bin", "mlp_gates.bin")
"""The extra weight files of the released e2 / 8e folders (``model/all_builder.py``)."""

EXPERT_BASE_FILES = (
    "mlp_audiocap",
    "mlp_basev",
    "mlp_base",
    "mlp_base1",
    "mlp_base4",
    "mlp_base7",
    "mlp_base",
    "mlp_base7",
)
"""``Uni-MoE-8e-Experts/<name>.bin`` that the 8e loader puts into expert ``g`` (entry ``g % 8``)."""

_DROPPED_PREFIXES = (
    "model.audio_tower.encoder.",
    "model.audio_tower.decoder.",
)
_DROPPED_KEYS = ("model.mm_audio_aligner.decoder.audio_decoder.embed_tokens.weight",)
_INV_FREQ = re.compile(r"^model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$")

_VISION_TOWER = "model.vision_tower.vision_tower.vision_model."
_SPEECH_ENCODER = "model.audio_tower.audio_tower."
_SPEECH_DECODER = "model.mm_audio_aligner.decoder.audio_decoder."
_SPEECH_PROJECTOR = "model.mm_audio_aligner.projector."
_PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = re.compile(
    r"^(self_attn\.[qkvo]_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight)$"
)
_PROJS = ("gate_proj", "up_proj", "down_proj")
_V1_ROUTER = "mlp.gate.weight"
_DS_ROUTER = "mlp.deepspeed_moe.gate.wg.weight"
_V1_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DS_EXPERT = re.compile(
    r"^mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)(_lora_A|_lora_B)?\.weight$"
)
_DENSE = re.compile(r"^mlp\.(gate_proj|up_proj|down_proj)(_lora_A|_lora_B)?\.weight$")
_PART = {None: "weight", "_lora_A": "A", "_lora_B": "B"}
_DS_EXPERT_KEY = "model.layers.{l}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}.weight"
_V1_EXPERT_KEY = "model.layers.{l}.mlp.experts.{e}.{p}.weight"


# --- state dict --------------------------------------------------------------------------------------------------


def _lora_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, name: str) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in float64 and cast back to ``W``'s dtype (one rounding, not three)."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise ConversionError(
            f"the LoRA of {name} does not fit its weight: W {tuple(weight.shape)}, A {tuple(a.shape)}, "
            f"B {tuple(b.shape)}; B @ A must have W's shape (A is (r, in), B is (out, r))"
        )
    merged = weight.double() + scaling * (b.double() @ a.double())
    return merged.to(weight.dtype)


def expected_state_dict(config: UniMoeConfig) -> dict[str, torch.Tensor]:
    """The state dict (names, shapes, dtypes) of ``UniMoeForConditionalGeneration(config)``, built on the meta
    device: no memory, no init."""
    from .modeling_uni_moe import UniMoeForConditionalGeneration

    with torch.device("meta"):
        model = UniMoeForConditionalGeneration(config)
    return model.state_dict()


def _rope_inv_freq(config: UniMoeConfig) -> torch.Tensor:
    text = config.text_config
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def convert_state_dict(
    original_state_dict: Mapping[str, torch.Tensor],
    config: UniMoeConfig,
    lora_scaling: float | None = None,
) -> dict[str, torch.Tensor]:
    """Rename, merge and stack an original Uni-MoE state dict (v1 or 8e layout, see the module docstring) into the
    state dict of ``UniMoeForConditionalGeneration(config)``.

    Args:
        original_state_dict: the original ``model.state_dict()`` (towers loaded), in the original key names; for a
            split e2 folder, what :func:`load_original_checkpoint` assembles.
        config: the converted model's config (:func:`build_config`); it says which layers are MoE, how many experts
            they hold and which encoders exist.
        lora_scaling: ``lora_alpha / lora_r`` of an 8e checkpoint, whose every expert (and dense FFN) carries
            ``{proj}_lora_A`` / ``{proj}_lora_B`` (:func:`lora_scaling_from_config` reads it from the original
            config);
            None for checkpoints without in-module LoRA (v1, or 8e with ``lora_r=0``).

    Returns:
        Every tensor of the target model, keyed by its name: expert banks stacked in expert order as
        ``gate_up_proj[e] = cat([gate_proj_e, up_proj_e])`` ``(E, 2I, H)`` and ``down_proj[e]`` ``(E, H, I)``.

    Raises:
        ConversionError: listing the original keys it cannot place, the original keys that are missing for a
            target tensor (and which target), and any target tensor left unfilled or of the wrong shape.
    """
    expected = expected_state_dict(config)
    moe_layers = set(config.moe_layer_indices)
    num_layers = config.text_config.num_hidden_layers
    vision = vision_prefix(list(expected)) if config.vision_config is not None else None
    speech = config.speech_config is not None
    out: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    routers: dict[int, dict[str, torch.Tensor]] = {}
    ffn: dict[int, dict[tuple[int | None, str], dict[str, torch.Tensor]]] = {}
    layouts: dict[int, set[str]] = {}
    inv_freq: dict[str, torch.Tensor] = {}

    for key, tensor in original_state_dict.items():
        if key == "lm_head.weight":
            out[key] = tensor
        elif key in ("model.embed_tokens.weight", "model.norm.weight"):
            out["model.language_model." + key.removeprefix("model.")] = tensor
        elif key.startswith(_DROPPED_PREFIXES) or key in _DROPPED_KEYS:
            continue
        elif _INV_FREQ.match(key):
            inv_freq[key] = tensor
        elif vision is not None and key.startswith(_VISION_TOWER):
            out[vision + key.removeprefix(_VISION_TOWER)] = tensor
        elif vision is not None and key.startswith(tuple(_PROJECTOR)):
            prefix = next(p for p in _PROJECTOR if key.startswith(p))
            out["model.multi_modal_projector." + _PROJECTOR[prefix] + key.removeprefix(prefix)] = tensor
        elif speech and key.startswith(_SPEECH_ENCODER):
            out["model.speech_encoder." + key.removeprefix(_SPEECH_ENCODER)] = tensor
        elif speech and key.startswith(_SPEECH_DECODER):
            out["model.speech_connector.decoder." + key.removeprefix(_SPEECH_DECODER)] = tensor
        elif speech and key.startswith(_SPEECH_PROJECTOR):
            out["model.speech_connector.projector." + key.removeprefix(_SPEECH_PROJECTOR)] = tensor
        elif speech and key == "model.query_tokens":
            out["model.speech_connector.query_tokens"] = tensor
        elif (match := _LAYER.match(key)) and int(match.group(1)) < num_layers:
            layer, rest = int(match.group(1)), match.group(2)
            if _LAYER_PARTS.match(rest):
                out[f"model.language_model.layers.{layer}.{rest}"] = tensor
            elif layer in moe_layers and rest in (_V1_ROUTER, _DS_ROUTER):
                routers.setdefault(layer, {})[rest] = tensor
                layouts.setdefault(layer, set()).add("v1" if rest == _V1_ROUTER else "8e")
            elif layer in moe_layers and (expert := _V1_EXPERT.match(rest) or _DS_EXPERT.match(rest)):
                index = int(expert.group(1))
                lora = expert.group(3) if expert.re is _DS_EXPERT else None
                if index >= config.num_experts or (lora is not None and lora_scaling is None):
                    unplaced.append(key)
                    continue
                ffn.setdefault(layer, {}).setdefault((index, expert.group(2)), {})[_PART[lora]] = tensor
                layouts.setdefault(layer, set()).add("v1" if expert.re is _V1_EXPERT else "8e")
            elif layer not in moe_layers and (dense := _DENSE.match(rest)):
                if dense.group(2) is not None and lora_scaling is None:
                    unplaced.append(key)
                    continue
                ffn.setdefault(layer, {}).setdefault((None, dense.group(1)), {})[_PART[dense.group(2)]] = tensor
            else:
                unplaced.append(key)
        else:
            unplaced.append(key)
    if unplaced:
        has_lora = any("_lora_" in k for k in unplaced)
        hint = (
            " (in-module LoRA keys need lora_scaling = lora_alpha / lora_r of the original config)"
            if has_lora and lora_scaling is None
            else ""
        )
        raise ConversionError(
            f"cannot place {key_listing(unplaced)}{hint}; the converter knows no target for them in a Uni-MoE with "
            f"{num_layers} layers, MoE layers {sorted(moe_layers)}, {config.num_experts} experts, "
            f"vision tower {'yes' if vision else 'no'}, speech encoder {'yes' if speech else 'no'}, so it refuses "
            "rather than drop them"
        )
    mixed = sorted(layer for layer, kinds in layouts.items() if len(kinds) > 1)
    if mixed:
        raise ConversionError(f"layers {mixed} mix v1 keys (mlp.gate / mlp.experts) with 8e keys (mlp.deepspeed_moe)")

    _check_inv_freq(inv_freq, config)
    default_layout = "8e" if any("8e" in kinds for kinds in layouts.values()) or lora_scaling is not None else "v1"
    missing: list[str] = []
    for layer in range(num_layers):
        target = f"model.language_model.layers.{layer}.mlp."
        parts = ffn.get(layer, {})
        if layer in moe_layers:
            layout = next(iter(layouts.get(layer, {default_layout})))
            router = _V1_ROUTER if layout == "v1" else _DS_ROUTER
            if router in routers.get(layer, {}):
                out[target + "gate.weight"] = routers[layer][router]
            else:
                missing.append(f"model.layers.{layer}.{router} (for {target}gate.weight)")
            pattern = _V1_EXPERT_KEY if layout == "v1" else _DS_EXPERT_KEY
            keys = {(e, p): pattern.format(l=layer, e=e, p=p) for e in range(config.num_experts) for p in _PROJS}
            lora = lora_scaling if layout == "8e" else None
            weights, lacking = _merged_projections(parts, keys, lora)
            if lacking:
                missing += [f"{k} (for {target}experts.*)" for k, _ in lacking]
                continue
            bank = [[weights[(e, p)] for p in _PROJS] for e in range(config.num_experts)]
            out[target + "experts.gate_up_proj"] = torch.stack([torch.cat([g, u], dim=0) for g, u, _ in bank])
            out[target + "experts.down_proj"] = torch.stack([d for _, _, d in bank])
        else:
            keys = {(None, p): f"model.layers.{layer}.mlp.{p}.weight" for p in _PROJS}
            weights, lacking = _merged_projections(parts, keys, lora_scaling)
            missing += [f"{k} (for {target}{p}.weight)" for k, (_, p) in lacking]
            for (_, p), tensor in weights.items():
                out[f"{target}{p}.weight"] = tensor
    if missing:
        raise ConversionError(f"the checkpoint lacks {key_listing(missing)}")

    # Tensors the original has no counterpart for, set to what computes the original's function.
    for key, tensor in expected.items():
        if key not in out and key.endswith("mlp.gate.selection_bias"):
            out[key] = torch.zeros(tensor.shape, dtype=torch.float32)
    connector_embed = "model.speech_connector.decoder.embed_tokens.weight"
    if connector_embed in expected and connector_embed not in out:
        dtype = out.get("model.speech_connector.query_tokens", expected[connector_embed]).dtype
        out[connector_embed] = torch.zeros(expected[connector_embed].shape, dtype=dtype)
    _check_against(out, expected)
    return out


def _merged_projections(
    parts: Mapping[tuple[int | None, str], Mapping[str, torch.Tensor]],
    keys: Mapping[tuple[int | None, str], str],
    lora_scaling: float | None,
) -> tuple[dict[tuple[int | None, str], torch.Tensor], list[tuple[str, tuple[int | None, str]]]]:
    """Each wanted projection's weight (LoRA merged when ``lora_scaling`` is set), and the original keys lacking
    with the ``(expert, projection)`` slot they were needed for."""
    weights, lacking = {}, []
    for slot, key in keys.items():
        found = parts.get(slot, {})
        needed = {"weight": key}
        if lora_scaling is not None:
            stem = key.removesuffix(".weight")
            needed |= {"A": f"{stem}_lora_A.weight", "B": f"{stem}_lora_B.weight"}
        absent = [name for part, name in needed.items() if part not in found]
        if absent:
            lacking += [(name, slot) for name in absent]
            continue
        weight = found["weight"]
        if lora_scaling is not None:
            weight = _lora_merged(weight, found["A"], found["B"], lora_scaling, key)
        weights[slot] = weight
    return weights, lacking


def _check_inv_freq(inv_freq: Mapping[str, torch.Tensor], config: UniMoeConfig) -> None:
    """The stored rotary caches must be the frequencies our config computes (base 10000, the head size)."""
    if not inv_freq:
        return
    reference = _rope_inv_freq(config)
    for key, tensor in inv_freq.items():
        rtol = 1e-6 if tensor.dtype in (torch.float32, torch.float64) else 1e-2
        if tensor.shape != reference.shape or not torch.allclose(tensor.float(), reference, rtol=rtol, atol=0.0):
            raise ConversionError(
                f"{key} is not the rotary frequencies 1/10000^(2i/{2 * reference.numel()}) of a head of "
                f"{2 * reference.numel()} dims; the checkpoint's attention is not the plain LLaMA RoPE this converter "
                "maps (the original always uses base 10000)"
            )


def _check_against(out: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    unexpected = [k for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    if unexpected or missing:
        raise ConversionError(
            "the converted tensors do not match UniMoeForConditionalGeneration: "
            + (f"not in the model: {key_listing(unexpected)}; " if unexpected else "")
            + (f"never filled from the checkpoint: {key_listing(missing)}" if missing else "")
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in out.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise ConversionError(f"shape mismatch (converted != model) for {key_listing(wrong)}")


# --- split checkpoints (e2 / 8e folders) -------------------------------------------------------------------------


def strip_peft_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names as the original model has them: PEFT's ``base_model.model.`` prefix removed, and a doubled
    ``model.model.`` made ``model.`` (the two rules the original applies to its extra files)."""
    out = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith("model.model."):
            key = key.removeprefix("model.")
        out[key] = tensor
    return out


_PEFT_PIECE = re.compile(r"\.(lora_[AB]|base_layer|lora_dropout|lora_embedding_[AB]|lora_magnitude_vector)(\.|$)")


def _overlay(state_dict: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Put the tensors of one extra file over ``state_dict``; returns the keys it set. PEFT pieces inside it are
    left out: the original loads these files with ``strict=False`` after ``merge_and_unload``, which ignores them."""
    extra = strip_peft_prefix(load_weight_file(path))
    kept = {k: v for k, v in extra.items() if not _PEFT_PIECE.search(k)}
    state_dict.update(kept)
    return list(kept)


_EXPERT_FILE_KEY = re.compile(r"^model\.layers\.(\d+)\.(?:.+\.)?([A-Za-z_]+)\.weight$")


def load_expert_file(path: str | os.PathLike, expert: int) -> dict[str, torch.Tensor]:
    """An 8e expert file (``{g}_mlp_experts.bin`` of e2 folders, or a ``Uni-MoE-8e-Experts/<name>.bin``) as keys of
    expert ``expert``: the original keeps the layer index and the projection name
    (``model.layers.{l}.<...>.{gate_proj|gate_proj_lora_A|...}.weight``) and drops the rest of the path."""
    out = {}
    for key, tensor in strip_peft_prefix(load_weight_file(path)).items():
        match = _EXPERT_FILE_KEY.match(key)
        name = match.group(2) if match else None
        if name is None or name.removesuffix("_lora_A").removesuffix("_lora_B") not in _PROJS:
            raise ConversionError(
                f"{path}: key {key!r} is not an expert projection (model.layers.<l>...<gate|up|down>_proj"
                "[_lora_A|_lora_B].weight)"
            )
        out[_DS_EXPERT_KEY.format(l=match.group(1), e=expert, p=name)] = tensor
    return out


def lora_scaling_of(peft_config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's LoRA scaling of ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with ``rank_pattern`` /
    ``alpha_pattern`` overrides matched as PEFT does (the pattern as the end of the module path)."""

    def pattern_value(patterns: Mapping[str, Any], default: Any) -> Any:
        for pattern, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    r = pattern_value(peft_config.get("rank_pattern"), peft_config.get("r"))
    alpha = pattern_value(peft_config.get("alpha_pattern"), peft_config.get("lora_alpha"))
    if r is None or alpha is None:
        raise ConversionError("adapter_config.json lacks 'r' or 'lora_alpha'")
    if r != rank:
        raise ConversionError(f"the LoRA of {module} has rank {rank}, but adapter_config.json says r={r}")
    return alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r


_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def merge_peft_adapter(state_dict: dict[str, torch.Tensor], adapter_dir: str | os.PathLike) -> list[str]:
    """Merge a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) into the
    weights it targets, ``W += scaling * B @ A`` in float64 (what ``merge_and_unload`` computes). Returns the merged
    weight keys.

    The targets are read from the adapter's tensors (``base_model.model.<module>.lora_{A,B}.weight``) and must be
    weights of ``state_dict``; refused: DoRA, embedding LoRA, ``fan_in_fan_out``, and tensors other than LoRA A/B.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ConversionError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    peft_config = json.loads(config_path.read_text())
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{config_path}: peft_type {peft_config['peft_type']!r}; only LoRA adapters merge")
    if peft_config.get("use_dora"):
        raise ConversionError(f"{config_path}: DoRA adapters are not supported (use_dora=true)")
    for name in ("target_parameters", "layer_replication", "modules_to_save"):
        if peft_config.get(name):
            raise ConversionError(f"{config_path}: {name}={peft_config[name]!r} is not supported (plain LoRA only)")
    if peft_config.get("fan_in_fan_out"):
        raise ConversionError(f"{config_path}: fan_in_fan_out=true is for Conv1D layers; LLaMA's are nn.Linear")
    weights = next(
        (adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / n).is_file()),
        None,
    )
    if weights is None:
        raise ConversionError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors/.bin")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in load_weight_file(weights).items():
        match = _PEFT_KEY.match(key.removeprefix("base_model.model."))
        if match:
            pairs.setdefault(match.group("module"), {})[match.group("ab")] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{weights}: cannot merge {key_listing(unknown)} (only LoRA A/B matrices of nn.Linear layers merge; "
            "embedding LoRA, DoRA magnitudes and modules_to_save are not supported)"
        )
    problems = [f"{m}.lora_{'B' if 'A' in p else 'A'}.weight (missing)" for m, p in pairs.items() if len(p) != 2]
    problems += [f"{m}.weight (no such weight to merge into)" for m in pairs if f"{m}.weight" not in state_dict]
    if problems:
        raise ConversionError(f"{weights}: {key_listing(problems)}")
    merged = []
    for module, pair in sorted(pairs.items()):
        key = f"{module}.weight"
        scaling = lora_scaling_of(peft_config, module, pair["A"].shape[0])
        state_dict[key] = _lora_merged(state_dict[key], pair["A"], pair["B"], scaling, key)
        merged.append(key)
    return merged


def load_original_checkpoint(
    src_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    experts_dir: str | os.PathLike | None = None,
    num_experts: int | None = None,
) -> dict[str, torch.Tensor]:
    """The original model's state dict from a checkpoint folder, whole or split as the released e2 / 8e folders are.

    Assembled in the original loader's order (``model/all_builder.py``), later pieces replacing earlier ones:

    1. the full weights: ``base_dir`` (the original's ``model_base``) if given, then ``src_dir``'s own
       ``model.safetensors`` / ``pytorch_model*.bin`` (+ index) if it has them (one of the two must);
    2. 8e experts, for every expert ``g < num_experts``: ``src_dir/{g}_mlp_experts.bin`` where present, then
       ``experts_dir/<EXPERT_BASE_FILES[g]>.bin`` when ``experts_dir`` is given (as in the original's
       ``load_all_pretrained_model_dp``, the base file's tensors win where both hold one);
    3. ``non_lora_trainables.bin``; 4. the PEFT LoRA adapter merged (``adapter_dir``, default ``src_dir`` when it
       holds ``adapter_config.json``); 5. ``mm_audio_aligner.bin``; 6. ``mlp_gates.bin``.

    The extra files' keys lose PEFT's ``base_model.model.`` prefix (:func:`strip_peft_prefix`). The 8e loader
    reads ``mlp_gates.bin`` before merging the adapter, v1's after; that order matters only for an adapter that
    targets what a later file replaces, which is refused as ambiguous.
    """
    src_dir = Path(src_dir)
    state_dict: dict[str, torch.Tensor] = {}
    sources = [Path(base_dir)] if base_dir is not None else []
    sources.append(src_dir)
    found = False
    for folder in sources:
        files = find_state_dict_files(folder)
        if files is None:
            if folder != src_dir:
                raise ConversionError(f"base_dir {folder} holds no model.safetensors or pytorch_model.bin")
            continue
        found = True
        for path in files:
            state_dict.update(load_weight_file(path))
    if not found:
        raise ConversionError(
            f"{src_dir} holds no model.safetensors or pytorch_model.bin (nor a sharded index of either); for a split "
            "e2 folder pass base_dir, the full base checkpoint the original loads first (its `model_base`)"
        )
    count = num_experts if num_experts is not None else len(EXPERT_BASE_FILES)
    for expert in range(count):
        trained = src_dir / f"{expert}_mlp_experts.bin"
        if trained.is_file():
            state_dict.update(load_expert_file(trained, expert))
        if experts_dir is not None:  # the 8e loader updates the trained file's dict with the base file's
            base = Path(experts_dir) / f"{EXPERT_BASE_FILES[expert % len(EXPERT_BASE_FILES)]}.bin"
            if not base.is_file():
                raise ConversionError(f"experts_dir {experts_dir} lacks {base.name} (the base of expert {expert})")
            state_dict.update(load_expert_file(base, expert))
    non_lora, aligner, gates = (src_dir / name for name in EXTRA_FILES)
    if non_lora.is_file():
        _overlay(state_dict, non_lora)
    if adapter_dir is None and (src_dir / "adapter_config.json").is_file():
        adapter_dir = src_dir
    merged = merge_peft_adapter(state_dict, adapter_dir) if adapter_dir is not None else []
    replaced = []
    for path in (aligner, gates):
        if path.is_file():
            replaced += _overlay(state_dict, path)
    overwritten = sorted(set(merged) & set(replaced))
    if overwritten:
        raise ConversionError(
            f"the LoRA adapter targets {key_listing(overwritten)}, which mm_audio_aligner.bin / mlp_gates.bin then "
            "replace; the merged adapter would be lost, so the conversion refuses this ambiguous checkpoint"
        )
    return state_dict


# --- configs -----------------------------------------------------------------------------------------------------


def original_layout(original_config: Mapping[str, Any]) -> str:
    """``"8e"`` for the DeepSpeed-MoE variant (``model_type`` ``llava_llama``, or its ``moe_type`` / ``ep_size`` /
    ``lora_r`` fields), else ``"v1"``."""
    if original_config.get("model_type") == "llava_llama":
        return "8e"
    return "8e" if any(name in original_config for name in ("moe_type", "ep_size", "lora_r")) else "v1"


def lora_scaling_from_config(original_config: Mapping[str, Any]) -> float | None:
    """``lora_alpha / lora_r`` of an 8e checkpoint's in-module LoRA, or None (v1, or ``lora_r`` 0: no LoRA)."""
    if original_layout(original_config) != "8e":
        return None
    r = require_field(original_config, "lora_r", "the 8e config.json")
    if r == 0:
        return None
    return require_field(original_config, "lora_alpha", "the 8e config.json") / r


def _tower_path(
    explicit: str | os.PathLike | None, encoders_dir: str | os.PathLike | None, tower: str, what: str
) -> Path:
    """Where the config of the tower named ``tower`` lies: ``explicit``, else ``encoders_dir/<tower>`` or
    ``encoders_dir/<last part of tower>`` (so a Hub name and a ``/path/to/...`` name both resolve locally)."""
    if explicit is not None:
        return Path(explicit)
    name = PurePosixPath(tower.rstrip("/")).name
    if encoders_dir is None:
        raise ConversionError(
            f"the original config names the {what} tower {tower!r}, whose config is not in the checkpoint: pass "
            f"encoders_dir (a folder holding {name}/config.json) or the {what} config path"
        )
    encoders_dir = Path(encoders_dir)
    candidates = [encoders_dir / name]
    if not PurePosixPath(tower).is_absolute():
        candidates.insert(0, encoders_dir / tower)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c / "config.json") for c in candidates)
    raise ConversionError(f"no config of the {what} tower {tower!r}: tried {tried}; pass its config path instead")


def _load_whisper_config(path: str | os.PathLike) -> PreTrainedConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConversionError(f"speech config {path} does not exist")
    fields = json.loads(path.read_text())
    if fields.get("model_type") != "whisper":
        raise ConversionError(
            f"speech config {path} has model_type {fields.get('model_type')!r}, but Uni-MoE's speech tower is Whisper "
            "('whisper'); Uni-MoE-audio's BEATs + Q-Former checkpoints are not supported by this converter"
        )
    for name in ("model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        fields.pop(name, None)
    return AutoConfig.for_model("whisper", **fields)


def build_text_config(original_config: Mapping[str, Any]) -> LlamaConfig:
    """The LLaMA config from the original's flat fields, with the original's fixed rotary base 10000."""
    where = "config.json"
    if original_config.get("tie_word_embeddings"):
        raise ConversionError("tie_word_embeddings=true is not supported (Uni-MoE's Vicuna has its own LM head)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": ROPE_BASE}
    scaling = original_config.get("rope_scaling")
    if scaling:
        if scaling.get("type") != "linear":
            raise ConversionError(
                f"rope_scaling {scaling!r} is not supported; only {{'type': 'linear', 'factor': f}} maps exactly "
                "(transformers 4.31's dynamic NTK caches differ from today's)"
            )
        rope = {"rope_type": "linear", "rope_theta": ROPE_BASE, "factor": float(scaling["factor"])}
    heads = require_field(original_config, "num_attention_heads", where)
    return LlamaConfig(
        vocab_size=require_field(original_config, "vocab_size", where),
        hidden_size=require_field(original_config, "hidden_size", where),
        intermediate_size=require_field(original_config, "intermediate_size", where),
        num_hidden_layers=require_field(original_config, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=original_config.get("num_key_value_heads") or heads,
        hidden_act=original_config.get("hidden_act", "silu"),
        max_position_embeddings=original_config.get("max_position_embeddings", 2048),
        initializer_range=original_config.get("initializer_range", 0.02),
        rms_norm_eps=original_config.get("rms_norm_eps", 1e-6),
        bos_token_id=original_config.get("bos_token_id", 1),
        eos_token_id=original_config.get("eos_token_id", 2),
        pad_token_id=original_config.get("pad_token_id", 0),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_parameters=rope,
    )


def _moe_fields(original_config: Mapping[str, Any], layout: str, second_expert_gumbel: bool) -> dict[str, Any]:
    where = f"the {layout} config.json"
    num_layers = original_config["num_hidden_layers"]
    if original_config.get("moe") is None:  # the original tests `config.moe is not None`, so `false` is MoE too
        return {"moe_layers": "none", "router_aux_loss_coef": 0.0}
    experts = int(require_field(original_config, "num_experts", where))
    top_k = int(require_field(original_config, "num_experts_per_tok", where))
    if layout == "v1":
        return {
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "moe_layers": "all",
            "router_type": "topk_softmax",
            "norm_topk_prob": True,
            "router_aux_loss_coef": 0.0,  # v1's MoeLayer returns no aux loss
        }
    if original_config.get("use_fm_block"):
        raise ConversionError("use_fm_block=true (the 8e 'fm' adapter block) is not supported")
    if top_k not in (1, 2):
        raise ConversionError(f"num_experts_per_tok={top_k}; DeepSpeed's gate (and this conversion) supports 1 or 2")
    moe_type = require_field(original_config, "moe_type", where)
    if moe_type == "dense":
        layers: str | list[int] = "all"
    elif moe_type == "sparse":
        stride = int(require_field(original_config, "moe_stride", where))
        if stride < 1:
            raise ConversionError(f"moe_stride={stride}; it must be a positive integer")
        layers = [i for i in range(num_layers) if i % stride == 0]  # modeling_llama_dp.py: layer_num % moe_stride == 0
    else:
        layers = "none"  # the original builds LlamaMLPLoRA in every layer for any other moe_type

    def coefficient(flag: str) -> float:
        """``<flag>_coef`` when the original adds the loss (``<flag>`` true), else 0."""
        return float(require_field(original_config, f"{flag}_coef", where)) if original_config.get(flag) else 0.0

    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_layers": layers,
        "router_type": "softmax_topk",
        # DeepSpeed's top-2 gate renormalises the two weights; its top-1 gate keeps the softmax probability.
        "norm_topk_prob": top_k == 2,
        "router_second_expert_gumbel": bool(second_expert_gumbel and top_k == 2),
        "aux_loss_type": "gshard_top1_sum",
        "router_aux_loss_coef": coefficient("aux_balance_loss"),
        "modality_l1_loss_coef": coefficient("aux_multimodal_loss"),
        "modality_kl_loss_coef": coefficient("aux_kl_loss"),
        "image_expert_indices": original_config.get("image_expert_indices"),
        "video_expert_indices": original_config.get("video_expert_indices"),
        "audio_expert_indices": original_config.get("audio_expert_indices"),
    }


def build_config(
    original_config: Mapping[str, Any],
    encoders_dir: str | os.PathLike | None = None,
    vision_config: str | os.PathLike | None = None,
    speech_config: str | os.PathLike | None = None,
    layout: str | None = None,
    second_expert_gumbel: bool = False,
) -> UniMoeConfig:
    """``UniMoeConfig`` for an original Uni-MoE ``config.json`` (as a dict).

    Args:
        original_config: the original config's fields.
        encoders_dir: a folder holding the towers' configs under their names (``clip-vit-large-patch14-336/``,
            ``whisper-small/``; or the full Hub name, ``openai/...``). The original config's tower paths only give
            the folder's name, so hard-coded ``/path/to/...`` values do not matter.
        vision_config, speech_config: explicit config paths (a JSON file or a folder with ``config.json``) instead;
            a full ``CLIPConfig`` or a ``CLIPVisionConfig``, and a ``WhisperConfig``.
        layout: ``"v1"`` or ``"8e"``; None detects it (:func:`original_layout`).
        second_expert_gumbel: 8e only: DeepSpeed's Gumbel-sampled second expert (``top2_2nd_expert_sampling``,
            on in the original, at eval too, so its eval is random). Off by default: the plain second choice.

    Media fields: ``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature`` ``patch`` /
    ``cls_patch`` -> ``default`` / ``full``; ``query_tokens_size`` -> ``speech_query_tokens``; the projector must be
    ``mlp2x_gelu`` and the audio projector ``linear`` (our model's); ``mm_audio_select_layer`` must be 0 (the
    encoder's ``last_hidden_state``, the only value the original's indexing of the output supports). The placeholder
    ids lie past the vocabulary: image ``vocab_size``, video +1, speech +2, audio +3.

    MoE fields: v1: ``topk_softmax``, no aux loss. 8e: ``softmax_topk`` (renormalised top-2), the GShard loss with
    ``aux_balance_loss_coef`` when ``aux_balance_loss``, MoE layers from ``moe_type`` (``dense``: all; ``sparse``:
    layers with ``index % moe_stride == 0``), the modality losses from ``aux_multimodal_loss(_coef)`` /
    ``aux_kl_loss(_coef)`` and ``*_expert_indices``. ``ep_size`` (expert parallelism) and ``capacity_factor``
    (DeepSpeed runs with ``drop_tokens=False``) do not change the function and are not carried over.
    """
    layout = layout or original_layout(original_config)
    if layout not in LAYOUTS:
        raise ConversionError(f"layout {layout!r} is not one of {LAYOUTS}")
    text_config = build_text_config(original_config)
    vocab_size = text_config.vocab_size
    fields: dict[str, Any] = {}

    vision_tower = first_field(original_config, ("mm_vision_tower", "vision_tower"))
    tower_config = None
    if vision_tower is not None or vision_config is not None:
        path = _tower_path(vision_config, encoders_dir, str(vision_tower), "vision")
        tower_config = load_vision_config(path, allowed=("clip_vision_model",))
        projector = original_config.get("mm_projector_type", "linear")
        if projector != "mlp2x_gelu":
            raise ConversionError(
                f"mm_projector_type {projector!r} is not supported: UniMoeForConditionalGeneration's image projector "
                "is 'mlp2x_gelu' (Linear, GELU, Linear)"
            )
        if original_config.get("mm_hidden_size") not in (None, tower_config.hidden_size):
            raise ConversionError(
                f"mm_hidden_size {original_config['mm_hidden_size']} differs from the vision config's hidden_size "
                f"{tower_config.hidden_size} ({path}): wrong vision config?"
            )
        select = original_config.get("mm_vision_select_feature", "patch")
        strategies = {"patch": "default", "cls_patch": "full"}
        if select not in strategies:
            raise ConversionError(f"mm_vision_select_feature {select!r} is not supported ('patch' or 'cls_patch')")
        layer = int(require_field(original_config, "mm_vision_select_layer", "config.json"))
        if not -(tower_config.num_hidden_layers + 1) <= layer <= tower_config.num_hidden_layers:
            raise ConversionError(
                f"mm_vision_select_layer {layer} is outside the {tower_config.num_hidden_layers + 1} hidden states "
                "of the vision tower"
            )
        fields |= {"vision_feature_layer": layer, "vision_feature_select_strategy": strategies[select]}

    audio_tower = first_field(original_config, ("mm_audio_tower", "audio_tower"))
    whisper = None
    if audio_tower is not None or speech_config is not None:
        whisper = _load_whisper_config(_tower_path(speech_config, encoders_dir, str(audio_tower), "speech"))
        projector = original_config.get("audio_projector_type", "linear")
        if projector != "linear":
            raise ConversionError(
                f"audio_projector_type {projector!r} is not supported: the speech connector's projector is 'linear'"
            )
        if original_config.get("mm_audio_hidden_size") not in (None, whisper.d_model):
            raise ConversionError(
                f"mm_audio_hidden_size {original_config['mm_audio_hidden_size']} differs from the Whisper config's "
                f"d_model {whisper.d_model}: wrong speech config?"
            )
        select = original_config.get("mm_audio_select_layer", 0)
        if select != 0:
            raise ConversionError(
                f"mm_audio_select_layer {select} is not supported: the original indexes the encoder's output with it, "
                "and only 0 (last_hidden_state) gives features"
            )
        fields["speech_query_tokens"] = int(require_field(original_config, "query_tokens_size", "config.json"))

    config = UniMoeConfig(
        text_config=text_config,
        vision_config=tower_config,
        speech_config=whisper,
        image_token_id=vocab_size,
        video_token_id=vocab_size + 1,
        speech_token_id=vocab_size + 2,
        audio_token_id=vocab_size + 3,
        projector_hidden_act="gelu",  # nn.GELU(): the exact erf form
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        **fields,
        **_moe_fields(original_config, layout, second_expert_gumbel),
    )
    return config


# --- inputs ------------------------------------------------------------------------------------------------------


def _image_tokens(config: UniMoeConfig) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def _speech_segments(features_mask: torch.Tensor, num_chunks: int) -> list[list[int]]:
    """The original's audio segments of one row: runs of equal ids >= 1, up to the first id < 1; chunk indices."""
    segments: list[list[int]] = []
    ids = features_mask.tolist()
    if len(ids) > num_chunks:
        raise ConversionError(f"features_mask has {len(ids)} entries per row, but input_features only {num_chunks}")
    for index, value in enumerate(ids):
        if value < 1:
            break
        if segments and ids[index - 1] == value:
            segments[-1].append(index)
        else:
            segments.append([index])
    return segments


PASSTHROUGH_INPUTS = ("use_cache", "return_dict", "output_hidden_states", "output_attentions")


def convert_original_inputs(inputs: Mapping[str, Any], config: UniMoeConfig) -> dict[str, Any]:
    """The original's forward keyword arguments as ours: each sentinel expanded to its features' placeholder tokens.

    Reads ``input_ids`` (with -200 image / -300 speech / -400 video sentinels), ``attention_mask`` (or None),
    ``images`` + ``image_mask``, ``videos`` + ``video_mask``, ``input_features [B, chunks, mel, frames]`` +
    ``features_mask [B, chunks]``, ``labels``, and passes :data:`PASSTHROUGH_INPUTS` on. The features are consumed
    as the original consumes them (``prepare_inputs_labels_for_audio_and_vision``):

    - images ``[B, 3, H, W]``: the rows whose ``image_mask`` is True, in batch order **across rows** (the k-th -200
      of the whole batch gets the k-th such image); a 5-D / list ``images`` gives each element's images flattened
      into one block (``image_mask`` unused, as there); each image is one token per patch (+ CLS for ``full``);
    - videos ``[B, frames, 3, H, W]``: the rows whose ``video_mask`` is True, across rows; one frame's patch count;
    - speech: in each row, consecutive chunks with the same ``features_mask`` id >= 1 form a segment (the first id
      < 1 ends the row), and the k-th -300 of **that row** gets its k-th segment, ``chunks x speech_query_tokens``
      tokens.

    Returns ``input_ids`` and ``attention_mask`` (each sentinel's value repeated over its tokens; all ones when it
    was None; rows that grew differently are right-padded with the pad id and mask 0), ``labels`` with
    ``IGNORE_INDEX`` over the features, ``pixel_values`` ``(images, 3, H, W)``, ``pixel_values_videos``
    ``(videos, frames, 3, H, W)`` and ``input_features`` ``(chunks, mel, frames)`` in consumption order (each only
    when it holds at least one item: the original's dummy media of text-only calls give none).

    For right padding (the original's collator) the mask equals the original's ``[1] * growth + attention_mask``;
    with left padding the original's mask is shifted, and ours is the per-position one. Raises
    :class:`ConversionError` when sentinels and features disagree in number.
    """
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids")
    attention_mask = inputs.pop("attention_mask", None)
    labels = inputs.pop("labels", None)
    images, image_mask = inputs.pop("images", None), inputs.pop("image_mask", None)
    videos, video_mask = inputs.pop("videos", None), inputs.pop("video_mask", None)
    features, features_mask = inputs.pop("input_features", None), inputs.pop("features_mask", None)
    for name in ("position_ids", "past_key_values", "inputs_embeds"):
        if inputs.pop(name, None) is not None:
            raise ConversionError(f"{name} cannot be converted (the original recomputes it after the splice)")
    passthrough = {name: inputs.pop(name) for name in PASSTHROUGH_INPUTS if name in inputs}
    if inputs:
        raise ConversionError(f"unknown original inputs: {sorted(inputs)}")
    if input_ids.dim() != 2:
        raise ConversionError(f"input_ids has shape {tuple(input_ids.shape)}; it must be (batch, length)")

    out: dict[str, Any] = {}
    pixel_values, image_blocks = _image_inputs(images, image_mask, config)
    pixel_values_videos, video_blocks = _video_inputs(videos, video_mask, config)
    input_features, speech_blocks = _speech_inputs(features, features_mask, input_ids, config)
    for name, value in (
        ("pixel_values", pixel_values),
        ("pixel_values_videos", pixel_values_videos),
        ("input_features", input_features),
    ):
        if value is not None:
            out[name] = value
    for sentinel, blocks, what in ((IMAGE_SENTINEL, image_blocks, "images"), (VIDEO_SENTINEL, video_blocks, "videos")):
        count = int((input_ids == sentinel).sum())
        if count != len(blocks):
            raise ConversionError(
                f"input_ids hold {count} {what[:-1]} sentinels ({sentinel}), but the inputs give {len(blocks)} {what} "
                f"(rows of `{what}` whose {what[:-1]}_mask is True); they must match one to one"
            )
    out |= _expand_sentinels(input_ids, attention_mask, labels, image_blocks, video_blocks, speech_blocks, config)
    return {**out, **passthrough}


def _image_inputs(images: Any, image_mask: Any, config: UniMoeConfig) -> tuple[torch.Tensor | None, list[int]]:
    """``pixel_values`` (None without images) and the tokens of each -200 sentinel, in batch order."""
    if images is None:
        return None, []
    if config.vision_config is None:
        raise ConversionError("images were given, but the config has no vision tower")
    per_image = _image_tokens(config)
    if isinstance(images, (list, tuple)) or images.dim() == 5:  # the original's multi-image path: one block each
        groups = list(images)
        return torch.cat(groups, dim=0), [group.shape[0] * per_image for group in groups]
    if image_mask is None:
        raise ConversionError("images [B, 3, H, W] need image_mask [B] (which rows hold a real image)")
    keep = torch.as_tensor(image_mask, dtype=torch.bool, device=images.device).reshape(-1)
    if keep.numel() != images.shape[0]:
        raise ConversionError(f"image_mask has {keep.numel()} entries for {images.shape[0]} images")
    return (images[keep] if keep.any() else None), [per_image] * int(keep.sum())


def _video_inputs(videos: Any, video_mask: Any, config: UniMoeConfig) -> tuple[torch.Tensor | None, list[int]]:
    """``pixel_values_videos`` (None without videos) and the tokens of each -400 sentinel, in batch order."""
    if videos is None:
        return None, []
    if config.vision_config is None:
        raise ConversionError("videos were given, but the config has no vision tower")
    if video_mask is None:
        raise ConversionError("videos need video_mask [B] (which rows hold a real video)")
    frames = {video.shape[0] for video in videos}
    if len(frames) > 1:
        raise ConversionError(f"videos have different frame counts {sorted(frames)}; ours stacks them")
    stacked = torch.stack(list(videos)) if isinstance(videos, (list, tuple)) else videos
    keep = torch.as_tensor(video_mask, dtype=torch.bool, device=stacked.device).reshape(-1)
    if keep.numel() != stacked.shape[0]:
        raise ConversionError(f"video_mask has {keep.numel()} entries for {stacked.shape[0]} videos")
    return (stacked[keep] if keep.any() else None), [_image_tokens(config)] * int(keep.sum())


def _speech_inputs(
    features: torch.Tensor | None, features_mask: torch.Tensor | None, input_ids: torch.Tensor, config: UniMoeConfig
) -> tuple[torch.Tensor | None, list[list[int]]]:
    """``input_features (chunks, mel, frames)`` of the segments in consumption order (None without any), and per
    row the tokens of each of its -300 sentinels (the original's segment counter restarts in every row)."""
    batch = input_ids.shape[0]
    blocks: list[list[int]] = [[] for _ in range(batch)]
    if features is None:
        count = int((input_ids == SPEECH_SENTINEL).sum())
        if count:
            raise ConversionError(f"input_ids hold {count} speech sentinels ({SPEECH_SENTINEL}), but no input_features")
        return None, blocks
    if config.speech_config is None:
        raise ConversionError("input_features were given, but the config has no speech encoder")
    if features_mask is None:
        raise ConversionError("input_features need features_mask [B, chunks] (the segment id of every chunk)")
    if features.dim() != 4 or features.shape[0] != batch:
        raise ConversionError(
            f"input_features has shape {tuple(features.shape)}; it must be (batch={batch}, chunks, mel, frames)"
        )
    chunks = []
    for row in range(batch):
        segments = _speech_segments(features_mask[row], features.shape[1])
        sentinels = int((input_ids[row] == SPEECH_SENTINEL).sum())
        if len(segments) != sentinels:
            raise ConversionError(
                f"row {row} of input_ids holds {sentinels} speech sentinels ({SPEECH_SENTINEL}), but its "
                f"features_mask {features_mask[row].tolist()} gives {len(segments)} segments; they must match"
            )
        for segment in segments:
            chunks += [features[row, index] for index in segment]
            blocks[row].append(len(segment) * config.speech_query_tokens)
    return (torch.stack(chunks) if chunks else None), blocks


def _expand_sentinels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_blocks: Sequence[int],
    video_blocks: Sequence[int],
    speech_blocks: Sequence[Sequence[int]],
    config: UniMoeConfig,
) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` with every sentinel replaced by its block of placeholders
    (mask value repeated, labels ignored), rows right-padded to the longest."""
    placeholders = {
        IMAGE_SENTINEL: config.image_token_id,
        VIDEO_SENTINEL: config.video_token_id,
        SPEECH_SENTINEL: config.speech_token_id,
    }
    across_rows = {IMAGE_SENTINEL: iter(image_blocks), VIDEO_SENTINEL: iter(video_blocks)}
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for row in range(input_ids.shape[0]):
        sizes = {**across_rows, SPEECH_SENTINEL: iter(speech_blocks[row])}
        ids, row_mask, row_labels = [], [], []
        for position, token in enumerate(input_ids[row].tolist()):
            value = int(mask[row, position])
            if token in placeholders:
                size = next(sizes[token])
                ids += [placeholders[token]] * size
                row_mask += [value] * size
                row_labels += [IGNORE_INDEX] * size
            else:
                ids.append(token)
                row_mask.append(value)
                row_labels.append(int(labels[row, position]) if labels is not None else IGNORE_INDEX)
        rows.append((ids, row_mask, row_labels))
    length = max(len(ids) for ids, _, _ in rows)
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0

    def padded(index: int, fill: int, dtype: torch.dtype) -> torch.Tensor:
        values = [r[index] + [fill] * (length - len(r[index])) for r in rows]
        return torch.tensor(values, dtype=dtype, device=input_ids.device)

    out = {"input_ids": padded(0, pad, input_ids.dtype), "attention_mask": padded(1, 0, torch.long)}
    if labels is not None:
        out["labels"] = padded(2, IGNORE_INDEX, labels.dtype)
    return out


# --- whole folders -----------------------------------------------------------------------------------------------


def convert_uni_moe_original(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    encoders_dir: str | os.PathLike | None = None,
    vision_config: str | os.PathLike | None = None,
    speech_config: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    experts_dir: str | os.PathLike | None = None,
    second_expert_gumbel: bool = False,
) -> UniMoeForConditionalGeneration:
    """Convert an original Uni-MoE checkpoint folder into a ``UniMoeForConditionalGeneration`` (in eval mode).

    Args:
        src_dir: the folder with the original ``config.json`` and the weights (whole, or an e2 / 8e folder with the
            extra files and LoRA adapter, see :func:`load_original_checkpoint`).
        dst_dir: where to ``save_pretrained`` the converted model (written atomically); None only returns it.
        encoders_dir: the folder holding the towers' configs by name (default ``src_dir/encoders`` when present);
            the original config names them (``mm_vision_tower``, ``mm_audio_tower``) but does not hold them.
        vision_config, speech_config: explicit tower config paths instead.
        base_dir, adapter_dir, experts_dir: the pieces of split checkpoints (:func:`load_original_checkpoint`).
        second_expert_gumbel: 8e: keep DeepSpeed's random second expert (see :func:`build_config`).

    Returns:
        The converted model. Raises :class:`ConversionError` for anything it cannot convert faithfully.
    """
    from .modeling_uni_moe import UniMoeForConditionalGeneration

    src_dir = Path(src_dir)
    if not (src_dir / "config.json").is_file():
        raise ConversionError(f"{src_dir} is not an original Uni-MoE checkpoint folder (no config.json)")
    original = json.loads((src_dir / "config.json").read_text())
    if encoders_dir is None and (src_dir / "encoders").is_dir():
        encoders_dir = src_dir / "encoders"
    config = build_config(
        original,
        encoders_dir,
        vision_config=vision_config,
        speech_config=speech_config,
        second_expert_gumbel=second_expert_gumbel,
    )
    original_sd = load_original_checkpoint(
        src_dir, base_dir=base_dir, adapter_dir=adapter_dir, experts_dir=experts_dir, num_experts=config.num_experts
    )
    embed = original_sd.get("model.embed_tokens.weight")
    if embed is None:
        raise ConversionError("the checkpoint lacks model.embed_tokens.weight")
    if embed.shape[0] != config.text_config.vocab_size:
        raise ConversionError(
            f"config.json's vocab_size {config.text_config.vocab_size} != the embedding's {embed.shape[0]} rows"
        )
    config.dtype = embed.dtype
    converted = convert_state_dict(original_sd, config, lora_scaling=lora_scaling_from_config(original))
    del original_sd
    for key, tensor in converted.items():  # routers stay fp32, as from_pretrained keeps them (discrete choices)
        if key.endswith("mlp.gate.weight") and tensor.dtype in (torch.float16, torch.bfloat16):
            converted[key] = tensor.float()
    # Build without random init (every tensor is assigned next); non-persistent buffers (rotary frequencies, the
    # routers' load counters) are computed by the modules' constructors as usual.
    with init.no_init_weights():
        model = UniMoeForConditionalGeneration(config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.eval()
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    if dst_dir is not None:
        with atomic_directory(dst_dir) as folder:
            model.save_pretrained(folder)
    return model


__all__ = [
    "EXPERT_BASE_FILES",
    "EXTRA_FILES",
    "IGNORE_INDEX",
    "IMAGE_SENTINEL",
    "LAYOUTS",
    "SPEECH_SENTINEL",
    "VIDEO_SENTINEL",
    "ConversionError",
    "build_config",
    "build_text_config",
    "convert_original_inputs",
    "convert_state_dict",
    "convert_uni_moe_original",
    "expected_state_dict",
    "load_expert_file",
    "load_original_checkpoint",
    "lora_scaling_from_config",
    "lora_scaling_of",
    "merge_peft_adapter",
    "original_layout",
    "strip_peft_prefix",
]
