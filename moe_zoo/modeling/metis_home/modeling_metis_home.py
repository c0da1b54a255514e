# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Metis-HOME: a dense (multimodal) LLM whose every decoder FFN is split into a thinking and a non-thinking branch,
with a lightweight router that sends each whole query to one branch.

The model wraps the dense model whole (``model``: a ``Qwen2_5_VLForConditionalGeneration``, a Llava, a
MoE-LLaVA or any causal LM) and changes only ``<decoder>.layers.{i}.mlp``, which becomes a
:class:`~moe_zoo.modeling.metis_home.branches.BranchedFFN`. Everything else (attention, vision tower, RoPE
variants such as Qwen2.5-VL's M-RoPE, the generation code) is the dense architecture's own.

The paper ("Metis-HOME: Hybrid Optimized Mixture-of-Experts for Multimodal Reasoning") leaves open, and this
implementation chooses:

- **router input**: the hidden state entering decoder layer ``config.router_layer`` (default: the middle layer), with
  the layers below it running ``router_prefix_branch``'s FFNs (default thinking), each token RMS-normalised, then
  pooled over the prompt's tokens (mean by default). The prompt is the query up to and including the generation prompt; answer tokens are never
  seen, so training and inference read the same thing.
- **router**: ``LayerNorm -> Linear -> GELU -> Linear`` in fp32, one logit per branch; at inference the argmax.
- **router gradient**: the router reads its input without gradient, so the router loss trains the router alone and
  never pulls the LLM towards features that are easy to route.
- **training**: each sample runs on the branch of its label (teacher forcing); the router learns the labels with
  cross-entropy; ``loss = lm_loss + router_loss_coef * router_loss`` (1:1 by default).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from ...core.recording import collect_routing
from ...core.upcycle import find_decoder_layers
from ..moe_backbone import PublishingMixin
from ..quantized_loading import QuantizedExpertsMixin
from .branches import BranchedFFN, BranchSelection, branch_restoring_context_fn, branched_plan
from .configuration_metis_home import MetisHomeConfig

BranchChoice = str | int | Sequence[str | int] | torch.Tensor
"""A forced branch: a name or index for the whole batch, one per row, or a ``(B,)`` tensor of indices."""

_NOT_ROUTER_INPUTS = frozenset(
    {"labels", "cache", "past_key_values", "use_cache", "logits_to_keep", "num_items_in_batch", "return_dict"}
)


@dataclass
class MetisHomeOutput(ModelOutput):
    """Output of [`MetisHomeForConditionalGeneration`].

    Args:
        loss: ``lm_loss + router_loss_coef * branch_loss`` (each term present when its labels are).
        logits: the wrapped model's LM logits.
        lm_loss: the wrapped model's own loss (with its MoE aux loss for an MoE base such as MoE-LLaVA).
        branch_loss: the router's cross-entropy against ``branch_labels``.
        branch_logits: ``(B, num_branches)`` router logits, when the router ran.
        branch: ``(B,)`` the branch index each row ran on.
        router_logits: the wrapped model's per-token MoE router logits (MoE bases only).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    branch_loss: torch.Tensor | None = None
    branch_logits: torch.Tensor | None = None
    branch: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class BranchDecision:
    """The router's choice for a batch of queries: ``indices (B,)`` and ``probabilities (B, num_branches)``."""

    indices: torch.Tensor
    probabilities: torch.Tensor
    branch_names: list[str]

    @property
    def names(self) -> list[str]:
        return [self.branch_names[i] for i in self.indices.tolist()]


class QueryRouter(nn.Module):
    """The per-query router: a pooled prompt state ``(B, H)`` -> one logit per branch ``(B, N)``, in fp32."""

    def __init__(self, config: MetisHomeConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.fc1 = nn.Linear(config.hidden_size, config.router_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.router_width, len(config.branch_names))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = pooled.to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(self.norm(pooled)))).float()


