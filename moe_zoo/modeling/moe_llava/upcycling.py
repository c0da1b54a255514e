"""MoE-tuning stage III's first step: upcycle the stage-II dense MoE-LLaVA into experts."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedModel

from ..moe_backbone import built_on_meta_whole, upcycle_weights
from .configuration_moe_llava import MoeLlavaConfig
from .modeling_moe_llava import MoeLlavaForConditionalGeneration

_NOT_CONFIG_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


def upcycle_moe_llava(
    model: PreTrainedModel,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_layers: str | list[int] = "sparse",
    router_init_std: float | None = None,
    **moe_options: Any,
) -> MoeLlavaForConditionalGeneration:
    """Turn a dense stage-II model (a ``MoeLlavaForConditionalGeneration`` with ``moe_layers="none"``, or a
    transformers ``LlavaForConditionalGeneration`` whose LM head matches the backbone's) into MoE-LLaVA: the FFNs
    of ``moe_layers`` become ``num_experts`` copies each with a fresh router, everything else is copied. With the
    default renormalised top-k router the result computes the same function. ``model`` is not modified.
    """
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_CONFIG_FIELDS}
    moe = {"num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok, "moe_layers": moe_layers}
    config = MoeLlavaConfig(**{**fields, **moe, **moe_options})
    parameter = next(model.parameters())
    with built_on_meta_whole():
        upcycled = MoeLlavaForConditionalGeneration(config)
    upcycled = upcycled.to_empty(device=parameter.device).to(parameter.dtype)
    std = router_init_std if router_init_std is not None else config.initializer_range
    num_layers = config.text_config.num_hidden_layers
    upcycle_weights(model, upcycled, model.model.language_model, upcycled.model.language_model, config, num_layers, std)
    upcycled.generation_config = copy.deepcopy(model.generation_config)
    upcycled.train(model.training)
    return upcycled
