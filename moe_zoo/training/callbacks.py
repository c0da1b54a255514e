"""Trainer callbacks for MoE training."""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from ..core import update_selection_biases
from ..core.routing import Router, TopAnyRouter
from .distributed import all_reduce_sum

logger = logging.getLogger(__name__)


class SelectionBiasCallback(TrainerCallback):
    """Aux-loss-free balancing (DeepSeek): after each optimizer step, move every router's selection bias by
    ``u * sign(mean_load - load)`` using the expert loads gathered since the previous step (all processes' loads,
    when distributed). Routers without a selection bias (``router_bias_update_rate == 0``) are left alone.

    ``Trainer(..., callbacks=[SelectionBiasCallback()])``.

    Load statistics: each step's loads (summed over processes) are what the update acted on; since the last log the
    callback keeps ``bias_load_max_ratio`` (the most-loaded expert's load over the mean, averaged over routers and
    steps: 1.0 is balance) and adds it, with ``selection_bias_spread`` (the largest ``max(b) - min(b)`` of any
    router), to the Trainer's log lines as they are reported (``on_log``: the printed and reported logs, not
    ``state.log_history``). :attr:`history` keeps ``(step, bias_load_max_ratio)`` of every step.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []
        self._window: list[float] = []

    @staticmethod
    def _balanced_routers(model) -> list[Router]:
        return [m for m in model.modules() if isinstance(m, Router) and m.uses_selection_bias]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        routers = self._balanced_routers(model)
        if routers:
            # Read before the update, which all-reduces and clears the loads; one collective for all routers.
            loads = all_reduce_sum(torch.cat([r.pending_load.detach().cpu() for r in routers]))
            ratios = [
                float(load.max() / load.mean()) for load in loads.split([r.num_experts for r in routers]) if load.sum()
            ]
            if ratios:
                ratio = sum(ratios) / len(ratios)
                self.history.append((state.global_step + 1, ratio))
                self._window.append(ratio)
        update_selection_biases(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or model is None:
            return
        routers = self._balanced_routers(model)
        if self._window:
            logs["bias_load_max_ratio"] = round(sum(self._window) / len(self._window), 4)
            self._window = []
        if routers:
            logs["selection_bias_spread"] = round(
                max(float(r.selection_bias.max() - r.selection_bias.min()) for r in routers), 6
            )


class AuxLossScheduleCallback(TrainerCallback):
    """Anneal the router aux-loss coefficient over training, as UniMoE-Audio does (``l_aux_weight`` 0.025 decayed
    linearly to 0.001 over 10k steps): early training balances hard while the router is random, later training lets
    experts specialise.

    Before every optimizer step the coefficient for ``state.global_step`` is written to every config the loss reads
    it from: the model's config (moe-zoo models read ``router_aux_loss_coef`` live), the text config of composite
    models, and the adapter configs of a PEFT model (MixLoRA). ``schedule`` is ``"linear"`` or ``"cosine"``; after
    ``steps`` it stays at ``end``. The current value is added to the reported log lines as
    ``router_aux_loss_coef``.

    ``Trainer(..., callbacks=[AuxLossScheduleCallback(start=0.025, end=0.001, steps=10_000)])``.
    """

    SCHEDULES = ("linear", "cosine")

    def __init__(self, start: float, end: float, steps: int, schedule: str = "linear"):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}.")
        if steps < 1 or start < 0 or end < 0:
            raise ValueError(
                f"AuxLossScheduleCallback needs steps >= 1 and coefficients >= 0, got {start}, {end}, {steps}."
            )
        self.start, self.end, self.steps, self.schedule = float(start), float(end), int(steps), schedule
        self.current = self.start

    def coefficient(self, step: int) -> float:
        """The coefficient at optimizer step ``step`` (0-based: the value the step's forward passes use)."""
        progress = min(max(step, 0) / self.steps, 1.0)
        if self.schedule == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    @staticmethod
    def _configs(model) -> list:
        candidates = [getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)]
        candidates += list((getattr(model, "peft_config", None) or {}).values())
        base = getattr(model, "get_base_model", None)
        if base is not None and base() is not model:
            candidates += AuxLossScheduleCallback._configs(base())
        unique = {id(c): c for c in candidates if c is not None and hasattr(c, "router_aux_loss_coef")}
        return list(unique.values())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        configs = self._configs(model)
        if not configs:
            raise ValueError(
                f"AuxLossScheduleCallback found no config with router_aux_loss_coef on {type(model).__name__}."
            )
        self.current = self.coefficient(state.global_step)
        for config in configs:
            config.router_aux_loss_coef = self.current

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["router_aux_loss_coef"] = round(self.current, 8)


class DynMoeCallback(TrainerCallback):
    """DynMoE's adaptive expert process for top-any routers, on DynMoE's schedule: every ``period`` optimizer
    steps, record routing from step ``record_start`` to step ``adapt_at`` of the period, then switch off the experts
    that received no token and switch on a new one for the tokens that found none (see
    :meth:`moe_zoo.core.TopAnyRouter.adapt_experts`). DynMoE uses 900 / 300 / 600 (counting forward passes; here,
    optimizer steps). The active-expert masks are persistent buffers, so checkpoints keep them and a resumed run
    continues with the experts it had. The changes are logged and kept in :attr:`history`.
    """

    def __init__(self, period: int = 900, record_start: int = 300, adapt_at: int = 600):
        if not 0 <= record_start < adapt_at <= period:
            raise ValueError(
                f"DynMoeCallback needs 0 <= record_start < adapt_at <= period, got {record_start}, {adapt_at}, {period}."
            )
        self.period, self.record_start, self.adapt_at = period, record_start, adapt_at
        self.history: list[dict] = []

    @staticmethod
    def _routers(model) -> list[TopAnyRouter]:
        return [m for m in model.modules() if isinstance(m, TopAnyRouter)]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self.period == self.record_start:
            for router in self._routers(model):
                router.recording = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.period != self.adapt_at % self.period:
            return
        for layer, router in enumerate(self._routers(model)):
            if not router.recording:
                continue
            removed, added = router.adapt_experts()
            router.recording = False
            active = int(router.experts_mask.sum().item())
            self.history.append(
                {"step": state.global_step, "router": layer, "removed": removed, "added": added, "active": active}
            )
            if removed or added:
                logger.info(
                    "DynMoE step %d, router %d: removed %s, added %s, %d active",
                    state.global_step,
                    layer,
                    removed,
                    added,
                    active,
                )
