"""Trainer callbacks for MoE training."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..core import update_selection_biases
from ..core.routing import TopAnyRouter

logger = logging.getLogger(__name__)


class SelectionBiasCallback(TrainerCallback):
    """Aux-loss-free balancing (DeepSeek): after each optimizer step, move every router's selection bias by
    ``u * sign(mean_load - load)`` using the expert loads gathered since the previous step (all processes' loads,
    when distributed). Routers without a selection bias (``router_bias_update_rate == 0``) are left alone.

    ``Trainer(..., callbacks=[SelectionBiasCallback()])``.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_selection_biases(model)


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
