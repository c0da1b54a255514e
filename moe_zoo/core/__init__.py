"""The MoE engine every moe_zoo model and method shares. Nothing here knows about a particular model."""

from torch import nn

from .block import SparseMoeBlock
from .capacity import buffer_positions, drop_over_capacity, expert_capacity
from .experts import (
    GATED_LAYOUT,
    PLAIN_LAYOUT,
    ConstantExperts,
    GatedExperts,
    GatedExpertsBase,
    GatedMLP,
    PlainExperts,
    PlainExpertsBase,
    PlainMLP,
)
from .gated_combine import GatedCombine
from .gradient_buffers import release_gradient_buffers
from .lora_experts import LoraProjection, lora_experts_ffn
from .losses import (
    dynmoe_diverse_simple_loss,
    gshard_load_balancing_loss,
    router_aux_loss,
    router_entropy_loss,
    router_z_loss,
    switch_load_balancing_loss,
)
from .options import (
    AUX_LOSS_TYPES,
    MOE_LAYER_MODES,
    ROUTER_TYPES,
    MoeOptions,
    resolve_moe_layers,
    validate_moe_options,
)
from .quantized_experts import ExpertQuantization, QuantizedExperts, quantize_experts
from .recording import LayerRouting, collect_routing, report_routing
from .routed_pairs import RoutedPairs, route_pairs
from .routing import (
    DenseToSparseRouter,
    Router,
    TopAnyRouter,
    TopKRouter,
    TopPRouter,
    build_router,
)
from .upcycle import copy_ffn_into_experts, ffn_layout, find_decoder_layers


def update_selection_biases(model: nn.Module) -> None:
    """Apply the aux-loss-free bias update of every router in ``model`` (call once per optimizer step)."""
    for module in model.modules():
        if isinstance(module, Router):
            module.update_bias()


__all__ = [
    "AUX_LOSS_TYPES",
    "GATED_LAYOUT",
    "MOE_LAYER_MODES",
    "PLAIN_LAYOUT",
    "ROUTER_TYPES",
    "ConstantExperts",
    "DenseToSparseRouter",
    "ExpertQuantization",
    "GatedExperts",
    "GatedExpertsBase",
    "GatedCombine",
    "GatedMLP",
    "LayerRouting",
    "LoraProjection",
    "MoeOptions",
    "PlainExperts",
    "PlainExpertsBase",
    "PlainMLP",
    "QuantizedExperts",
    "Router",
    "RoutedPairs",
    "SparseMoeBlock",
    "TopAnyRouter",
    "TopKRouter",
    "TopPRouter",
    "buffer_positions",
    "build_router",
    "collect_routing",
    "copy_ffn_into_experts",
    "drop_over_capacity",
    "dynmoe_diverse_simple_loss",
    "expert_capacity",
    "ffn_layout",
    "find_decoder_layers",
    "gshard_load_balancing_loss",
    "lora_experts_ffn",
    "quantize_experts",
    "release_gradient_buffers",
    "report_routing",
    "resolve_moe_layers",
    "route_pairs",
    "router_aux_loss",
    "router_entropy_loss",
    "router_z_loss",
    "switch_load_balancing_loss",
    "update_selection_biases",
    "validate_moe_options",
]
