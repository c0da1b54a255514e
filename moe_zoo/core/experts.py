"""Expert banks stored as 3D tensors in transformers' layout, and the small always-on / zero-computation experts.

``GatedExperts`` (SwiGLU-style): ``gate_up_proj (E, 2I, H)`` holding ``[gate; up]`` and ``down_proj (E, H, I)``;
expert ``e`` computes ``down_e(act(gate_e x) * up_e x)``, exactly like ``MixtralExperts`` / ``Qwen3MoeExperts``.
``PlainExperts`` (GELU MLP with biases, Phi's ``fc1``/``fc2``): ``up_proj (E, I, H)`` + ``up_proj_bias (E, I)`` and
``down_proj (E, H, I)`` + ``down_proj_bias (E, H)``.

The ``*Base`` classes carry the weights and the eager forward. transformers only lets a model switch its experts
implementation (``eager`` / ``batched_mm`` / ``grouped_mm`` / anything registered in ``ExpertsInterface``) when the
text ``@use_experts_implementation`` appears in the file that defines the model class, so every modeling file
declares one-line decorated subclasses of these bases (with :data:`GATED_LAYOUT` / :data:`PLAIN_LAYOUT`). The
decorated ``GatedExperts`` / ``PlainExperts`` below are for using the core on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

GATED_LAYOUT: dict[str, bool] = {}
"""Keyword arguments of ``use_experts_implementation`` for :class:`GatedExpertsBase` (the defaults)."""
PLAIN_LAYOUT: dict[str, bool] = {"has_gate": False, "has_bias": True}
"""Keyword arguments of ``use_experts_implementation`` for :class:`PlainExpertsBase`."""


@dataclass
class ExpertGroups:
    """The routed (token, slot) pairs of a ``(tokens, k)`` expert-index tensor, sorted by expert with one stable sort.

    ``pairs`` are flat indices into the index tensor (``token * k + slot``), ``tokens`` their token rows, both in
    expert order (tokens ascending within an expert); ``counts[e]`` is how many pairs expert ``e`` got. Empty slots
    (any index ``>= num_experts``) sort last and are left out.
    """

    pairs: torch.Tensor
    tokens: torch.Tensor
    counts: list[int]

    def spans(self) -> Iterator[tuple[int, slice]]:
        """``(expert, slice into pairs / tokens)`` for every expert with at least one pair."""
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                yield expert, slice(start, start + count)
            start += count


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Group the routed pairs of ``top_k_index`` by expert: one sort and one host sync for the counts, instead of a
    mask per expert. Every loop over experts (expert banks, LoRA experts) goes through this."""
    top_k = top_k_index.shape[-1]
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    counts = torch.bincount(flat_index, minlength=num_experts + 1)[:num_experts].tolist()
    pairs = order[: sum(counts)]
    return ExpertGroups(pairs=pairs, tokens=pairs // top_k, counts=counts)


def run_each_expert(
    expert_forward: Callable[[int, torch.Tensor], torch.Tensor],
    num_experts: int,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The eager expert loop: ``expert_forward(e, x_e)`` on each expert's contiguous slice of the sorted pairs, the
    outputs weighted by their routing weights and summed per token. Full-precision and quantized banks share it;
    only how one expert computes differs."""
    groups = group_by_expert(top_k_index, num_experts)
    expert_inputs = hidden_states[groups.tokens]
    outputs = [expert_forward(expert, expert_inputs[span]) for expert, span in groups.spans()]
    final = torch.zeros_like(hidden_states)
    if not outputs:
        return final
    dtype = hidden_states.dtype
    weighted = torch.cat(outputs).to(dtype) * top_k_weights.reshape(-1)[groups.pairs, None].to(dtype)
    return final.index_add(0, groups.tokens, weighted)


class _ExpertBank(nn.Module):
    """What both layouts share: sizes, activation and the eager forward.

    The eager forward sorts the token-expert pairs by expert once and runs each expert on its contiguous slice, so
    it loops over experts (a handful), never over tokens. Sentinel indices (``>= num_experts``) are skipped.
    """

    def __init__(self, config: Any, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.act_fn = ACT2FN[hidden_act]

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self, std: float) -> None:
        """Random experts (normal(0, std) weights, zero biases), as transformers initialises MoE experts; tensors
        already loaded from a checkpoint are left alone."""
        for name, param in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                init.zeros_(param)
            else:
                init.normal_(param, mean=0.0, std=std)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return run_each_expert(self.expert_forward, self.num_experts, hidden_states, top_k_index, top_k_weights)


class GatedExpertsBase(_ExpertBank):
    """Gated (SwiGLU) experts: ``down(act(gate(x)) * up(x))`` per expert, no biases."""

    def __init__(self, config: Any, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__(config, num_experts, hidden_size, intermediate_size, hidden_act)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = nn.functional.linear(hidden_states, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])


class PlainExpertsBase(_ExpertBank):
    """Plain two-layer experts with biases: ``down(act(up(x) + b1)) + b2`` per expert (Phi, GPT-style MLPs)."""

    def __init__(self, config: Any, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__(config, num_experts, hidden_size, intermediate_size, hidden_act)
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(nn.functional.linear(hidden_states, self.up_proj[expert], self.up_proj_bias[expert]))
        return nn.functional.linear(hidden, self.down_proj[expert], self.down_proj_bias[expert])


@use_experts_implementation(**GATED_LAYOUT)
class GatedExperts(GatedExpertsBase):
    pass


@use_experts_implementation(**PLAIN_LAYOUT)
class PlainExperts(PlainExpertsBase):
    pass


class GatedMLP(nn.Module):
    """A single gated FFN (``gate_proj``/``up_proj``/``down_proj``), used as an always-on shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor, chunk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``chunk_weights (T, C)`` weighs ``C`` equal slices of the intermediate layer, i.e. ``C`` shared experts
        fused into this one FFN (``down`` is linear, so scaling a slice scales that expert's output): UniMoE-Audio
        routes its shared experts with per-token weights."""
        hidden = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        if chunk_weights is not None:
            chunks = chunk_weights.shape[-1]
            hidden = (hidden.unflatten(-1, (chunks, -1)) * chunk_weights[..., None].to(hidden.dtype)).flatten(-2)
        return self.down_proj(hidden)


class PlainMLP(nn.Module):
    """A single plain FFN with biases (``fc1``/``fc2``), used as an always-on shared expert for Phi-style models."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn(self.fc1(hidden_states)))


class ConstantExperts(nn.Module):
    """MoE++'s constant experts: expert ``c`` returns ``a1 * x + a2 * v_c`` with ``(a1, a2) = softmax(W_c x)``.

    ``mix`` holds the ``W_c`` as one ``(C, 2, H)`` tensor and ``vectors`` the ``v_c`` as ``(C, H)``, so all ``C``
    constant experts run in one batched matmul.
    """

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(num_experts, 2, hidden_size))
        self.vectors = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def reset_parameters(self, std: float) -> None:
        init.normal_(self.mix, mean=0.0, std=std)
        init.normal_(self.vectors, mean=0.0, std=std)

    def forward(self, hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states (T, H)``, ``weights (T, C)`` routing weight of each constant expert -> ``(T, H)``."""
        alphas = torch.softmax(torch.einsum("th,cah->tca", hidden_states, self.mix), dim=-1)  # (T, C, 2)
        per_expert = alphas[..., :1] * hidden_states[:, None, :] + alphas[..., 1:] * self.vectors  # (T, C, H)
        return torch.einsum("tc,tch->th", weights.to(per_expert.dtype), per_expert)
