# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Metis-HOME ("Metis-HOME: Hybrid Optimized Mixture-of-Experts for Multimodal Reasoning")."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..config_views import DecoderShapeView

THINKING = "thinking"
NON_THINKING = "non_thinking"
ROUTER_POOLINGS = ("mean", "last")


class MetisHomeConfig(DecoderShapeView, PreTrainedConfig):
    r"""Config of [`MetisHomeForConditionalGeneration`]: a dense model whose every decoder FFN became one FFN per
    branch (thinking / non-thinking), with a query router that picks one branch per query.

    Args:
        base_config: the dense model's own config, kept whole: a ``Qwen2_5_VLConfig`` (the paper's base), a
            ``LlavaConfig``, our ``MoeLlavaConfig``, or any decoder's config (``LlamaConfig``, ...). The model is
            built by that architecture's own classes, so attention, vision towers, RoPE variants and generation
            behave exactly as in the dense model.
        branch_names: the branches, in router-output order. Two by default, as in the paper: ``"non_thinking"``
            (index 0) and ``"thinking"`` (index 1). Names must be Python identifiers; more than two branches work
            (the router is an N-way classifier), which the paper does not explore.
        router_layer: the decoder layer whose *input* hidden state the router reads (0 = the input embeddings, with
            image features already merged). The paper does not say; the default (``None``) is the middle layer,
            ``num_hidden_layers // 2``: contextual states judge a query's difficulty better than embeddings, and the
            cost is a partial forward over the prompt (prefill only; decoding is unaffected).
        router_prefix_branch: the branch whose FFNs the layers below ``router_layer`` use while the router's input
            is computed (the branch is not known yet). ``"thinking"`` by default: both branches start as copies of
            the RL-trained thinking model, so at expansion the router reads exactly what the dense model computes.
        router_pooling: ``"mean"`` (masked mean over the prompt's tokens, the default) or ``"last"`` (the last
            prompt token, i.e. the end of the generation prompt).
        router_hidden_size: width of the router MLP (``LayerNorm -> Linear -> GELU -> Linear``); default
            ``hidden_size // 4``. The paper says only "lightweight" and "MLPs".
        router_loss_coef: weight of the router's cross-entropy in the total loss (``L = L_lm + coef * L_router``);
            1.0 as in the paper (1:1).

    Example:
    ```python
    >>> from transformers import LlamaConfig
    >>> from moe_zoo import MetisHomeConfig
    >>> config = MetisHomeConfig(base_config=LlamaConfig(num_hidden_layers=4))
    >>> config.router_layer_index, config.branch_names
    (2, ['non_thinking', 'thinking'])
    ```
    """

    model_type = "metis_home"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    base_config: dict | PreTrainedConfig | None = None
    branch_names: list[str] | tuple[str, ...] = (NON_THINKING, THINKING)
    router_layer: int | None = None
    router_prefix_branch: str = THINKING
    router_pooling: str = "mean"
    router_hidden_size: int | None = None
    router_loss_coef: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.branch_names = list(self.branch_names)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._validate()

    def _validate(self) -> None:
        names = self.branch_names
        if len(names) < 2 or len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
            raise ValueError(
                f"branch_names must be at least two distinct Python identifiers (e.g. {[NON_THINKING, THINKING]}), "
                f"got {names}."
            )
        if self.router_prefix_branch not in names:
            raise ValueError(
                f"router_prefix_branch must be one of branch_names {names}, got {self.router_prefix_branch!r}."
            )
        layers = self.num_hidden_layers
        if self.router_layer is not None and not 0 <= self.router_layer < layers:
            raise ValueError(
                f"router_layer must be a decoder layer index in [0, {layers - 1}] (0 = the input embeddings), or None "
                f"for the middle layer; got {self.router_layer}."
            )
        if self.router_pooling not in ROUTER_POOLINGS:
            raise ValueError(f"router_pooling must be one of {ROUTER_POOLINGS}, got {self.router_pooling!r}.")
        if self.router_hidden_size is not None and self.router_hidden_size < 1:
            raise ValueError(f"router_hidden_size must be a positive int or None, got {self.router_hidden_size}.")
        if self.router_loss_coef < 0:
            raise ValueError(f"router_loss_coef must be >= 0, got {self.router_loss_coef}.")

    def branch_index(self, name: str) -> int:
        """The router-output index of branch ``name``; a ``ValueError`` naming the branches if there is none."""
        if name not in self.branch_names:
            raise ValueError(f"This model has no branch {name!r}; its branches are {self.branch_names}.")
        return self.branch_names.index(name)

    @property
    def text_config(self) -> PreTrainedConfig:
        """The language model's config (``base_config`` itself for a text-only base)."""
        return self.base_config.get_text_config()

    @property
    def router_layer_index(self) -> int:
        return self.num_hidden_layers // 2 if self.router_layer is None else self.router_layer

    @property
    def router_width(self) -> int:
        return self.router_hidden_size or max(1, self.hidden_size // 4)


__all__ = ["NON_THINKING", "ROUTER_POOLINGS", "THINKING", "MetisHomeConfig"]
