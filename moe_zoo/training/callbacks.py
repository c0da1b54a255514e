"""Trainer callbacks for MoE training."""

from __future__ import annotations

from transformers import TrainerCallback

from ..core import update_selection_biases


class SelectionBiasCallback(TrainerCallback):
    """Aux-loss-free balancing (DeepSeek): after each optimizer step, move every router's selection bias by
    ``u * sign(mean_load - load)`` using the expert loads gathered since the previous step (all processes' loads,
    when distributed). Routers without a selection bias (``router_bias_update_rate == 0``) are left alone.

    ``Trainer(..., callbacks=[SelectionBiasCallback()])``.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_selection_biases(model)
