"""What every moe_zoo model that wraps a dense HF decoder shares: building the backbone, putting MoE blocks in its
layers, initialising those blocks, and upcycling a dense model's weights into them.

transformers builds and initialises a backbone (``LlamaModel``, ``PhiModel``, ...) with the backbone's own code;
the helpers here make that work when MoE blocks sit inside it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.utils.logging import tqdm

from ..atomic_io import save_files_atomically
from ..core.block import SparseMoeBlock, link_gating_residuals
from ..core.experts import ConstantExperts, GatedExpertsBase, PlainExpertsBase
from ..core.fused_experts import IMPLEMENTATION_NAME as EXPERTS_IMPLEMENTATION
from ..core.losses import router_aux_loss
from ..core.options import resolve_moe_layers
from ..core.routing import Router, TopAnyRouter
from ..core.upcycle import copy_ffn_into_experts, copy_ffn_into_shared_expert, ffn_layout, find_decoder_layers
from .quantized_loading import QuantizedExpertsMixin

MOE_MODULE_TYPES = (GatedExpertsBase, PlainExpertsBase, Router, TopAnyRouter, ConstantExperts)
"""The moe_zoo modules that need moe_zoo's own initialisation."""


@contextmanager
def experts_implementation_hidden(text_config: PreTrainedConfig) -> Iterator[None]:
    """Build a dense backbone while the top-level ``experts_implementation`` is hidden from its config.

    transformers propagates ``experts_implementation`` into sub-configs, and a dense backbone class refuses any value
    but eager; the choice is ours (our experts read the top-level config).
    """
    requested = text_config._experts_implementation_internal
    text_config._experts_implementation_internal = None
    try:
        yield
    finally:
        text_config._experts_implementation_internal = requested


@contextmanager
def built_on_meta_whole() -> Iterator[None]:
    """Build a model on the meta device, in one piece even while a DeepSpeed ZeRO-3 config is alive.

    Upcycling builds the MoE on the meta device and fills every tensor by copying. Once ``TrainingArguments(deepspeed=
    <a ZeRO-3 config>)`` exists (the training scripts make it first), transformers wraps every ``from_config`` (our
    backbone's included) in ``deepspeed.zero.Init`` and initialises the partitioned weights gathered, which fails on
    meta tensors. transformers' own guard against nested ``zero.Init`` (``set_zero3_state``, what ``from_pretrained``
    sets while it builds a model) turns that off here; the whole MoE is then built and copied on each rank, and
    DeepSpeed partitions it when its engine starts (``deepspeed.initialize`` converts a model not built under
    ``zero.Init``). So upcycling under ZeRO-3 needs the whole MoE in each process's memory once; a model that does not
    fit is upcycled and saved first, and ``from_pretrained`` under ZeRO-3 partitions it while loading.
    """
    with torch.device("meta"):
        if not is_deepspeed_zero3_enabled():
            yield
            return
        from transformers.modeling_utils import set_zero3_state

        with set_zero3_state():
            yield


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model``'s parameters hold their full tensors, also where DeepSpeed ZeRO-3 partitioned them.

    A dense model loaded with ``from_pretrained`` while a ZeRO-3 config is alive keeps only its shard of each
    parameter (an empty ``param.data`` and a ``ds_tensor``); upcycling reads the whole weights, so they are gathered
    (read-only: ``modifier_rank=None``) for the copy. Outside ZeRO-3 this does nothing.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    # In a try block: transformers' check_imports leaves those out, so the code a checkpoint carries (this module
    # is exported with it) does not demand DeepSpeed of users who never partition a model.
    try:
        import deepspeed
    except ImportError as error:  # parameters with a ds_id come from DeepSpeed; it cannot be missing here
        raise ImportError("Gathering ZeRO-3 partitioned parameters needs the `deepspeed` package.") from error
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def build_backbone(text_config: PreTrainedConfig) -> tuple[PreTrainedModel, nn.Module]:
    """The backbone's own base model and LM head (with the head's bias where the backbone has one, e.g. Phi),
    built by the backbone's causal-LM class from ``text_config``."""
    from transformers import AutoModelForCausalLM

    with experts_implementation_hidden(text_config):
        dense = AutoModelForCausalLM.from_config(text_config)
    return getattr(dense, dense.base_model_prefix), dense.get_output_embeddings()