def pool_prompt(hidden_states: torch.Tensor, prompt_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, S, H)`` states -> ``(B, H)``: the mean over the ``prompt_mask`` positions, or the last of them.

    Each token's state is divided by its RMS first. Mid-layer states of LLMs hold an attention sink: the first token's
    norm is often 100x the others' (25,000 against a median of 164 at SmolLM2's layer 15), so a plain mean would be
    that one token, the same in every prompt, and the router would see almost nothing of the query.
    """
    hidden_states = hidden_states.float()
    hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + 1e-6)
    mask = prompt_mask.to(hidden_states.device).bool()
    if not mask.any(-1).all():
        raise ValueError("Every query needs at least one prompt token for the router (a prompt_mask row is empty).")
    if pooling == "last":
        positions = torch.arange(mask.shape[-1], device=mask.device)
        last = (positions * mask).argmax(-1)
        return hidden_states[torch.arange(mask.shape[0], device=mask.device), last]
    weights = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(1) / weights.sum(1)


def default_prompt_mask(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    shape: torch.Size,
) -> torch.Tensor:
    """The prompt positions when the caller gives no ``prompt_mask``: the attended tokens before the first
    supervised label of each row (with labels), else every attended token (a prompt being routed)."""
    device = (input_ids if input_ids is not None else attention_mask if attention_mask is not None else labels).device
    mask = attention_mask.bool() if attention_mask is not None else torch.ones(shape, dtype=torch.bool, device=device)
    if labels is not None:
        supervised = labels != -100
        mask = mask & (supervised.cumsum(-1) == 0)
    return mask


class _RouterInputReady(Exception):
    """Stops the router's partial forward once the router layer's input is captured."""


def _copy_sharing_configs(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose submodules keep pointing at the same config objects (MoE blocks read their
    config live; a copy must follow the model's config, not a frozen copy of it)."""
    memo = {id(v): v for m in module.modules() for v in vars(m).values() if isinstance(v, PreTrainedConfig)}
    return copy.deepcopy(module, memo)


