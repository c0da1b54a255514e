# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""MoE-LLaVA as a native transformers model: Llava (vision tower -> MLP projector -> decoder) whose decoder FFNs in
``moe_layers`` are sparse MoE blocks.

It is transformers' Llava, reused rather than rewritten: image features, the placeholder check
(``<image>`` tokens must match the image features, else ``ValueError``) and the ``masked_scatter`` merge are
``LlavaModel``'s. What changes: the language model is the backbone's own base model with MoE blocks in it, the LM
head is the backbone's own (so Phi keeps its bias), and the forward collects the routing for ``router_logits`` and
the router loss. With ``moe_layers="none"`` the same classes hold the dense model of MoE-tuning stages I and II.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import MultimodalMoeCausalLMOutputWithPast
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from ...core.experts import GATED_LAYOUT, PLAIN_LAYOUT, GatedExpertsBase, PlainExpertsBase
from ...core.recording import collect_routing
from ..moe_backbone import (
    MoeModelMixin,
    backbone_hidden_act,
    build_backbone,
    install_moe_blocks,
)
from .configuration_moe_llava import MoeLlavaConfig


@use_experts_implementation(**GATED_LAYOUT)
class MoeLlavaGatedExperts(GatedExpertsBase):
    pass


@use_experts_implementation(**PLAIN_LAYOUT)
class MoeLlavaPlainExperts(PlainExpertsBase):
    pass


class MoeLlavaPreTrainedModel(MoeModelMixin, LlavaPreTrainedModel):
    config_class = MoeLlavaConfig
    config: MoeLlavaConfig


class MoeLlavaModel(MoeLlavaPreTrainedModel, LlavaModel):
    """Vision tower, projector and the MoE language model, without the LM head (``LlavaModel``'s forward)."""

    def __init__(self, config: MoeLlavaConfig, language_model: nn.Module | None = None):
        MoeLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = language_model if language_model is not None else build_backbone(config.text_config)[0]
        install_moe_blocks(
            self.language_model,
            config,
            config.text_config.num_hidden_layers,
            backbone_hidden_act(config.text_config),
            (MoeLlavaGatedExperts, MoeLlavaPlainExperts),
        )
        self.post_init()

    def get_image_features(self, pixel_values, *args, **kwargs):
        check_pixel_values(pixel_values, self.config.vision_config)
        return super().get_image_features(pixel_values, *args, **kwargs)


def check_pixel_values(pixel_values, vision_config) -> None:
    """Refuse pixel values the vision tower cannot take, naming the expected shape."""
    channels = getattr(vision_config, "num_channels", 3)
    size = getattr(vision_config, "image_size", None)
    expected = f"(num_images, {channels}, {size}, {size})"
    if (
        pixel_values.dim() != 4
        or pixel_values.shape[1] != channels
        or (size is not None and tuple(pixel_values.shape[-2:]) != (size, size))
    ):
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}, but the vision tower expects {expected}; "
            "use the model's processor (AutoProcessor) to prepare images."
        )


class MoeLlavaForConditionalGeneration(MoeLlavaPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin):
    """MoE-LLaVA. ``forward`` takes Llava's inputs (``input_ids`` with expanded ``<image>`` tokens,
    ``pixel_values``, ...) and returns ``MultimodalMoeCausalLMOutputWithPast``: with ``output_router_logits``
    (argument or config) it carries one ``(B*S, E)`` router-logit tensor per MoE layer and ``aux_loss``, the
    weighted router loss, which is added to ``loss`` when labels are given."""

    def __init__(self, config: MoeLlavaConfig):
        MoeLlavaPreTrainedModel.__init__(self, config)
        language_model, self.lm_head = build_backbone(config.text_config)
        self.model = MoeLlavaModel(config, language_model=language_model)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep: int = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MultimodalMoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if "past_key_values" in kwargs:  # the pre-5.24 name, still used by some callers
            cache = kwargs.pop("past_key_values")
        kwargs["use_cache"] = self.packed_use_cache(position_ids, attention_mask, cache, kwargs.get("use_cache"))
        with collect_routing(enabled=output_router_logits) as routing:
            outputs = super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
        return MultimodalMoeCausalLMOutputWithPast(
            **self.router_outputs(outputs.loss, routing, attention_mask, output_router_logits),
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = [
    "MoeLlavaForConditionalGeneration",
    "MoeLlavaGatedExperts",
    "MoeLlavaModel",
    "MoeLlavaPlainExperts",
    "MoeLlavaPreTrainedModel",
]