EXPERT_PARALLEL_PLAN: dict[str, str] = {
    "gate_up_proj": "grouped_gemm",
    "up_proj": "grouped_gemm",
    "up_proj_bias": "grouped_gemm",
    "down_proj": "grouped_gemm",
    "down_proj_bias": "grouped_gemm",
    "": "ep_dispatch_experts",
}
"""transformers' expert-parallel styles for an expert bank of :mod:`moe_zoo.core.experts`, by parameter name
(``""`` is the bank itself): the rules Qwen3-MoE and Mixtral declare in ``base_model_ep_plan``. ``grouped_gemm``
gives each rank ``E / ep_size`` whole experts (``Shard(0)`` of every ``(E, ...)`` tensor, biases included: a bias
left whole would be indexed with local expert ids); ``ep_dispatch_experts`` brings each rank's experts their tokens
(all-to-all in training, all-reduce at inference when the ranks share the batch). Routers (``mlp.gate``), shared
experts and zero-computation experts stay replicated, as Qwen2-MoE's shared expert does."""


def install_moe_blocks(
    decoder: nn.Module,
    config: Any,
    num_layers: int,
    hidden_act: str,
    experts_classes: tuple[type[nn.Module], type[nn.Module]],
) -> list[int]:
    """Replace the FFN (``layer.mlp``) of every layer in ``config.moe_layers`` with a :class:`SparseMoeBlock`, link
    their gating residuals (``config.gating_residual``, MoE++) and declare the blocks' expert-parallel plan on
    ``decoder`` (:func:`declare_expert_parallel_plan`).

    ``experts_classes`` are the model file's decorated ``(gated, plain)`` expert banks. Returns the MoE layer
    indices. Raises ``ValueError`` for a layer whose FFN layout upcycling does not support.
    """
    layers = find_decoder_layers(decoder, num_layers)
    indices = resolve_moe_layers(config.moe_layers, num_layers)
    for index in indices:
        layout = ffn_layout(layers[index].mlp, where=f"decoder layer {index}")
        layers[index].mlp = SparseMoeBlock(
            config,
            layout.hidden_size,
            layout.intermediate_size,
            hidden_act,
            gated=layout.gated,
            experts_class=experts_classes[0] if layout.gated else experts_classes[1],
        )
    link_gating_residuals([layers[index].mlp for index in indices])
    declare_expert_parallel_plan(decoder)
    return indices


def declare_expert_parallel_plan(decoder: nn.Module) -> dict[str, str]:
    """Add the expert-parallel rules of ``decoder``'s MoE blocks to its ``_ep_plan`` and return them.

    transformers' MoE models declare ``base_model_ep_plan`` on their decoder's config class; ours reuse the dense
    backbone's own base model (``LlamaModel``, ``PhiModel``...) and config, which declare none, and that base model
    collected its plans (``init_parallel_plans``, in its ``post_init``) before the MoE blocks existed. The rules of
    :data:`EXPERT_PARALLEL_PLAN` are therefore written onto the backbone here, with transformers' wildcard for layer
    numbers (``layers.*.mlp.experts.gate_up_proj``) and only for the tensors the banks have; every enclosing model's
    ``post_init`` then collects them under its prefixes (``model.``, ``model.language_model.``...), exactly as it
    collects a sub-model's TP plan, and ``from_pretrained(..., distributed_config=DistributedConfig(ep_size=N,
    ...))`` applies them. The backbone's TP rules for FFN projections that no layer has any more (Llama's
    ``layers.*.mlp.gate_proj`` once every FFN is an MoE block) are dropped, so that loading with a TP plan does not
    warn about them; those of FFNs left dense stay.
    """
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    names = {replace_layer_number_by_wildcard(n) for n, _ in [*decoder.named_modules(), *decoder.named_parameters()]}
    tp_plan = getattr(decoder, "_tp_plan", None)
    if tp_plan:
        decoder._tp_plan = {rule: style for rule, style in tp_plan.items() if rule in names}
    rules: dict[str, str] = {}
    for name, module in decoder.named_modules():
        if not isinstance(module, SparseMoeBlock):
            continue
        bank = replace_layer_number_by_wildcard(f"{name}.experts")
        for param_name, _ in module.experts.named_parameters(recurse=False):
            if param_name in EXPERT_PARALLEL_PLAN:
                rules[f"{bank}.{param_name}"] = EXPERT_PARALLEL_PLAN[param_name]
        rules[bank] = EXPERT_PARALLEL_PLAN[""]
    if rules:
        decoder._ep_plan = {**(getattr(decoder, "_ep_plan", None) or {}), **rules}
    return rules


