"""Expert pruning: keep, in every MoE block, the experts a domain needs, and drop the rest from the checkpoint.

:func:`select_experts` ranks each block's experts by a statistic of :class:`ExpertStatistics` (EASY-EP's
output-aware ``importance`` by default, or ``gate_mass`` / ``counts`` for frequency-based pruning) and keeps the
best ``num_keep``; :func:`prune_experts` removes the others in place: the expert bank's tensors and the router's
rows (and MoE++ gating-residual rows and columns) of the dropped experts go, the routed slots of zero-computation
and null experts stay, and the config's
``num_experts`` (and ``num_experts_per_tok`` if it exceeds what is left) follow, so ``save_pretrained`` writes a
smaller checkpoint that ``from_pretrained`` loads as it is. :func:`easy_ep_prune` does both from a few
demonstrations of the target domain (EASY-EP, Dong et al. 2025).

Every MoE block keeps the same number of experts: the blocks share one config, whose ``num_experts`` sizes them all
when the checkpoint is loaded. A token whose chosen experts all survive is computed exactly as before when the
router renormalises its top-k weights (``norm_topk_prob``); otherwise its routing changes, which is what the
domain's demonstrations are meant to make rare.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.block import SparseMoeBlock
from ..core.routing import Router
from .expert_statistics import ExpertStatistics, collect_expert_statistics

CRITERIA = ("importance", "gate_mass", "counts")
_ROUTER_SLOT_BUFFERS = ("selection_bias", "pending_load")


def select_experts(stats: ExpertStatistics, num_keep: int, criterion: str = "importance") -> dict[str, list[int]]:
    """The ``num_keep`` best experts of every block by ``criterion`` (ties broken by the lower index), sorted."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    table = getattr(stats, criterion)
    keep = {}
    for name, scores in table.items():
        if not 1 <= num_keep <= scores.numel():
            raise ValueError(f"num_keep must be between 1 and the {scores.numel()} experts of {name}, got {num_keep}.")
        order = sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))
        keep[name] = sorted(order[:num_keep])
    return keep


def _slice_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return tensor.detach().index_select(0, rows.to(tensor.device)).clone()


@torch.no_grad()
def _prune_block(block: SparseMoeBlock, kept: list[int]) -> torch.Tensor:
    """Prune one block in place; returns the router slots it kept (old slot indices, in their new order)."""
    router = block.gate
    if not isinstance(router, Router):
        raise ValueError(
            f"Pruning needs a linear router (top-k, top-p, dense-to-sparse, bias-balanced); this block has "
            f"{type(router).__name__}, whose expert slots DynMoE's adaptive process switches on and off instead."
        )
    num_experts = block.num_experts
    if len(set(kept)) != len(kept) or not all(0 <= e < num_experts for e in kept):
        raise ValueError(f"Experts to keep must be distinct indices in 0..{num_experts - 1}, got {kept}.")
    expert_rows = torch.tensor(kept, dtype=torch.long)
    # Router slots: [FFN experts | copy | constant | zero | null]; only FFN experts are pruned.
    slot_rows = torch.cat([expert_rows, torch.arange(num_experts, router.num_experts)])
    router.weight = nn.Parameter(_slice_rows(router.weight, slot_rows), requires_grad=router.weight.requires_grad)
    for name in _ROUTER_SLOT_BUFFERS:
        if name in router._buffers:
            router._buffers[name] = _slice_rows(router._buffers[name], slot_rows)
    for name, param in list(block.experts.named_parameters(recurse=False)):
        setattr(block.experts, name, nn.Parameter(_slice_rows(param, expert_rows), requires_grad=param.requires_grad))
    router.num_experts = slot_rows.numel()
    router.top_k = min(router.top_k, len(kept))
    block.experts.num_experts = block.num_experts = len(kept)
    block.top_k = min(block.top_k, len(kept))
    return slot_rows


@torch.no_grad()
def _prune_gating_residuals(blocks: list[SparseMoeBlock], slots: list[torch.Tensor]) -> None:
    """MoE++'s gating residual of block ``p`` maps block ``p - 1``'s slots into its own: keep the rows of this
    block's surviving slots and the columns of the previous block's."""
    for position, block in enumerate(blocks):
        if block.gating_residual is None:
            continue
        residual = block.gating_residual
        previous_slots = slots[block.gating_position - 1].to(residual.weight.device)
        kept = _slice_rows(residual.weight, slots[position]).index_select(1, previous_slots)
        residual.weight = nn.Parameter(kept, requires_grad=residual.weight.requires_grad)
        residual.out_features, residual.in_features = kept.shape


def prune_experts(model: nn.Module, keep: Mapping[str, list[int]]) -> nn.Module:
    """Keep only ``keep[name]`` (expert indices) in the MoE block ``name`` of ``model``, for every MoE block; returns
    ``model``, pruned in place, with its config's ``num_experts`` / ``num_experts_per_tok`` updated.

    Raises ``ValueError`` when a block is missing from ``keep`` or ``keep`` names no block, when blocks would keep
    different numbers of experts, or for a router without per-expert rows (DynMoE's top-any).
    """
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, SparseMoeBlock)}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no moe_zoo MoE block (SparseMoeBlock) to prune.")
    if set(keep) != set(blocks):
        missing, unknown = sorted(set(blocks) - set(keep)), sorted(set(keep) - set(blocks))
        raise ValueError(f"keep must name every MoE block: missing {missing}, not MoE blocks {unknown}.")
    sizes = {len(kept) for kept in keep.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"Every MoE block must keep the same number of experts (they share the config's num_experts); got "
            f"{ {name: len(kept) for name, kept in keep.items()} }."
        )
    configs = {id(block.config): block.config for block in blocks.values()}
    slots = [_prune_block(block, list(keep[name])) for name, block in blocks.items()]
    _prune_gating_residuals(list(blocks.values()), slots)
    (num_keep,) = sizes
    for config in configs.values():
        config.num_experts = num_keep
        config.num_experts_per_tok = min(config.num_experts_per_tok, num_keep)
    return model


def easy_ep_prune(
    model: nn.Module,
    demonstrations: Iterable[Mapping[str, Any]],
    num_keep: int,
    token_weighting: str = "contribution",
    progress: bool = True,
) -> tuple[nn.Module, ExpertStatistics, dict[str, list[int]]]:
    """EASY-EP: collect the output-aware expert importance on ``demonstrations`` (batches of model inputs from the
    target domain), keep the ``num_keep`` most important experts of every block, prune the others. Returns the
    pruned ``model`` (in place), the statistics and the kept experts per block."""
    stats = collect_expert_statistics(model, demonstrations, token_weighting=token_weighting, progress=progress)
    keep = select_experts(stats, num_keep, "importance")
    return prune_experts(model, keep), stats, keep