def build_dense_model(base_config: PreTrainedConfig) -> PreTrainedModel:
    """The dense model of ``base_config``, built by its own class: a vision-language model through
    ``AutoModelForImageTextToText``, any other decoder through ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    )

    config_type = type(base_config)
    if config_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText.from_config(base_config)
    if config_type in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM.from_config(base_config)
    raise ValueError(
        f"Metis-HOME wraps a causal LM or an image-text-to-text model; {config_type.__name__} ({base_config.model_type}) "
        "is registered with neither AutoModelForCausalLM nor AutoModelForImageTextToText."
    )


def decoder_layers(model: PreTrainedModel, num_layers: int) -> nn.ModuleList:
    """The language model's decoder layers (never a vision tower's blocks, which also have an ``mlp``)."""
    return find_decoder_layers(model.get_decoder(), num_layers)


class MetisHomePreTrainedModel(QuantizedExpertsMixin, PublishingMixin, PreTrainedModel):
    config_class = MetisHomeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["router"]
    # The same list, non-strict: transformers' quantizers skip these modules (bitsandbytes would quantize the router's
    # nn.Linear layers); the strict list above already keeps the router in fp32 at every dtype.
    _keep_in_fp32_modules = ["router"]
    _can_compile_fullgraph = False  # the branch of each row is data-dependent

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, QueryRouter):
            for linear in (module.fc1, module.fc2):
                init.normal_(linear.weight, mean=0.0, std=self.config.initializer_range)
                init.zeros_(linear.bias)
            init.ones_(module.norm.weight)
            init.zeros_(module.norm.bias)
        else:
            super()._init_weights(module)


class MetisHomeForConditionalGeneration(MetisHomePreTrainedModel, GenerationMixin):
    """Metis-HOME: the dense model with thinking / non-thinking FFN branches and a query router.

    Build one from a dense model with :func:`moe_zoo.expand_to_metis_home` (function-preserving), or from a config.

    - ``forward(..., branch_labels=)`` (training): each row runs on its labelled branch and the router's
      cross-entropy is added to the loss. ``forward(..., branch=)`` forces a branch; with neither, the router picks.
    - ``generate(..., branch=None)``: the router picks each query's branch once, from the prompt, and the whole
      answer is generated on it; ``branch="thinking"`` (or one per row) forces it.
    - :meth:`route` returns the decision alone.
    """

    def __init__(self, config: MetisHomeConfig):
        super().__init__(config)
        self.selection = BranchSelection()
        self.model = build_dense_model(config.base_config)
        for index, layer in enumerate(decoder_layers(self.model, config.num_hidden_layers)):
            if isinstance(layer.mlp, BranchedFFN):
                raise ValueError(f"Decoder layer {index} of the base model is already branched.")
            copies = {
                name: layer.mlp if i == 0 else _copy_sharing_configs(layer.mlp)
                for i, name in enumerate(config.branch_names)
            }
            layer.mlp = BranchedFFN(copies, self.selection)
        # The wrapped model collected its parallel plans when it was built, with the FFNs where they were.
        self.model._tp_plan = branched_plan(self.model.tp_plan, config.branch_names)
        self.model._ep_plan = branched_plan(self.model.ep_plan, config.branch_names)
        self.router = QueryRouter(config)
        if config.tie_word_embeddings:
            self._tied_weights_keys = {
                f"model.{k}": f"model.{v}" for k, v in (self.model._tied_weights_keys or {}).items()
            }
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def branch_names(self) -> list[str]:
        return list(self.config.branch_names)

    def branch_ffns(self) -> list[BranchedFFN]:
        """The branched FFNs, in layer order."""
        return [layer.mlp for layer in decoder_layers(self.model, self.config.num_hidden_layers)]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        """transformers' activation checkpointing, non-reentrant, with each recomputed layer given back the branch
        choice its forward ran with (see :func:`~moe_zoo.modeling.metis_home.branches.branch_restoring_context_fn`).
        The reentrant variant cannot restore it and is refused."""
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
        if checkpoint_kwargs.get("use_reentrant"):
            raise ValueError(
                "Metis-HOME needs non-reentrant activation checkpointing (use_reentrant=False, the default): the "
                "branch of each row must be restored when a layer is recomputed."
            )
        checkpoint_kwargs["use_reentrant"] = False
        checkpoint_kwargs["context_fn"] = branch_restoring_context_fn(
            self.selection, checkpoint_kwargs.get("context_fn")
        )
        return super().activation_checkpointing_enable(checkpoint_kwargs, *args, **kwargs)

    # ----- choosing branches -----

    def branch_rows(self, branch: BranchChoice, batch_size: int) -> torch.Tensor:
        """``branch`` as a ``(batch_size,)`` tensor of branch indices; a ``ValueError`` for a branch the model does
        not have."""
        if isinstance(branch, torch.Tensor):
            choices = branch.reshape(-1).tolist()
        else:
            choices = [branch] if isinstance(branch, str | int) else list(branch)
        rows = torch.tensor([self._branch_index(c) for c in choices], dtype=torch.long)
        if rows.numel() == 1:
            rows = rows.expand(batch_size)
        if rows.numel() != batch_size:
            raise ValueError(f"Got {rows.numel()} branch choices for a batch of {batch_size} queries.")
        return rows

    def _branch_index(self, choice: str | int) -> int:
        if isinstance(choice, str):
            return self.config.branch_index(choice)
        if not 0 <= choice < len(self.branch_names):
            raise ValueError(
                f"This model has branches 0..{len(self.branch_names) - 1} ({self.branch_names}); got {choice}."
            )
        return int(choice)

    def branch_logits(self, prompt_mask: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        """``(B, num_branches)`` router logits for the queries in ``inputs`` (the wrapped model's inputs).

        The wrapped model runs up to ``config.router_layer`` without gradient, on ``router_prefix_branch``'s FFNs;
        its input there is pooled over ``prompt_mask`` (default: see :func:`default_prompt_mask`) and scored.
        """
        labels = inputs.get("labels")
        inputs = {k: v for k, v in inputs.items() if k not in _NOT_ROUTER_INPUTS}
        embeds = inputs.get("inputs_embeds")
        input_ids, attention_mask = inputs.get("input_ids"), inputs.get("attention_mask")
        shape = (input_ids if input_ids is not None else embeds).shape[:2]
        if prompt_mask is None:
            prompt_mask = default_prompt_mask(input_ids, attention_mask, labels, shape)
        layer = decoder_layers(self.model, self.config.num_hidden_layers)[self.config.router_layer_index]
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _RouterInputReady

        prefix = torch.full((shape[0],), self.config.branch_index(self.config.router_prefix_branch), dtype=torch.long)
        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            # the partial pass's MoE routing (MoE bases) is not the query's: keep it from any enclosing collector
            with torch.no_grad(), self.selection.selected(prefix), collect_routing(propagate=False):
                self.model(**inputs, use_cache=False)
        except _RouterInputReady:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("The router layer never ran: the wrapped model's forward skipped its decoder layers.")
        return self.router(pool_prompt(captured[0].detach(), prompt_mask, self.config.router_pooling))

    @torch.no_grad()
    def route(self, prompt_mask: torch.Tensor | None = None, **inputs) -> BranchDecision:
        """The router's branch for each query (``input_ids``, ``attention_mask``, ``pixel_values``, ...)."""
        logits = self.branch_logits(prompt_mask=prompt_mask, **inputs)
        return BranchDecision(logits.argmax(-1).cpu(), logits.softmax(-1).cpu(), self.branch_names)

    @contextmanager
    def branch_pinned(self, rows: torch.Tensor) -> Iterator[None]:
        """Run everything inside on ``rows``' branches (``generate`` pins the decision for all its steps)."""
        with self.selection.selected(rows):
            yield

    # ----- forward and generation -----

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        branch_labels: torch.LongTensor | None = None,
        branch: BranchChoice | None = None,
        prompt_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MetisHomeOutput:
        r"""
        branch_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Each sample's branch index (training): the row runs on that branch and the router learns it.
        branch (`str`, `int`, a sequence of them, or a `(batch_size,)` tensor, *optional*):
            Force the branch; by default the router picks (or ``generate``'s pinned decision holds).
        prompt_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            The positions the router pools; default: the tokens before the first supervised label.
        """
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        batch_size = reference.shape[0]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        rows = self.branch_rows(branch, batch_size) if branch is not None else None
        pinned = self.selection.rows
        if rows is None and pinned is not None:
            rows = pinned
        logits = None
        if branch_labels is not None or rows is None:
            if rows is None and _is_decode_step(kwargs):
                raise ValueError(
                    "A cached decoding step needs the query's branch, which was chosen on the prompt: use generate(), "
                    "or pass branch= (e.g. the `branch` of the prompt's output)."
                )
            logits = self.branch_logits(prompt_mask=prompt_mask, labels=labels, **inputs)
        if rows is None:
            rows = branch_labels if branch_labels is not None else logits.argmax(-1)
        rows = rows.reshape(-1).cpu()
        with self.selection.selected(rows):
            outputs = self.model(**inputs, labels=labels)
        branch_loss = None
        if branch_labels is not None:
            branch_loss = F.cross_entropy(logits, branch_labels.to(logits.device).reshape(-1))
        loss = outputs.loss
        if branch_loss is not None:
            weighted = self.config.router_loss_coef * branch_loss
            loss = weighted if loss is None else loss + weighted.to(loss.device)
        return MetisHomeOutput(
            loss=loss,
            logits=outputs.logits,
            lm_loss=outputs.loss,
            branch_loss=branch_loss,
            branch_logits=logits,
            branch=rows,
            cache=getattr(outputs, "cache", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            router_logits=getattr(outputs, "router_logits", None),
            aux_loss=getattr(outputs, "aux_loss", None),
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, branch: BranchChoice | None = None, **kwargs):
        """``generate`` of the wrapped model, on one branch per query chosen once before the first token.

        ``branch=None`` lets the router choose from the prompt (``input_ids`` / ``inputs_embeds``, the attention
        mask and any media inputs); a name, an index or one per row forces it. Every generated token of a query,
        prefill and cached steps alike, runs on that query's branch. Returns what the wrapped ``generate`` returns.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if input_ids is None:
            raise ValueError("Metis-HOME generate needs a prompt (input_ids or inputs_embeds) to choose a branch.")
        if branch is None:
            model_inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            if inputs is not None:
                model_inputs["input_ids"] = inputs
            rows = self.route(**model_inputs).indices
        else:
            rows = self.branch_rows(branch, input_ids.shape[0])
        if "generation_config" not in kwargs:
            self.model.generation_config = self.generation_config  # ours is what was saved and loaded back
        with self.branch_pinned(rows):
            return self.model.generate(inputs, **kwargs)


def _is_decode_step(kwargs: dict) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


__all__ = [
    "BranchDecision",
    "MetisHomeForConditionalGeneration",
    "MetisHomeOutput",
    "MetisHomePreTrainedModel",
    "QueryRouter",
    "build_dense_model",
    "decoder_layers",
    "pool_prompt",
]