def backbone_hidden_act(text_config: PreTrainedConfig) -> str:
    """The backbone's FFN activation name (``hidden_act``, or Gemma's ``hidden_activation``)."""
    return getattr(text_config, "hidden_act", None) or getattr(text_config, "hidden_activation", None) or "silu"


def initialize_moe_modules(model: PreTrainedModel) -> None:
    """Initialise the MoE modules nested in a backbone with ``model``'s ``_init_weights``.

    transformers initialises a nested ``PreTrainedModel`` (the backbone) with *its* ``_init_weights``, which does
    not know our modules; call this first from ``initialize_weights``. transformers' ``initialization`` functions
    skip tensors already loaded from a checkpoint, so after ``from_pretrained`` only missing state (such as the
    non-persistent expert loads) is set.
    """
    for module in model.modules():
        if isinstance(module, MOE_MODULE_TYPES):
            model._initialize_weights(module)


class PublishingMixin:
    """Saving and publishing for every moe_zoo model; list it before the ``PreTrainedModel`` base.

    ``save_pretrained`` is made atomic per file and also writes the model's own code with an ``auto_map`` (so the
    folder loads with ``trust_remote_code=True`` where moe-zoo is not installed) and a model card; ``push_to_hub``
    uploads exactly that folder. The publishing code (:mod:`moe_zoo.publishing`) is imported by name only where
    moe_zoo itself is installed: it is not part of the code a checkpoint carries, and a model loaded from such
    exported code saves as any transformers remote-code model does.
    """

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """``PreTrainedModel.save_pretrained``, made atomic per file (an interrupted save never leaves a truncated
        weight file or a config that describes weights that are not there, see
        :func:`moe_zoo.atomic_io.save_files_atomically`), plus the exported code and the model card. Other files in
        ``save_directory`` are kept, a README.md its owner edited among them. With ``push_to_hub=True`` the saved
        folder is then uploaded (to ``repo_id``, by default the folder's name), as transformers does."""
        hub_kwargs = {name: kwargs.pop(name) for name in _HUB_ARGUMENTS if name in kwargs}
        parent = super()
        if not _writes_checkpoint_files(self, kwargs.get("is_main_process", True)):
            # Under torch.distributed transformers writes on rank 0 only; the other ranks call save_pretrained to take
            # part in gathering sharded weights (tensor / expert parallelism) and must leave the folder alone: an
            # atomic save from here would find nothing written and delete the weight files rank 0 just moved in.
            parent.save_pretrained(save_directory, *args, **kwargs)
            return None
        publishing = _publishing_hooks(self) if kwargs.get("is_main_process", True) else None

        def write(folder):
            if publishing is not None:
                publishing.export_code(self, folder)
            parent.save_pretrained(folder, *args, **kwargs)
            if publishing is not None:
                publishing.write_card(self, folder, target=save_directory)

        save_files_atomically(save_directory, write)
        if publishing is not None:
            publishing.remove_stale_code(save_directory)
        if push_to_hub and kwargs.get("is_main_process", True):
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            if publishing is None:
                raise NotImplementedError(
                    "push_to_hub from exported moe_zoo code: install moe-zoo, or use push_to_hub()"
                )
            return publishing.push_folder(self, save_directory, repo_id, token=kwargs.get("token"), **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """``PreTrainedModel.push_to_hub``, uploading what :meth:`save_pretrained` writes (code and card included)
        after checking that it loads back (see :func:`moe_zoo.publishing.hub.push_model`)."""
        publishing = _publishing_hooks(self)
        if publishing is None:
            return super().push_to_hub(repo_id, **kwargs)
        return publishing.push_model(self, repo_id, **kwargs)


def _writes_checkpoint_files(model: PreTrainedModel, is_main_process: bool) -> bool:
    """Whether this process writes the files of ``model.save_pretrained``: transformers' own rule
    (``should_save_on_this_rank``: the main process, and rank 0 once torch.distributed is initialized)."""
    decide = getattr(model, "should_save_on_this_rank", None)
    if decide is not None:
        return decide(is_main_process)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return is_main_process and (not distributed or torch.distributed.get_rank() == 0)


_HUB_ARGUMENTS = ("repo_id", "commit_message", "commit_description", "private", "revision", "create_pr", "tags")


def _publishing_hooks(model) -> Any:
    """:mod:`moe_zoo.publishing.hooks` where ``model`` is a class of the installed moe_zoo, else None (in exported
    code, where moe_zoo is absent)."""
    if not type(model).__module__.startswith("moe_zoo."):
        return None
    return importlib.import_module("moe_zoo.publishing.hooks")


class MoeModelMixin(QuantizedExpertsMixin, PublishingMixin):
    """What every moe_zoo ``PreTrainedModel`` with MoE blocks inside a backbone adds to transformers' behaviour.

    List it before the ``PreTrainedModel`` base: ``class XPreTrainedModel(MoeModelMixin, PreTrainedModel)``.
    bitsandbytes loading quantizes its experts too (:mod:`moe_zoo.modeling.quantized_loading`).
    """

    # Routing decisions are discrete: keep routers, the balancing bias and MoE++'s gating residual maps (which add
    # to router logits) in fp32 when loading in fp16/bf16.
    _keep_in_fp32_modules_strict = [
        "mlp.gate.weight",
        "mlp.gate.sim_matrix",
        "mlp.gate.gates",
        "mlp.gating_residual.weight",
        "selection_bias",
        "experts_mask",
    ]
    _can_compile_fullgraph = False  # variable routing (top-p, top-any, capacity) is data-dependent
    # transformers caches "can this class set its experts implementation" on the class it first asks; a dense parent
    # (Llava, Llama) asked first would hand its False down to our subclass. None makes each of our classes ask itself.
    _can_set_experts_implementation_cached_value = None

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """moe_zoo's own experts implementation (:mod:`moe_zoo.core.fused_experts`) unless another is asked for;
        transformers' default would be ``grouped_mm``."""
        return super().get_correct_experts_implementation(requested_experts or EXPERTS_IMPLEMENTATION)

    def initialize_weights(self) -> None:
        initialize_moe_modules(self)
        super().initialize_weights()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MOE_MODULE_TYPES):
            module.reset_parameters(self.config.initializer_range)
        else:
            super()._init_weights(module)

    def packed_use_cache(self, position_ids, attention_mask, cache, use_cache: bool | None) -> bool | None:
        """The ``use_cache`` to run a forward with, so that padding-free packed batches stay separate.

        ``DataCollatorWithFlattening`` packs several sequences into one row with restarting ``position_ids`` and no
        attention mask; sdpa and eager attention then build their block-diagonal mask from the positions, but only
        when no cache exists. With ``config.use_cache=True`` (the default, and what a forward outside the Trainer
        sees) a cache would be created and the sequences would silently attend across their boundaries. So a
        packed batch without a cache runs with ``use_cache=False``; asking for a cache explicitly is refused.
        """
        if cache is not None or attention_mask is not None or not packed_positions(position_ids):
            return use_cache
        if use_cache:
            raise ValueError(
                "use_cache=True with packed sequences (position_ids that restart inside a row, no attention_mask, as "
                "DataCollatorWithFlattening makes): with a cache the sequences would attend to each other. Pass "
                "use_cache=False (the Trainer does), or an attention_mask for padded batches."
            )
        return False

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The MoE blocks, in layer order."""
        return moe_blocks(self)

    def router_outputs(
        self, loss: torch.Tensor | None, routing: list, attention_mask: torch.Tensor | None, enabled: bool
    ) -> dict:
        """``loss``, ``aux_loss`` and ``router_logits`` of an output, from the routing a forward collected.

        With ``enabled`` (``output_router_logits``) the weighted router loss of :func:`moe_zoo.core.router_aux_loss`
        is computed over the non-padding tokens of a 2D ``attention_mask`` and added to ``loss`` when there is one.
        """
        if not enabled:
            return {"loss": loss, "aux_loss": None, "router_logits": None}
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if token_mask is not None and routing and token_mask.numel() != routing[0].logits.shape[0]:
            # A cached step (generate): the mask covers the past too, the routing only the new positions.
            token_mask = token_mask[:, -(routing[0].logits.shape[0] // token_mask.shape[0]) :]
        aux_loss = router_aux_loss(routing, self.config, token_mask)
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss.to(loss.device)
        return {"loss": loss, "aux_loss": aux_loss, "router_logits": tuple(r.logits for r in routing)}


def packed_positions(position_ids: torch.Tensor | None) -> bool:
    """Whether ``position_ids (B, S)`` restart inside a row, i.e. hold several packed sequences."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[..., 1:] != position_ids[..., :-1] + 1).any())


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The MoE blocks of ``model``, in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


