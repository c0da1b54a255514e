"""What the training scripts share: callbacks (and, as models arrive, stage recipes and collators)."""

from .callbacks import DynMoeCallback, SelectionBiasCallback

__all__ = ["DynMoeCallback", "SelectionBiasCallback"]
