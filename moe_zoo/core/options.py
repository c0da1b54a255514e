"""The MoE options every moe_zoo model config shares, and their validation.

Model configs (``UpcycledMoeConfig``, MoE-LLaVA's, Uni-MoE's, ...) declare these fields with the same names and
defaults, and call :func:`validate_moe_options` from ``__post_init__``. Keeping the names here, in one place, means
that a router or capacity option added to the core reaches every model, and that every model rejects a bad value
with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

ROUTER_TYPES = (
    "softmax_topk",  # softmax over all experts, then top-k (Mixtral, Qwen-MoE, MixLoRA, DeepSpeed)
    "topk_softmax",  # top-k over the logits, then softmax over the selected (Uni-MoE v1)
    "sigmoid_topk",  # sigmoid scores, then top-k (DeepSeek-V3)
    "bias_balanced",  # sigmoid_topk with the aux-loss-free selection bias switched on
    "top_p",  # smallest prefix of the sorted probabilities that reaches p (Harder Tasks Need More Experts)
    "top_any",  # per-expert thresholds on sigmoid cosine scores (DynMoE)
    "dense_to_sparse",  # Gumbel-softmax gate with an annealed temperature (EvoMoE)
)
"""Names accepted by ``router_type``."""

TOP_K_ROUTER_TYPES = ("softmax_topk", "topk_softmax", "sigmoid_topk", "bias_balanced")

AUX_LOSS_TYPES = (
    "switch_topk_mean",  # transformers' load_balancing_loss_func: top-k counts, all layers' tokens pooled
    "gshard_top1_sum",  # DeepSpeed / MoE-LLaVA: E^2 * mean(me * ce) on first choices, summed over layers
)
"""Names accepted by ``aux_loss_type``."""

MOE_LAYER_MODES = ("all", "sparse", "first_half", "second_half", "none")
"""Names accepted by ``moe_layers`` (besides an explicit list of layer indices)."""


@dataclass(kw_only=True)
class MoeOptions:
    """Every MoE option, with its default. Model configs inherit it (``class XConfig(PreTrainedConfig, MoeOptions)``,
    which transformers' dataclass configs allow), so the fields, defaults and docs live here once.

    Experts and routing:
        num_experts: routed FFN experts per MoE layer.
        num_experts_per_tok: k of the top-k routers (and of dense-to-sparse's loss); ignored by top-p and top-any.
        moe_layers: ``"all"``, ``"sparse"`` (every other layer from 0), ``"first_half"``, ``"second_half"``, ``"none"`` (dense), or a
            list of layer indices.
        router_type: one of :data:`ROUTER_TYPES`.
        norm_topk_prob: renormalise the top-k weights to sum to 1 (needed for function-preserving upcycling).
        routed_scaling_factor: multiplies the top-k weights (DeepSeek-V3).
        router_jitter_noise: multiplies the router input by U(1-j, 1+j) in training (Switch, MixLoRA).
        router_bias_update_rate: ``u`` of aux-loss-free balancing; > 0 turns the selection bias on
            (``"bias_balanced"`` defaults it to 1e-3).
        router_second_expert_gumbel: DeepSpeed's stochastic second expert (top-2 only), for fidelity with
            MoE-LLaVA checkpoints; it is random at eval too, so it is off by default.
        top_p_threshold: p of top-p routing.
        top_any_init_experts: expert slots active at init for top-any (DynMoE starts from half); None = all.
        gumbel_tau_max, gumbel_tau_min, gumbel_tau_decay_steps, gumbel_selection_threshold: dense-to-sparse
            gate temperature schedule and selection threshold (EvoMoE).
    Capacity (DeepSpeed semantics, off by default):
        capacity_factor, eval_capacity_factor (None = same as ``capacity_factor``), min_capacity.
    Extra experts:
        num_shared_experts, shared_expert_intermediate_size (None = the FFN's), shared_expert_gate (sigmoid
        gate, Qwen2-MoE); num_null_experts, num_zero_experts, num_copy_experts, num_constant_experts.
        gating_residual: MoE++'s gating residuals: every MoE block after the first adds the previous block's router
            logits, through a learned ``(S, S)`` map (zero at init), to its own before choosing experts.
        shared_expert_routing: UniMoE-Audio's weighting of the shared experts: a linear gate also scores each
            shared expert, and every token's selected routed experts and all shared experts share one softmax over
            their logits (instead of the shared experts' fixed weight 1); gated FFNs only.
    Losses:
        router_aux_loss_coef, aux_loss_type (one of :data:`AUX_LOSS_TYPES`), router_z_loss_coef,
        router_entropy_loss_coef; output_router_logits returns the router logits (and adds the loss in training).
        zero_computation_loss_weight: tau of MoE++'s heterogeneous load-balance loss ``sum_i eta_i f_i P_i``, the
            weight ``eta`` of the zero, copy and constant experts' slots (FFN and null experts weigh 1); below 1 it
            lets tokens use the cheap experts more than a uniform share. 1.0 (default) is the ordinary loss.
    """

    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str | list[int] = "all"
    router_type: str = "softmax_topk"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_jitter_noise: float = 0.0
    router_bias_update_rate: float = 0.0
    router_second_expert_gumbel: bool = False
    top_p_threshold: float = 0.4
    top_any_init_experts: int | None = None
    gumbel_tau_max: float = 1.0
    gumbel_tau_min: float = 0.5
    gumbel_tau_decay_steps: int = 1000
    gumbel_selection_threshold: float = 1e-3
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    shared_expert_routing: bool = False
    gating_residual: bool = False
    num_null_experts: int = 0
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_constant_experts: int = 0
    router_aux_loss_coef: float = 0.01
    aux_loss_type: str = "switch_topk_mean"
    router_z_loss_coef: float = 0.0
    router_entropy_loss_coef: float = 0.0
    zero_computation_loss_weight: float = 1.0
    output_router_logits: bool = False

    def moe_options(self) -> dict[str, Any]:
        """The MoE options of this object as a dict (e.g. to build another config with the same MoE)."""
        return {f.name: getattr(self, f.name) for f in fields(MoeOptions)}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"`{field}` is {value!r}, but it must be {allowed}.")


def resolve_moe_layers(moe_layers: str | Sequence[int], num_layers: int) -> list[int]:
    """Turn a ``moe_layers`` value into the sorted list of decoder-layer indices that get an MoE block.

    ``"sparse"`` is MoE-LLaVA's choice (every other layer from 0), ``"first_half"``/``"second_half"`` split the
    stack at ``num_layers // 2``, ``"none"`` keeps every layer dense; an explicit list is checked against the
    number of layers.
    """
    if isinstance(moe_layers, str):
        modes = {
            "all": range(num_layers),
            "sparse": range(0, num_layers, 2),
            "first_half": range(num_layers // 2),
            "second_half": range(num_layers // 2, num_layers),
            "none": range(0),  # a dense model of an MoE family (e.g. MoE-LLaVA before stage III)
        }
        if moe_layers not in modes:
            _fail("moe_layers", moe_layers, f"one of {MOE_LAYER_MODES} or a list of layer indices")
        return list(modes[moe_layers])
    layers = sorted({int(i) for i in moe_layers})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        _fail("moe_layers", list(moe_layers), f"a non-empty list of layer indices in [0, {num_layers - 1}]")
    return layers


def parse_moe_layers(text: str) -> str | list[int]:
    """A ``moe_layers`` value from the command line: a mode name, or comma-separated indices (``"0,2,4"``)."""
    text = text.strip()
    if not text.replace(",", "").replace(" ", "").isdigit():
        return text
    return [int(part) for part in text.split(",") if part.strip()]


def balance_slot_weights(config: Any) -> torch.Tensor | None:
    """``eta`` of every routed slot for the load-balance loss (``[FFN | copy | constant | zero | null]``): 1, and
    ``zero_computation_loss_weight`` for the zero-computation experts (MoE++); None when every slot weighs 1."""
    tau = config.zero_computation_loss_weight
    cheap = config.num_copy_experts + config.num_constant_experts + config.num_zero_experts
    if tau == 1.0 or not cheap:
        return None
    weights = torch.ones(num_routed_slots(config))
    weights[config.num_experts : config.num_experts + cheap] = tau
    return weights


def num_routed_slots(config: Any) -> int:
    """How many outputs the router has: FFN experts plus null, zero, copy and constant experts."""
    return (
        config.num_experts
        + config.num_null_experts
        + config.num_zero_experts
        + config.num_copy_experts
        + config.num_constant_experts
    )


def validate_moe_options(config: Any, num_layers: int | None = None) -> None:
    """Check every MoE option of ``config``; raise ``ValueError`` naming the field and what would be right."""
    if not isinstance(config.num_experts, int) or config.num_experts < 1:
        _fail("num_experts", config.num_experts, "a positive integer")
    if config.router_type not in ROUTER_TYPES:
        _fail("router_type", config.router_type, f"one of {ROUTER_TYPES}")
    if config.aux_loss_type not in AUX_LOSS_TYPES:
        _fail("aux_loss_type", config.aux_loss_type, f"one of {AUX_LOSS_TYPES}")
    slots = num_routed_slots(config)
    k = config.num_experts_per_tok
    if config.router_type in TOP_K_ROUTER_TYPES or config.router_type == "dense_to_sparse":
        if not isinstance(k, int) or not 1 <= k <= slots:
            _fail("num_experts_per_tok", k, f"an integer in [1, {slots}] (the number of routed experts)")
    if config.router_type == "topk_softmax" and not config.norm_topk_prob:
        _fail("norm_topk_prob", False, "True for router_type='topk_softmax' (its softmax always sums to 1)")
    if not 0.0 < config.top_p_threshold <= 1.0:
        _fail("top_p_threshold", config.top_p_threshold, "in (0, 1]")
    if config.top_any_init_experts is not None and not 1 <= config.top_any_init_experts <= config.num_experts:
        _fail("top_any_init_experts", config.top_any_init_experts, f"None or in [1, {config.num_experts}]")
    if not 0 < config.gumbel_tau_min <= config.gumbel_tau_max:
        _fail("gumbel_tau_min", config.gumbel_tau_min, f"in (0, gumbel_tau_max={config.gumbel_tau_max}]")
    if config.gumbel_tau_decay_steps < 1:
        _fail("gumbel_tau_decay_steps", config.gumbel_tau_decay_steps, "a positive integer")
    for name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            _fail(name, value, "None (no token dropping) or a number > 0")
    if config.min_capacity < 0:
        _fail("min_capacity", config.min_capacity, "an integer >= 0")
    for name in (
        "num_shared_experts",
        "num_null_experts",
        "num_zero_experts",
        "num_copy_experts",
        "num_constant_experts",
    ):
        if getattr(config, name) < 0:
            _fail(name, getattr(config, name), "an integer >= 0")
    if config.router_second_expert_gumbel and (config.router_type != "softmax_topk" or k != 2):
        _fail(
            "router_second_expert_gumbel",
            True,
            "False unless router_type='softmax_topk' and num_experts_per_tok=2 (DeepSpeed's top-2 gate)",
        )
    if config.router_second_expert_gumbel and config.router_bias_update_rate > 0:
        _fail(
            "router_second_expert_gumbel",
            True,
            "False when router_bias_update_rate > 0 (DeepSpeed's noisy second choice has no selection bias)",
        )
    if config.shared_expert_routing and (
        not config.num_shared_experts or config.shared_expert_gate or config.router_type == "top_any"
    ):
        _fail(
            "shared_expert_routing",
            True,
            "False unless num_shared_experts >= 1, shared_expert_gate is False (one weighting of the shared experts) "
            "and router_type is not 'top_any' (its scores are not logits)",
        )
    if config.gating_residual and config.router_type == "top_any":
        _fail("gating_residual", True, "False for router_type='top_any' (its scores are cosines, not logits)")
    if config.router_bias_update_rate < 0:
        _fail("router_bias_update_rate", config.router_bias_update_rate, ">= 0")
    if config.router_jitter_noise < 0 or config.router_jitter_noise >= 1:
        _fail("router_jitter_noise", config.router_jitter_noise, "in [0, 1)")
    for name in (
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_entropy_loss_coef",
        "zero_computation_loss_weight",
    ):
        if getattr(config, name) < 0:
            _fail(name, getattr(config, name), ">= 0")
    if num_layers is not None:
        resolve_moe_layers(config.moe_layers, num_layers)
