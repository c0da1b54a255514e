# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Uni-MoE's stage-3 model: a dense Uni-MoE whose FFNs become experts taken from *different* dense models.

Uni-MoE does not copy one FFN into every expert (sparse upcycling); each expert is the FFN of a model trained on
its own modality in stage 2 (MoE-Task2: the LLaVA-1.5 MLP plus the experts of single-modality tasks 2, 3 and 7).
:func:`upcycle_uni_moe` builds that: expert ``e`` of every MoE layer is ``expert_sources[e]``'s FFN of that layer
(``None``: the base model's own FFN), and everything else (attention, norms, embeddings, LM head, encoders and
connectors) is the base model's. Routers start fresh, so with identical sources the MoE computes the dense
function (the renormalised top-k weights sum to 1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...core.upcycle import dense_expert_weights, find_decoder_layers
from ..moe_backbone import built_on_meta_whole, full_parameters, upcycle_weights
from .configuration_uni_moe import UniMoeConfig
from .modeling_uni_moe import UniMoeForConditionalGeneration

_NOT_CONFIG_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


def _check_dense(model: nn.Module, what: str) -> None:
    if not isinstance(model, UniMoeForConditionalGeneration):
        raise ValueError(f"{what} is a {type(model).__name__}; expected a dense UniMoeForConditionalGeneration.")
    if model.config.moe_layer_indices:
        raise ValueError(
            f"{what} already has MoE layers {model.config.moe_layer_indices}; Uni-MoE's experts come from dense "
            "models (moe_layers='none'), the outputs of stages 1 and 2."
        )


def _check_same_ffns(base: UniMoeForConditionalGeneration, source: UniMoeForConditionalGeneration, what: str) -> None:
    base_text, text = base.config.text_config, source.config.text_config
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        if getattr(base_text, name, None) != getattr(text, name, None):
            raise ValueError(
                f"{what} has text_config.{name}={getattr(text, name, None)}, but the base model has "
                f"{getattr(base_text, name, None)}; every expert source must share the base model's LLM shape."
            )


@torch.no_grad()
def upcycle_uni_moe(
    base_dense_model: UniMoeForConditionalGeneration,
    expert_sources: Sequence[UniMoeForConditionalGeneration | None],
    num_experts_per_tok: int = 2,
    router_type: str = "topk_softmax",
    router_init_std: float | None = None,
    **moe_options: Any,
) -> UniMoeForConditionalGeneration:
    """Uni-MoE with one expert per entry of ``expert_sources``.

    Args:
        base_dense_model: a dense Uni-MoE (``moe_layers="none"``, e.g. stage 1's output): the source of everything
            but the experts.
        expert_sources: per expert, a dense Uni-MoE whose FFN of each MoE layer becomes that expert (stage 2's
            merged models), or ``None`` for the base model's own FFN. Their length is ``num_experts``.
        num_experts_per_tok, router_type: the routing (Uni-MoE v1: top-2 with a softmax over the selected logits).
        router_init_std: the routers' normal init std; default: the config's ``initializer_range``.
        moe_options: any other option of :class:`~moe_zoo.core.MoeOptions` (``moe_layers`` defaults to the config's
            ``"all"``, as Uni-MoE; ``num_experts`` may be passed but must equal ``len(expert_sources)``).

    Neither the base model nor the sources are modified. Raises ``ValueError`` for a non-dense input, sources whose
    LLM shape differs from the base, or a ``num_experts`` that disagrees with the sources.
    """
    _check_dense(base_dense_model, "base_dense_model")
    sources = list(expert_sources)
    if not sources:
        raise ValueError("expert_sources is empty; give one dense model (or None for the base FFN) per expert.")
    if "num_experts" in moe_options and moe_options["num_experts"] != len(sources):
        raise ValueError(
            f"num_experts={moe_options['num_experts']}, but expert_sources lists {len(sources)} experts; pass one "
            f"source (or None) per expert, or num_experts={len(sources)}."
        )
    for index, source in enumerate(sources):
        if source is not None:
            _check_dense(source, f"expert_sources[{index}]")
            _check_same_ffns(base_dense_model, source, f"expert_sources[{index}]")
    fields = {k: v for k, v in base_dense_model.config.to_dict().items() if k not in _NOT_CONFIG_FIELDS}
    moe = {
        "moe_layers": "all",
        **moe_options,
        "num_experts": len(sources),
        "num_experts_per_tok": num_experts_per_tok,
        "router_type": router_type,
    }
    config = UniMoeConfig(**{**fields, **moe})
    parameter = next(base_dense_model.parameters())
    with built_on_meta_whole():
        upcycled = UniMoeForConditionalGeneration(config)
    upcycled = upcycled.to_empty(device=parameter.device).to(parameter.dtype)
    std = router_init_std if router_init_std is not None else config.initializer_range
    num_layers = config.text_config.num_hidden_layers
    base_llm = base_dense_model.model.language_model
    upcycle_weights(base_dense_model, upcycled, base_llm, upcycled.model.language_model, config, num_layers, std)
    moe_layers = find_decoder_layers(upcycled.model.language_model, num_layers)
    for expert, source in enumerate(sources):
        if source is None:
            continue  # upcycle_weights put the base FFN in every expert already
        source_layers = find_decoder_layers(source.model.language_model, num_layers)
        with full_parameters(source):
            for index in config.moe_layer_indices:
                bank = moe_layers[index].mlp.experts
                for name, weight in dense_expert_weights(source_layers[index].mlp).items():
                    target = getattr(bank, name)
                    target[expert].copy_(weight.detach().to(device=target.device, dtype=target.dtype))
    upcycled.generation_config = copy.deepcopy(base_dense_model.generation_config)
    upcycled.train(base_dense_model.training)
    return upcycled


__all__ = ["upcycle_uni_moe"]
