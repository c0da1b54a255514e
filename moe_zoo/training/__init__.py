"""What the training scripts share: callbacks (and, as models arrive, stage recipes and collators)."""

from .callbacks import SelectionBiasCallback

__all__ = ["SelectionBiasCallback"]
