"""A ``Trainer`` that logs what the routers do: the aux loss and the expert load, next to the loss.

The Trainer logs only ``loss``; an MoE run also needs to show whether its routers balance. Every training forward
runs inside :func:`~moe_zoo.core.recording.collect_routing`, so every moe-zoo router (MoE blocks, MixLoRA FFNs)
reports to it whatever model wraps it. At each logging step the trainer adds:

- ``aux_loss``: the mean unweighted load-balancing loss the model returned (``outputs.aux_loss``), if it returns one;
- ``expert_load_max_ratio``: the most-loaded expert's share over the mean share, averaged over MoE layers, for the
  tokens since the last log (1.0 is perfect balance, E means one expert took every token). Padding never counts.

:attr:`RoutingStatsTrainer.expert_counts` keeps the ``(layers, experts)`` assignment counts of the whole run, summed
over processes, for plots and reports.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from ..core.recording import collect_routing
from .expert_load import counted_positions, routed_counts


def max_load_ratio(counts: torch.Tensor) -> float:
    """Mean over layers of ``max_e load_e / mean_e load_e`` for ``(layers, experts)`` counts."""
    mean = counts.mean(dim=-1).clamp_min(1e-9)
    return (counts.max(dim=-1).values / mean).mean().item()


class RoutingStatsTrainer(Trainer):
    """``Trainer`` that adds ``aux_loss`` and ``expert_load_max_ratio`` to its logs (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_counts: torch.Tensor | None = None
        self._window_counts: torch.Tensor | None = None
        self._window_aux: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with collect_routing() as routing:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if model.training:
            self._record(routing, inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    def _record(self, routing, inputs, outputs) -> None:
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if aux is not None:
            self._window_aux.append(float(aux.detach()))
        if routing:
            counts = routed_counts(routing, counted_positions(inputs))
            self._window_counts = counts if self._window_counts is None else self._window_counts + counts

    def _global(self, counts: torch.Tensor) -> torch.Tensor:
        """Counts summed over all processes (each process routes its own shard of the batch)."""
        if self.accelerator.num_processes == 1:
            return counts
        return self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum").cpu()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            if self._window_aux:
                aux = torch.tensor(sum(self._window_aux) / len(self._window_aux))
                if self.accelerator.num_processes > 1:
                    aux = self.accelerator.reduce(aux.to(self.accelerator.device), reduction="mean").cpu()
                logs["aux_loss"] = round(aux.item(), 6)
            if self._window_counts is not None:
                window = self._global(self._window_counts)
                logs["expert_load_max_ratio"] = round(max_load_ratio(window), 4)
                self.expert_counts = window if self.expert_counts is None else self.expert_counts + window
            self._window_aux, self._window_counts = [], None
        super().log(logs, *args, **kwargs)
