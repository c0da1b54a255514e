"""A ``Trainer`` that logs what the routers do: the aux loss and the expert load, next to the loss.

The Trainer logs only ``loss``; an MoE run also needs to show whether its routers balance. Every moe-zoo router
(:class:`~moe_zoo.core.routing.Router`: MoE blocks, MixLoRA FFNs, SMoRA's rank routers) returns ``(logits, weights,
indices)``, so a forward hook on each router counts the experts it chose for the real (non-padding) tokens of every
training forward, whatever model wraps it. At each logging step the trainer adds:

- ``aux_loss``: the mean of the ``outputs.aux_loss`` the model returned, if it returns one (MixLoRA's unweighted
  load-balancing loss; moe-zoo MoE models' router loss, weighted by its coefficient);
- ``expert_load_max_ratio``: the most-loaded expert's share over the mean share, averaged over routers, for the
  tokens since the last log (1.0 is perfect balance; E means one expert took every token).

:attr:`RoutingStatsTrainer.expert_counts` keeps each router's assignment counts over the whole run, summed over
processes, for plots and reports. Counts are taken from the routers' choices (before an MoE block's capacity drops
tokens), and forwards re-run by activation checkpointing during backward are not counted twice.

Under ``torchrun`` / ``accelerate launch`` (DDP or FSDP) every process routes its own shard of the batch, so both
figures are reduced over processes before they are logged (only when ``torch.distributed`` is initialised): the
counts are summed, so ``expert_load_max_ratio`` and :attr:`~RoutingStatsTrainer.expert_counts` are those of the
global batch, exactly as one process with the whole batch counts them; ``aux_loss`` is the mean over every
process's forwards, which is what the optimiser sees (each process's aux loss weighs ``1 / processes`` in DDP's
gradient average). It equals the single-process aux loss of the whole batch only approximately: the loss is a
product of per-batch means (``E * sum_e f_e * P_e``), so the mean over shards differs from the value on their union
(by up to 5e-4 on the tiny models of ``tests/test_distributed.py``), as it does in DeepSpeed-MoE and the original
MoE-LLaVA, which also balance per device. The trainer is a
:class:`~moe_zoo.training.distributed.DistributedTrainer`: the router loss weighs the same in any number of
processes (:meth:`RoutingStatsTrainer.batch_mean_loss_term`), and FSDP2 works on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ..core.routing import Router
from ..modeling.moe_backbone import MoeModelMixin
from ..peft import MixLoraConfig
from .distributed import DistributedTrainer, WindowStats, all_reduce_sum
from .expert_load import counted_positions


def max_load_ratio(counts: list[torch.Tensor]) -> float:
    """Mean over routers of ``max_e load_e / mean_e load_e`` (``nan`` without counts)."""
    ratios = [c.max() / c.mean().clamp_min(1e-9) for c in counts if c.numel()]
    return torch.stack(ratios).mean().item() if ratios else float("nan")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing re-runs forwards there)."""
    return torch._C._current_graph_task_id() != -1


def router_loss_term(model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
    """The router loss that ``model`` added to ``outputs.loss`` (``None`` if it added none).

    - a MixLoRA PEFT model adds ``router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`` when labels are
      given (its ``aux_loss`` output is unweighted);
    - moe-zoo's MoE models (MoE-LLaVA, Uni-MoE, upcycled models) add ``aux_loss``, already weighted by
      :func:`moe_zoo.core.router_aux_loss`, whenever they return a loss;
    - transformers' MoE models add ``router_aux_loss_coef * aux_loss`` when labels are given.
    """
    if not hasattr(outputs, "get") or outputs.get("loss") is None or outputs.get("aux_loss") is None:
        return None
    aux = outputs["aux_loss"]
    if isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapter]
        if isinstance(config, MixLoraConfig):
            if inputs.get("labels") is None:
                return None
            term = config.router_aux_loss_coef * aux
            if config.router_z_loss_coef and outputs.get("z_loss") is not None:
                term = term + config.router_z_loss_coef * outputs["z_loss"]
            return term
        model = model.get_base_model()
    if isinstance(model, MoeModelMixin):
        return aux
    coefficient = getattr(getattr(model, "config", None), "router_aux_loss_coef", None)
    if coefficient and inputs.get("labels") is not None:
        return coefficient * aux
    return None


class RoutingStatsTrainer(DistributedTrainer):
    """``Trainer`` that adds ``aux_loss`` and ``expert_load_max_ratio`` to its logs (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_counts: dict[str, torch.Tensor] = {}
        self._window_counts: dict[str, torch.Tensor] = {}
        self._window = WindowStats()
        self._positions: torch.Tensor | None = None
        self._router_slots: dict[str, int] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, Router):
                module.register_forward_hook(self._count_hook(name))
                self._router_slots[name] = module.num_experts

    def _count_hook(self, name: str):
        def count(module: nn.Module, inputs, output) -> None:
            if not module.training or _in_backward():
                return
            logits, _, indices = output
            slots = logits.shape[-1]
            positions = self._positions
            if positions is not None and positions.numel() == indices.shape[0]:
                indices = indices[positions.to(indices.device)]
            indices = indices[indices < slots].detach()
            counts = torch.bincount(indices.reshape(-1).cpu(), minlength=slots).float()
            previous = self._window_counts.get(name)
            self._window_counts[name] = counts if previous is None else previous + counts

        return count

    def batch_mean_loss_term(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """The router loss in the model's loss (:func:`router_loss_term`): a mean over this process's batch."""
        return router_loss_term(self.accelerator.unwrap_model(model), inputs, outputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._positions = counted_positions(inputs)
        try:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        finally:
            self._positions = None
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if model.training and aux is not None:
            self._window.add("aux_loss", float(aux.detach()))
        return (loss, outputs) if return_outputs else loss

    def _global_window_counts(self) -> dict[str, torch.Tensor]:
        """This window's counts of every router, summed over processes in one collective. Every process reduces
        the same tensor (all routers of the model, zeros for one that routed nothing there), whatever it routed, so
        none waits for a collective another skipped; routers that routed nothing anywhere are left out."""
        names = list(self._router_slots)
        if not names:
            return {}
        local = [self._window_counts.get(name, torch.zeros(self._router_slots[name])) for name in names]
        reduced = all_reduce_sum(torch.cat(local)).split([c.numel() for c in local])
        return {name: counts for name, counts in zip(names, reduced, strict=True) if counts.sum() > 0}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the window's global aux loss and expert load to a training log line (all processes log each line, so
        the reductions here are collectives every process joins)."""
        if "loss" in logs:
            means = self._window.global_means(["aux_loss"])
            if "aux_loss" in means:
                logs["aux_loss"] = round(means["aux_loss"], 6)
            window = self._global_window_counts()
            if window:
                logs["expert_load_max_ratio"] = round(max_load_ratio(list(window.values())), 4)
                for name, counts in window.items():
                    previous = self.expert_counts.get(name)
                    self.expert_counts[name] = counts if previous is None else previous + counts
            self._window_counts = {}
        super().log(logs, *args, **kwargs)
