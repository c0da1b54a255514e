# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Configuration of an upcycled MoE language model: a dense backbone's own config plus the MoE options."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...core.options import MoeOptions, validate_moe_options
from ..config_views import DecoderShapeView, MoeLayersView


class UpcycledMoeConfig(DecoderShapeView, MoeLayersView, PreTrainedConfig, MoeOptions):
    r"""Config of [`UpcycledMoeForCausalLM`]: any dense HF decoder (``text_config``) whose FFNs in ``moe_layers``
    became MoE blocks.

    ``text_config`` is the backbone's own config, kept whole (a ``LlamaConfig``, ``PhiConfig``, ...), so the
    backbone's attention, norms and embeddings are built by the backbone's own classes. Every MoE option of
    [`~moe_zoo.core.MoeOptions`] is a field of this config and is validated on construction.

    ``num_attention_experts`` > 0 makes every layer's attention a soft Mixture-of-Attention of that many experts
    (BAM; ``attention_experts_share_kv`` for its shared key-value variant), see
    :mod:`moe_zoo.core.mixture_of_attention` and :func:`moe_zoo.bam_upcycle`.

    Example:
    ```python
    >>> from transformers import LlamaConfig
    >>> from moe_zoo import UpcycledMoeConfig
    >>> config = UpcycledMoeConfig(text_config=LlamaConfig(num_hidden_layers=4), num_experts=8, moe_layers="sparse")
    >>> config.moe_layer_indices
    [0, 2]
    ```
    """

    model_type = "upcycled_moe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    tie_word_embeddings: bool = False
    num_attention_experts: int = 0
    attention_experts_share_kv: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The backbone decides tying; the top-level flag is what transformers' tying logic reads.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        validate_moe_options(self, self.text_config.num_hidden_layers)
        if not isinstance(self.num_attention_experts, int) or self.num_attention_experts < 0:
            raise ValueError(
                f"`num_attention_experts` is {self.num_attention_experts!r}, but it must be 0 (the backbone's own "
                "attention) or the number of soft Mixture-of-Attention experts (BAM)."
            )


__all__ = ["UpcycledMoeConfig"]
