# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Configuration of MoE-LLaVA ("MoE-LLaVA: Mixture of Experts for Large Vision-Language Models")."""

from __future__ import annotations

from transformers import AutoConfig, LlavaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...core.options import MoeOptions, validate_moe_options
from ..config_views import InitializerRangeView, MoeLayersView


class MoeLlavaConfig(InitializerRangeView, MoeLayersView, LlavaConfig, MoeOptions):
    r"""Config of [`MoeLlavaForConditionalGeneration`]: Llava's fields plus the MoE options.

    Llava's fields keep their names and meaning: ``vision_config`` (any HF vision tower: CLIP, SigLIP, ...),
    ``text_config`` (any HF decoder that upcycling supports: Phi, StableLM, Qwen2, Llama, ...), ``image_token_id``,
    ``image_seq_length``, ``projector_hidden_act``, ``vision_feature_layer`` (-2, as MoE-LLaVA),
    ``vision_feature_select_strategy`` (``"default"`` drops CLS, as MoE-LLaVA's ``patch``).

    MoE options are those of [`~moe_zoo.core.MoeOptions`], with MoE-LLaVA's defaults: ``moe_layers="sparse"``
    (every other layer from 0), 4 experts, top-2, ``aux_loss_type="gshard_top1_sum"`` with coefficient 0.01 (the
    original's loss: DeepSpeed's top-1 GShard loss summed over layers). ``moe_layers="none"`` is the dense model of
    MoE-tuning stages I and II.

    DynMoE: ``num_experts_per_tok=-1`` selects top-any gating (``router_type="top_any"``) starting from half the
    expert slots (``top_any_init_experts = num_experts // 2``), as MoE-LLaVA's DynMoE scripts do.
    """

    model_type = "moe_llava"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    moe_layers: str | list[int] = "sparse"
    aux_loss_type: str = "gshard_top1_sum"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_experts_per_tok == -1:  # MoE-LLaVA's switch for DynMoE
            self.router_type = "top_any"
            if self.top_any_init_experts is None:
                self.top_any_init_experts = max(1, self.num_experts // 2)
        validate_moe_options(self, self.text_config.num_hidden_layers)


__all__ = ["MoeLlavaConfig"]
