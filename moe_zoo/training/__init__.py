"""What the training scripts share: callbacks (and, as models arrive, stage recipes and collators)."""

from .callbacks import AuxLossScheduleCallback, DynMoeCallback, SelectionBiasCallback

__all__ = ["AuxLossScheduleCallback", "DynMoeCallback", "SelectionBiasCallback"]
