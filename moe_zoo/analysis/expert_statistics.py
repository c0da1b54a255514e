"""Per-expert routing statistics of a model over a dataset: what every MoE block's experts received and contributed.

Expert analysis and pruning need more than the routers' choices that training logs count
(:mod:`moe_zoo.training.routing_stats`): how much routing weight each expert got, and how much it changed the tokens
it processed. :func:`collect_expert_statistics` runs the model over batches in eval mode with a forward hook on each
:class:`~moe_zoo.core.block.SparseMoeBlock` and accumulates, per block and routed FFN expert ``e``:

- ``counts[e]``: (token, expert) assignments (the routers' choices after capacity, on non-padding tokens);
- ``gate_mass[e]``: the sum of the combine weights ``g_{t,e}`` of those assignments;
- ``importance[e]``: the output-aware importance of EASY-EP (Dong et al. 2025, "Domain-Specific Pruning of Large
  Mixture-of-Experts Models with Few-shot Demonstrations"), ``sum_t w_t * g_{t,e} * ||E_e(x_t)||_2``: an expert
  matters for a domain in proportion to how much its weighted output moves that domain's tokens. ``w_t`` is 1
  (``token_weighting="uniform"``) or, by default, the token's contribution ``1 - cos(x_t, x_t + MoE(x_t))``
  (``"contribution"``): tokens the block barely changes say little about which experts the domain needs. This is
  moe-zoo's reading of the paper's token-contribution estimate (its exact formula was not available to us).

The expert outputs ``E_e(x_t)`` are recomputed per expert with the bank's ``expert_forward`` on the tokens routed
to it (one extra expert pass per block, no Python loop over tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..core.block import SparseMoeBlock
from ..core.experts import group_by_expert

TOKEN_WEIGHTINGS = ("contribution", "uniform")


@dataclass
class ExpertStatistics:
    """Accumulated per-expert statistics, keyed by the MoE block's module name (see the module docstring)."""

    token_weighting: str = "contribution"
    tokens: int = 0
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_mass: dict[str, torch.Tensor] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.counts)

    def load_share(self, layer: str) -> torch.Tensor:
        """Each expert's share of ``layer``'s assignments (sums to 1; uniform load is ``1 / E`` each)."""
        counts = self.counts[layer].double()
        return counts / counts.sum().clamp_min(1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_weighting": self.token_weighting,
            "tokens": self.tokens,
            "layers": {
                name: {
                    "counts": self.counts[name].tolist(),
                    "gate_mass": self.gate_mass[name].tolist(),
                    "importance": self.importance[name].tolist(),
                }
                for name in self.layers
            },
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def _add(self, name: str, counts: torch.Tensor, gate_mass: torch.Tensor, importance: torch.Tensor) -> None:
        for table, value in ((self.counts, counts), (self.gate_mass, gate_mass), (self.importance, importance)):
            table[name] = table[name] + value if name in table else value


def _token_weights(x: torch.Tensor, output: torch.Tensor, token_weighting: str) -> torch.Tensor:
    if token_weighting == "uniform":
        return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    after = (x + output).double()
    return (1.0 - nn.functional.cosine_similarity(x.double(), after, dim=-1)).clamp_min(0.0)


@torch.no_grad()
def block_statistics(
    block: SparseMoeBlock, x: torch.Tensor, output: torch.Tensor, keep: torch.Tensor | None, token_weighting: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts, gate_mass, importance)`` of one block's forward on ``x (T, H)`` with output ``(T, H)``; ``keep``
    (``(T,)`` bool) leaves padding tokens out. Exposed so that the definition can be checked on a single block."""
    if keep is not None:
        x, output = x[keep], output[keep]
    _, weights, indices = block.route(x)
    num_experts = block.num_experts
    token_weight = _token_weights(x, output, token_weighting)
    counts = torch.zeros(num_experts, dtype=torch.float64)
    gate_mass = torch.zeros(num_experts, dtype=torch.float64)
    importance = torch.zeros(num_experts, dtype=torch.float64)
    groups = group_by_expert(indices, num_experts)
    flat_weights = weights.reshape(-1).double()
    for expert, span in groups.spans():
        tokens, gates = groups.tokens[span], flat_weights[groups.pairs[span]]
        norms = block.experts.expert_forward(expert, x[tokens]).double().norm(dim=-1)
        counts[expert] = tokens.numel()
        gate_mass[expert] = gates.sum().cpu()
        importance[expert] = (token_weight[tokens] * gates * norms).sum().cpu()
    return counts, gate_mass, importance


def _token_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.reshape(-1).bool()


@torch.no_grad()
def collect_expert_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    token_weighting: str = "contribution",
    progress: bool = True,
) -> ExpertStatistics:
    """Run ``model`` (in eval mode, restored afterwards) on every batch (keyword inputs of its forward, e.g. a
    tokenizer's output) and return the :class:`ExpertStatistics` of its MoE blocks.

    Padding tokens (``attention_mask == 0``) are left out when the batch has a 2D mask that matches the blocks'
    token count; MoE-LLaVA's expanded image tokens count as the tokens they are.
    """
    if token_weighting not in TOKEN_WEIGHTINGS:
        raise ValueError(f"token_weighting must be one of {TOKEN_WEIGHTINGS}, got {token_weighting!r}.")
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, SparseMoeBlock)}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no moe_zoo MoE block (SparseMoeBlock) to collect statistics of.")
    stats = ExpertStatistics(token_weighting=token_weighting)
    current: dict[str, Any] = {}

    def hook(name: str):
        def record(block: SparseMoeBlock, args: tuple, output: torch.Tensor) -> None:
            x = args[0].reshape(-1, block.hidden_size)
            mask = current.get("mask")
            keep = mask.to(x.device) if mask is not None and mask.numel() == x.shape[0] else None
            stats._add(name, *block_statistics(block, x, output.reshape_as(x), keep, token_weighting))

        return record

    handles = [block.register_forward_hook(hook(name)) for name, block in blocks.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="Collecting expert statistics", disable=not progress, leave=False):
            current["mask"] = _token_mask(batch)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model(**inputs)
            mask = current["mask"]
            stats.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats
