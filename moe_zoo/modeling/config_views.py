"""Read-only views that composite configs expose at the top level, taken from their language model's config.

moe_zoo's modules and transformers' initialisation read ``config.initializer_range``, ``config.hidden_size`` ... on
the top-level config, while a composite config keeps them in ``text_config``. Each view reads ``self.text_config``
live, so a config edited after construction stays consistent.
"""

from __future__ import annotations

from ..core.options import resolve_moe_layers


class InitializerRangeView:
    @property
    def initializer_range(self) -> float:
        return getattr(self.text_config, "initializer_range", 0.02)


class DecoderShapeView(InitializerRangeView):
    """``vocab_size``, ``hidden_size``, ``num_hidden_layers`` and ``initializer_range`` of ``text_config``."""

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers


class MoeLayersView:
    @property
    def moe_layer_indices(self) -> list[int]:
        """The language-model layers that hold an MoE block (empty for a dense model, ``moe_layers="none"``)."""
        return resolve_moe_layers(self.moe_layers, self.text_config.num_hidden_layers)


__all__ = ["DecoderShapeView", "InitializerRangeView", "MoeLayersView"]
