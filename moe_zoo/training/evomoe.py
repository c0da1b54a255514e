"""EvoMoE's training recipe: expert-diversify, then gate-sparsify (Nie et al., "EvoMoE: An Evolutional Mixture-of-
Experts Training Framework via Dense-To-Sparse Gate").

1. **Expert-diversify.** One expert is trained first: the dense model, whose FFN is that expert. Its copies then
   become the experts of an MoE, each spawned from it with a random mask (:func:`diversify_experts`), so the experts
   start related but different instead of identical (identical copies get identical gradients from a uniform
   router and stay alike).
2. **Gate-sparsify.** The MoE trains with the dense-to-sparse gate (``router_type="dense_to_sparse"``): a
   Gumbel-softmax whose temperature anneals from ``gumbel_tau_max`` to ``gumbel_tau_min``, experts used while their
   gate exceeds ``gumbel_selection_threshold``, so routing goes from nearly dense to sparse.
3. Optionally (``switch_to_top1=True``) the gate then becomes a plain top-1 router with the same weights
   (:func:`switch_to_top1`), as EvoMoE switches to hard routing at the end.

:func:`run_evomoe` runs the three with the ``Trainer`` and returns the final model and the phases' trainers.
What EvoMoE's masks are exactly (their granularity and ratio) was not available to us: here each expert after the
first keeps every weight of the trained FFN with probability ``1 - mask_ratio`` and zeroes the others, elementwise,
with its own seeded mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..core.block import SparseMoeBlock
from ..core.routing import DenseToSparseRouter, build_router
from ..modeling.upcycled_moe import upcycle
from .routing_stats import RoutingStatsTrainer


@dataclass
class EvoMoeArguments:
    """The recipe's options (the phases' Trainer options come from ``TrainingArguments``)."""

    num_experts: int = 4
    moe_layers: str = "all"
    diversify_steps: int = 100
    sparsify_steps: int = 200
    mask_ratio: float = 0.5
    gumbel_tau_max: float = 1.0
    gumbel_tau_min: float = 0.5
    gumbel_selection_threshold: float = 1e-3
    switch_to_top1: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio must be in [0, 1) (the share of weights each copy zeroes), got {self.mask_ratio}."
            )
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2 (the trained expert and its copies), got {self.num_experts}.")
        if self.diversify_steps < 0 or self.sparsify_steps < 1:
            raise ValueError(
                f"diversify_steps must be >= 0 and sparsify_steps >= 1, got {self.diversify_steps}, {self.sparsify_steps}."
            )


@torch.no_grad()
def diversify_experts(model: torch.nn.Module, mask_ratio: float, seed: int = 0) -> None:
    """Make every expert after the first of each MoE block a randomly masked copy of the first (see the module
    docstring): expert ``e >= 1`` keeps each weight of expert 0 with probability ``1 - mask_ratio``, zero otherwise
    (biases are kept whole). Expert 0 is left as it is. Seeded, so every process spawns the same experts."""
    generator = torch.Generator().manual_seed(seed)
    for block in (m for m in model.modules() if isinstance(m, SparseMoeBlock)):
        for name, param in block.experts.named_parameters(recurse=False):
            if name.endswith("_bias"):
                param[1:] = param[0]
                continue
            shape = param[0].shape
            for expert in range(1, param.shape[0]):
                keep = torch.rand(shape, generator=generator) >= mask_ratio
                param[expert] = param[0] * keep.to(param.device, param.dtype)


@torch.no_grad()
def switch_to_top1(model: PreTrainedModel) -> PreTrainedModel:
    """Replace every dense-to-sparse gate of ``model`` by a ``softmax_topk`` router with top-1 and the same weights
    (and update the config, so the checkpoint loads as such); returns ``model``."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock) and isinstance(m.gate, DenseToSparseRouter)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no dense-to-sparse gate to switch to top-1.")
    config = blocks[0].config
    config.router_type, config.num_experts_per_tok = "softmax_topk", 1
    for block in blocks:
        old = block.gate
        new = build_router(config, block.hidden_size).to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight)
        new.selection_bias.copy_(old.selection_bias)
        block.gate, block.top_k = new, 1
    return model


def _phase_args(training_args: TrainingArguments, name: str, steps: int) -> TrainingArguments:
    return dataclasses.replace(training_args, output_dir=str(Path(training_args.output_dir) / name), max_steps=steps)


def run_evomoe(
    dense: PreTrainedModel,
    train_dataset: Any,
    training_args: TrainingArguments,
    args: EvoMoeArguments,
    data_collator: Any = None,
    processing_class: Any = None,
) -> tuple[PreTrainedModel, dict[str, Trainer]]:
    """EvoMoE on ``dense`` (trained in place in phase 1): returns the MoE after gate-sparsify (top-1 with
    ``switch_to_top1``) and the phases' trainers (``"diversify"`` when ``diversify_steps`` > 0, ``"sparsify"``).
    Each phase writes its checkpoints under ``output_dir/<phase>``; the final model is saved in ``output_dir``."""
    common = dict(train_dataset=train_dataset, data_collator=data_collator, processing_class=processing_class)
    trainers: dict[str, Trainer] = {}
    if args.diversify_steps:
        trainers["diversify"] = Trainer(
            model=dense, args=_phase_args(training_args, "diversify", args.diversify_steps), **common
        )
        trainers["diversify"].train()
    torch.manual_seed(args.seed)
    moe = upcycle(
        dense,
        num_experts=args.num_experts,
        moe_layers=args.moe_layers,
        router_type="dense_to_sparse",
        gumbel_tau_max=args.gumbel_tau_max,
        gumbel_tau_min=args.gumbel_tau_min,
        gumbel_tau_decay_steps=args.sparsify_steps * training_args.gradient_accumulation_steps,
        gumbel_selection_threshold=args.gumbel_selection_threshold,
        output_router_logits=True,
    )
    diversify_experts(moe, args.mask_ratio, args.seed)
    trainers["sparsify"] = RoutingStatsTrainer(
        model=moe, args=_phase_args(training_args, "sparsify", args.sparsify_steps), **common
    )
    trainers["sparsify"].train()
    if args.switch_to_top1:
        switch_to_top1(moe)
    moe.config.output_router_logits = False
    if trainers["sparsify"].is_world_process_zero():
        moe.save_pretrained(training_args.output_dir)
        if processing_class is not None:
            processing_class.save_pretrained(training_args.output_dir)
    trainers["sparsify"].accelerator.wait_for_everyone()
    return moe, trainers