@torch.no_grad()
def upcycle_weights(
    dense: nn.Module,
    moe: PreTrainedModel,
    dense_decoder: nn.Module,
    moe_decoder: nn.Module,
    config: Any,
    num_layers: int,
    router_init_std: float,
) -> None:
    """Fill ``moe`` (built on the meta device, then ``to_empty``) from ``dense``: every tensor the two share by
    name is copied, every expert of each MoE block becomes a copy of the dense FFN of its layer, a single shared
    expert of the FFN's size too, and routers start fresh (normal(0, ``router_init_std``)).

    The two models must use the same names outside the MoE blocks; a mismatch raises ``ValueError``. A ``dense`` whose
    parameters DeepSpeed ZeRO-3 partitioned is gathered for the copy (:func:`full_parameters`).
    """
    with full_parameters(dense):
        indices = set(resolve_moe_layers(config.moe_layers, num_layers))
        dense_layers = find_decoder_layers(dense_decoder, num_layers)
        moe_layers = find_decoder_layers(moe_decoder, num_layers)
        ffn_prefixes = {f"{_module_name(moe, moe_layers[i].mlp)}." for i in indices}
        _copy_shared_tensors(dense, moe, ffn_prefixes)
        for index in tqdm(sorted(indices), desc="Upcycling FFNs into experts", leave=False):
            block: SparseMoeBlock = moe_layers[index].mlp
            dense_ffn = dense_layers[index].mlp
            copy_ffn_into_experts(dense_ffn, block.experts)
            if block.shared_expert is not None:
                if config.num_shared_experts == 1 and not config.shared_expert_intermediate_size:
                    copy_ffn_into_shared_expert(dense_ffn, block.shared_expert)
                else:
                    for linear in block.shared_expert.children():
                        moe._init_weights(linear)
            block.reset_routing(router_init_std)
    moe.tie_weights()


