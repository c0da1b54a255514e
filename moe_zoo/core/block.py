"""The sparse MoE block: router -> (capacity) -> experts, plus shared and zero-computation experts.

Router output slots are laid out as ``[FFN experts | copy | constant | zero | null]``. Only the FFN slots reach the
expert bank; copy experts return ``x``, constant experts ``a1 x + a2 v`` (MoE++), and zero / null experts return 0
(MoE++'s zero expert and UniMoE-Audio's null expert differ only in how losses treat them). Shared experts are
always on and added to the routed output, optionally scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE), or
weighted per token and shared expert by one softmax with the selected routed experts (UniMoE-Audio,
``shared_expert_routing``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from .capacity import drop_over_capacity, expert_capacity
from .experts import ConstantExperts, GatedExperts, GatedMLP, PlainExperts, PlainMLP
from .fused_experts import IMPLEMENTATION_NAME as EXPERTS_IMPLEMENTATION
from .recording import report_routing
from .routing import build_router, routes_variable_experts, routing_dtype

SKIPS_EMPTY_SLOTS = frozenset({"eager", EXPERTS_IMPLEMENTATION})
"""Experts implementations that leave out empty slots (any index ``>= num_experts``) themselves: the banks' eager
forward and moe_zoo's, both through :func:`~moe_zoo.core.experts.group_by_expert`. transformers' ``grouped_mm`` and
``batched_mm`` would compute them, so the block flattens variable routing into real pairs for those."""


class GatingResidualChain:
    """The router logits of a model's MoE blocks in the current forward, by block position, so that each block
    can add its predecessor's (MoE++'s gating residuals). Each forward overwrites what the previous one left; a
    layer recomputed by activation checkpointing reads its predecessor's logits of the same forward."""

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}

    def record(self, position: int, logits: torch.Tensor) -> None:
        self.logits[position] = logits

    def __deepcopy__(self, memo):  # a copied model gets its own chain, linked again by link_gating_residuals
        return GatingResidualChain()


def link_gating_residuals(blocks: list[SparseMoeBlock]) -> None:
    """Give every MoE block after the first a gating residual ``Linear(S, S)`` (zero at init: the routing starts
    as without it) that maps the previous block's router logits into its own, as MoE++ does; ``blocks`` are a
    model's MoE blocks in layer order. Blocks whose config leaves ``gating_residual`` off are left alone."""
    chain = GatingResidualChain()
    for position, block in enumerate(blocks):
        if not block.config.gating_residual:
            continue
        block.gating_chain, block.gating_position = chain, position
        if position:
            slots = block.gate.num_experts
            block.gating_residual = nn.Linear(slots, slots, bias=False)
            nn.init.zeros_(block.gating_residual.weight)


