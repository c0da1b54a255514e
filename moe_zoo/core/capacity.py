"""Expert capacity and token dropping with DeepSpeed's semantics (``deepspeed.moe.sharded_moe.top{1,2}gating``).

Each expert accepts at most ``capacity = max(ceil(T / E * capacity_factor * k), min_capacity)`` assignments, where
``T`` counts every routed token (padding included, as DeepSpeed does) and ``k`` is the number of choices per token.
Buffer slots are handed out choice by choice: **all first choices, in token order, before any second choice**, and
so on. An assignment whose slot is ``>= capacity`` is dropped. When the router renormalises its weights, the kept
weights of a token are renormalised again over what was kept (a token with one surviving choice gets weight 1); a
token with every choice dropped gets no expert output and only the residual carries it.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's capacity: ``max(ceil(T / E * capacity_factor * k), min_capacity)``.

    The product is rounded to fp32 as DeepSpeed computes it (``T / E`` times the fp32 tensor
    ``capacity_factor * k``), so factors that are not exact in binary (1.1, 1.2, ...) give DeepSpeed's capacity.
    """
    scaled = (num_tokens / num_experts) * torch.tensor(capacity_factor * top_k, dtype=torch.float32)
    return max(math.ceil(scaled.item()), min_capacity)


def buffer_positions(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slot of each assignment in its expert's buffer, filled choice-major then token order. Shape of ``indices``.

    Sentinel assignments (index ``num_experts``) get positions too, in a bin of their own, so they never take an
    expert's slot.
    """
    num_tokens, top_k = indices.shape
    choice_major = indices.t().reshape(-1)  # all first choices, then all second choices, ...
    one_hot = torch.nn.functional.one_hot(choice_major, num_experts + 1)
    positions = (one_hot.cumsum(dim=0) - 1).gather(-1, choice_major[:, None]).squeeze(-1)
    return positions.view(top_k, num_tokens).t()


def drop_over_capacity(
    indices: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace over-capacity assignments with the sentinel index (``num_experts``) and weight 0.

    Returns the new ``(indices, weights)``; with ``renormalize`` each token's kept weights are rescaled so that they
    sum to what all its weights summed to before dropping (1 for a renormalising router), the kept sum clamped at
    the dtype's eps as DeepSpeed does.
    """
    kept = (buffer_positions(indices, num_experts) < capacity) & (indices < num_experts)
    kept_weights = weights * kept
    if renormalize:
        eps = torch.finfo(weights.dtype).eps
        total = weights.sum(dim=-1, keepdim=True)
        kept_weights = kept_weights / kept_weights.sum(dim=-1, keepdim=True).clamp_min(eps) * total
    return torch.where(kept, indices, num_experts), kept_weights