def _module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def _copy_shared_tensors(dense: nn.Module, moe: PreTrainedModel, ffn_prefixes: set[str]) -> None:
    """Copy every parameter and buffer (non-persistent ones such as RoPE frequencies included) that the two
    models share by name, i.e. everything but the FFNs that became MoE blocks; refuse any mismatch."""

    def in_moe_ffn(name: str) -> bool:
        return any(name.startswith(prefix) for prefix in ffn_prefixes)

    # Every name of a tied tensor (remove_duplicate=False): which alias ``named_parameters`` would keep depends on
    # module order (MoE-LLaVA registers ``lm_head`` before the embeddings), and may differ between the two models.
    dense_tensors = {**dict(dense.named_parameters(remove_duplicate=False)), **dict(dense.named_buffers())}
    moe_tensors = {**dict(moe.named_parameters(remove_duplicate=False)), **dict(moe.named_buffers())}
    tied = getattr(moe, "all_tied_weights_keys", None) or {}
    missing = []
    for name, target in moe_tensors.items():
        if in_moe_ffn(name):
            continue
        if name in dense_tensors:
            target.copy_(dense_tensors[name])
        elif name not in tied:
            missing.append(name)
    unexpected = [n for n in dense_tensors if n not in moe_tensors and not in_moe_ffn(n)]
    if missing or unexpected:
        raise ValueError(
            f"Upcycling {type(dense).__name__} left tensors unmatched (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); the backbone's layout is not one upcycling supports."
        )
