"""A ``Trainer`` that logs what the routers do: the aux loss and the expert load, next to the loss.

The Trainer logs only ``loss``; an MoE run also needs to show whether its routers balance. Every moe-zoo router
(:class:`~moe_zoo.core.routing.Router`: MoE blocks, MixLoRA FFNs, SMoRA's rank routers) returns ``(logits, weights,
indices)``, so a forward hook on each router counts the experts it chose for the real (non-padding) tokens of every
training forward, whatever model wraps it. At each logging step the trainer adds:

- ``aux_loss``: the mean unweighted load-balancing loss the model returned (``outputs.aux_loss``), if it returns one;
- ``expert_load_max_ratio``: the most-loaded expert's share over the mean share, averaged over routers, for the
  tokens since the last log (1.0 is perfect balance; E means one expert took every token).

:attr:`RoutingStatsTrainer.expert_counts` keeps each router's assignment counts over the whole run, summed over
processes, for plots and reports. Counts are taken from the routers' choices (before an MoE block's capacity drops
tokens), and forwards re-run by activation checkpointing during backward are not counted twice.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from ..core.routing import Router
from .expert_load import counted_positions


def max_load_ratio(counts: list[torch.Tensor]) -> float:
    """Mean over routers of ``max_e load_e / mean_e load_e`` (``nan`` without counts)."""
    ratios = [c.max() / c.mean().clamp_min(1e-9) for c in counts if c.numel()]
    return torch.stack(ratios).mean().item() if ratios else float("nan")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing re-runs forwards there)."""
    return torch._C._current_graph_task_id() != -1


class RoutingStatsTrainer(Trainer):
    """``Trainer`` that adds ``aux_loss`` and ``expert_load_max_ratio`` to its logs (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_counts: dict[str, torch.Tensor] = {}
        self._window_counts: dict[str, torch.Tensor] = {}
        self._window_aux: list[float] = []
        self._positions: torch.Tensor | None = None
        for name, module in self.model.named_modules():
            if isinstance(module, Router):
                module.register_forward_hook(self._count_hook(name))

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
            self._window_aux.append(float(aux.detach()))
        return (loss, outputs) if return_outputs else loss

    def _reduced_over_processes(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """``tensor`` reduced (``"sum"`` or ``"mean"``) over all processes; each routes its own shard of the batch."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction=reduction).cpu()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            if self._window_aux:
                aux = torch.tensor(sum(self._window_aux) / len(self._window_aux))
                logs["aux_loss"] = round(self._reduced_over_processes(aux, "mean").item(), 6)
            if self._window_counts:
                window = {name: self._reduced_over_processes(c) for name, c in sorted(self._window_counts.items())}
                logs["expert_load_max_ratio"] = round(max_load_ratio(list(window.values())), 4)
                for name, counts in window.items():
                    previous = self.expert_counts.get(name)
                    self.expert_counts[name] = counts if previous is None else previous + counts
            self._window_aux, self._window_counts = [], {}
        super().log(logs, *args, **kwargs)
