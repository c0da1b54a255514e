# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""An upcycled MoE language model: a dense HF decoder whose FFNs in chosen layers are sparse MoE blocks.

The model keeps the backbone's own base model (``LlamaModel``, ``PhiModel``, ...) under ``model`` and its head under
``lm_head``, so every parameter outside the MoE blocks has the backbone's own name, attention goes through the
backbone's attention interface (sdpa, flash-attention), and generation, caches and RoPE variants behave exactly as
in the dense model. Only ``model.<layers>.{i}.mlp`` changes: it becomes a
:class:`~moe_zoo.core.SparseMoeBlock` (``gate`` router, ``experts`` bank in transformers' 3D layout).
"""

from __future__ import annotations

from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple

from ...core.experts import GATED_LAYOUT, PLAIN_LAYOUT, GatedExpertsBase, PlainExpertsBase
from ...core.mixture_of_attention import install_mixture_of_attention
from ...core.recording import collect_routing
from ..moe_backbone import (
    MoeModelMixin,
    backbone_hidden_act,
    build_backbone,
    install_moe_blocks,
)
from .configuration_upcycled_moe import UpcycledMoeConfig


@use_experts_implementation(**GATED_LAYOUT)
class UpcycledMoeGatedExperts(GatedExpertsBase):
    pass


@use_experts_implementation(**PLAIN_LAYOUT)
class UpcycledMoePlainExperts(PlainExpertsBase):
    pass


class UpcycledMoePreTrainedModel(MoeModelMixin, PreTrainedModel):
    config_class = UpcycledMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class UpcycledMoeForCausalLM(UpcycledMoePreTrainedModel, GenerationMixin):
    """A dense decoder upcycled into an MoE. Build one with :func:`moe_zoo.upcycle`, or from a config.

    ``forward`` returns a ``MoeCausalLMOutputWithPast``; with labels and ``output_router_logits`` (argument or
    config field) the router loss of :func:`moe_zoo.core.router_aux_loss` is added to the LM loss and returned
    as ``aux_loss``.

    Parallel plans: the backbone's own tensor-parallel plan (``model.*``, e.g. Llama's attention projections), the
    expert-parallel plan of the MoE blocks (:func:`~moe_zoo.modeling.moe_backbone.declare_expert_parallel_plan`)
    and, as in transformers' causal LMs, the LM head's, so ``from_pretrained(..., distributed_config=...)`` shards it.
    """

    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: UpcycledMoeConfig):
        super().__init__(config)
        self.model, self.lm_head = build_backbone(config.text_config)
        embeddings = next(n for n, m in self.named_modules() if m is self.model.get_input_embeddings())
        self._tied_weights_keys = {"lm_head.weight": f"{embeddings}.weight"}
        self.logit_softcapping = getattr(config.text_config, "final_logit_softcapping", None)
        if config.num_attention_experts:  # BAM: before the MoE blocks, whose plan declaration drops stale TP rules
            install_mixture_of_attention(
                self.model,
                config.text_config,
                config.num_hidden_layers,
                config.num_attention_experts,
                config.attention_experts_share_kv,
            )
        install_moe_blocks(
            self.model,
            config,
            config.num_hidden_layers,
            backbone_hidden_act(config.text_config),
            (UpcycledMoeGatedExperts, UpcycledMoePlainExperts),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if "past_key_values" in kwargs:  # the pre-5.24 name, still used by some callers
            cache = kwargs.pop("past_key_values")
        use_cache = self.packed_use_cache(position_ids, attention_mask, cache, use_cache)
        with collect_routing(enabled=output_router_logits) as routing:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        if self.logit_softcapping:
            logits = (logits / self.logit_softcapping).tanh() * self.logit_softcapping

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(
            **self.router_outputs(loss, routing, attention_mask, output_router_logits),
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "UpcycledMoeForCausalLM",
    "UpcycledMoeGatedExperts",
    "UpcycledMoePlainExperts",
    "UpcycledMoePreTrainedModel",
]