class SparseMoeBlock(nn.Module):
    """A drop-in replacement for a decoder layer's FFN: ``forward(hidden_states (..., H)) -> (..., H)``.

    Args:
        config: a config carrying the MoE options of :mod:`moe_zoo.core.options`; it is also handed to the expert
            bank, whose ``config._experts_implementation`` picks eager / batched_mm / grouped_mm.
        hidden_size, intermediate_size, hidden_act: the FFN's sizes and activation.
        gated: SwiGLU experts (``gate_up_proj``) if True, plain biased experts (``up_proj`` + biases) if False.
        experts_class: the decorated expert bank class to use; defaults to the core's ``GatedExperts`` /
            ``PlainExperts``. Modeling files pass their own decorated subclass (see :mod:`moe_zoo.core.experts`).
    """

    def __init__(
        self,
        config: Any,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        gated: bool = True,
        experts_class: type[nn.Module] | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.config = config  # read live: capacity options changed on a loaded model take effect
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.num_copy = config.num_copy_experts
        self.num_constant = config.num_constant_experts
        self.renormalize = config.norm_topk_prob and config.router_type != "top_any"
        self.gate = build_router(config, hidden_size)
        experts_class = experts_class or (GatedExperts if gated else PlainExperts)
        self.experts = experts_class(config, config.num_experts, hidden_size, intermediate_size, hidden_act)
        self.constant_experts = ConstantExperts(self.num_constant, hidden_size) if self.num_constant else None
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.num_shared_experts:
            size = (config.shared_expert_intermediate_size or intermediate_size) * config.num_shared_experts
            self.shared_expert = (GatedMLP if gated else PlainMLP)(hidden_size, size, hidden_act)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        # MoE++'s gating residual (``gating_residual``): linked by :func:`link_gating_residuals` once the model has
        # all its blocks; the first block has none.
        self.gating_chain: GatingResidualChain | None = None
        self.gating_position = 0
        self.gating_residual: nn.Linear | None = None
        self.shared_expert_router = None
        if config.shared_expert_routing:
            if not gated:
                raise ValueError(
                    "shared_expert_routing weighs each shared expert separately, which needs gated shared experts "
                    "(SwiGLU); this layer's FFN is a plain MLP with a bias that the fused shared experts share."
                )
            self.shared_expert_router = nn.Linear(hidden_size, config.num_shared_experts, bias=False)

    @property
    def routes_variable_experts(self) -> bool:
        """Whether routing can leave empty (sentinel) slots that must be removed before the expert bank runs: a
        variable-k router, or a gate with more slots than the bank has experts (null or zero-computation experts).
        Derived on demand, so swapping :attr:`gate` (EvoMoE's switch to top-1) needs no bookkeeping."""
        return routes_variable_experts(self.config) or self.gate.num_experts > self.num_experts

    def current_capacity_factor(self) -> float | None:
        """``capacity_factor`` in training, ``eval_capacity_factor`` (or else ``capacity_factor``) at eval."""
        if self.training or self.config.eval_capacity_factor is None:
            return self.config.capacity_factor
        return self.config.eval_capacity_factor

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router plus capacity: ``(logits (T, S), weights (T, K), indices (T, K))`` over all ``S`` slots; with
        gating residuals, the logits include the previous MoE block's through :attr:`gating_residual`."""
        self.gate.logit_offset = self._gating_offset(hidden_states.shape[0])
        try:
            logits, weights, indices = self.gate(hidden_states)
        finally:
            self.gate.logit_offset = None
        if self.gating_chain is not None:
            self.gating_chain.record(self.gating_position, logits)
        factor = self.current_capacity_factor()
        if factor is not None:
            slots = logits.shape[-1]
            capacity = expert_capacity(indices.shape[0], slots, indices.shape[1], factor, self.config.min_capacity)
            indices, weights = drop_over_capacity(indices, weights, slots, capacity, self.renormalize)
        return logits, weights, indices

    def _gating_offset(self, num_tokens: int) -> torch.Tensor | None:
        if self.gating_residual is None:
            return None
        previous = self.gating_chain.logits.get(self.gating_position - 1)
        if previous is None or previous.shape[0] != num_tokens:
            raise RuntimeError(
                f"MoE block {self.gating_position} has a gating residual but the previous MoE block routed "
                f"{'nothing' if previous is None else previous.shape[0]} tokens in this forward (expected "
                f"{num_tokens}): gating residuals need the model's MoE blocks to run in order on the same tokens."
            )
        return self.gating_residual(previous.to(self.gating_residual.weight.dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        logits, weights, indices = self.route(x)
        report_routing(logits, indices, self.gate)
        shared_weights = None
        if self.shared_expert_router is not None:
            weights, shared_weights = self._weights_with_shared_experts(x, logits, indices)
        weights = weights.to(x.dtype)
        output = self._run_ffn_experts(x, indices, weights)
        if self.num_copy or self.num_constant:
            output = output + self._zero_computation_experts(x, indices, weights)
        if shared_weights is not None:
            output = output + self.shared_expert(x, shared_weights)
        elif self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            output = output + shared
        return output.reshape(shape)

    def _weights_with_shared_experts(
        self, x: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """UniMoE-Audio's weights: one softmax per token over the logits of its selected slots (empty ones left out)
        and of every shared expert; returns ``(routed (T, K), shared (T, num_shared))``, summing to 1 per token."""
        slots, dtype = logits.shape[-1], routing_dtype(x)
        empty = indices >= slots
        selected = logits.to(dtype).gather(-1, indices.clamp(max=slots - 1)).masked_fill(empty, float("-inf"))
        shared = nn.functional.linear(x.to(dtype), self.shared_expert_router.weight.to(dtype))
        joint = torch.softmax(torch.cat([selected, shared], dim=-1), dim=-1)
        return joint[:, : indices.shape[1]], joint[:, indices.shape[1] :]

    def _run_ffn_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        has_empty_slots = self.routes_variable_experts or self.current_capacity_factor() is not None
        # Under transformers' expert parallelism (``ep_dispatch_experts``) the bank's forward sends every index to the
        # rank owning that expert, and an empty slot's index names no rank; so those pairs are flattened too.
        expert_parallel = getattr(self.experts, "_is_expert_parallel", False)
        if not has_empty_slots or (self.config._experts_implementation in SKIPS_EMPTY_SLOTS and not expert_parallel):
            return self.experts(x, indices, weights)
        # Variable experts per token, for an implementation that would compute empty slots: hand it only the real
        # (token, expert) pairs, one per row, as a dense (P, 1) routing.
        routed = indices < self.num_experts
        token_ids, slot_ids = routed.nonzero(as_tuple=True)
        pair_out = self.experts(x[token_ids], indices[token_ids, slot_ids, None], weights[token_ids, slot_ids, None])
        return torch.zeros_like(x).index_add(0, token_ids, pair_out)

    def _zero_computation_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        first_copy = self.num_experts
        first_constant = first_copy + self.num_copy
        slot_weights = torch.zeros(x.shape[0], first_constant + self.num_constant + 1, dtype=x.dtype, device=x.device)
        in_range = indices < slot_weights.shape[1] - 1
        slot_weights.scatter_add_(1, torch.where(in_range, indices, slot_weights.shape[1] - 1), weights)
        output = slot_weights[:, first_copy:first_constant].sum(dim=-1, keepdim=True) * x
        if self.constant_experts is not None:
            output = output + self.constant_experts(x, slot_weights[:, first_constant:-1])
        return output

    def reset_routing(self, std: float) -> None:
        """A fresh router (normal(0, std) weights, no bias or loads) and fresh zero-computation experts and shared
        expert gate; the expert bank and the shared expert are left alone (upcycling copies them)."""
        self.gate.reset_parameters(std)
        if self.constant_experts is not None:
            self.constant_experts.reset_parameters(std)
        if self.shared_expert_gate is not None:
            init.normal_(self.shared_expert_gate.weight, mean=0.0, std=std)
        if self.shared_expert_router is not None:
            init.normal_(self.shared_expert_router.weight, mean=0.0, std=std)
        if self.gating_residual is not None:  # zero: a fresh gating residual leaves the routing as it was
            init.zeros_(self.gating_residual.weight)
