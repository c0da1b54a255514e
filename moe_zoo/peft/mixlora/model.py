"""``MixLoraModel``: the PEFT tuner that turns targeted FFNs into MixLoRA FFNs and adds the router loss.

It subclasses PEFT's ``LoraModel``: targeted attention projections go through LoRA's own code unchanged. Targeted FFN
projections are only *recorded* while PEFT walks the model (replacing their FFN mid-walk would break PEFT's lookup of
the sibling projections it has still to visit); once the walk is done, each recorded FFN is replaced by one
:class:`~moe_zoo.peft.mixlora.layer.MixLoraFeedForward`.

The load-balancing loss: :meth:`MixLoraModel.forward` opens :func:`~moe_zoo.core.recording.collect_routing` around
the wrapped model, every MixLoRA FFN reports its router logits to it, and when ``labels`` are given the loss becomes
``lm_loss + router_aux_loss_coef * aux`` with aux in transformers' Mixtral form
(:func:`~moe_zoo.core.losses.switch_load_balancing_loss`, padding masked by ``attention_mask``). The unweighted aux
loss is returned as ``outputs.aux_loss``. With ``router_z_loss_coef`` > 0 (the default of ``"mixlora-switch"``) the
loss also gets ``router_z_loss_coef * z`` with ``z`` ST-MoE's z-loss (:func:`~moe_zoo.core.losses.router_z_loss`,
mean over layers), returned as ``outputs.z_loss``. ``PeftModelForCausalLM.forward`` calls this forward, so a
``Trainer`` optimises the sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft import LoraModel
from peft.tuners.tuners_utils import _get_submodules
from torch import nn
from transformers.utils import ModelOutput

from ...core.losses import router_z_loss, switch_load_balancing_loss
from ...core.recording import collect_routing
from .config import MixLoraConfig
from .layer import FFN_PROJECTIONS, MixLoraFeedForward, ffn_layout_of, supported_layouts

MIXLORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The original's template targets every attention and FFN projection."""
PHI_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
"""MoE-PEFT's Phi template (``templates/mixlora_phi.json``)."""
PHI3_DEFAULT_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
"""MoE-PEFT's Phi-3 template (``templates/mixlora_phi3.json``): the LoRA of ``gate_up_proj`` is one pair of width 2I."""


def _check_ffn_targets_exist(config: MixLoraConfig, pending: dict[str, set[str]], model: nn.Module) -> None:
    """PEFT only fails when *no* target matched; an FFN projection named in ``target_modules`` that none of the
    model's FFNs has (``gate_proj`` on Phi, ``fc1`` on Llama) would otherwise be dropped silently."""
    if isinstance(config.target_modules, str):
        return  # a regex: the user chose the matches
    named = [name for name in config.target_modules if name in FFN_PROJECTIONS]
    targeted = set().union(*pending.values()) if pending else set()
    missing = [name for name in named if name not in targeted]
    if not missing:
        return
    layouts = {layout.name for module in model.modules() if (layout := ffn_layout_of(module)) is not None}
    found = f"its FFNs are {sorted(layouts)}" if layouts else "it has no FFN of a supported layout"
    raise ValueError(
        f"`target_modules` names the FFN projections {missing}, which this model's FFNs lack ({found}). Target the "
        "projections of the model's own layout."
    )


ROUTER_LOSS_FIELDS = ("aux_loss", "z_loss")
_OUTPUT_TYPES_WITH_ROUTER_LOSSES: dict[type, type] = {}


def with_router_loss_fields(outputs: ModelOutput) -> ModelOutput:
    """``outputs`` as an instance of a subclass of its own type that declares ``aux_loss`` and ``z_loss`` fields.

    A ``ModelOutput`` is a dataclass registered as a pytree node; DistributedDataParallel flattens a module's output
    and rebuilds it with ``type(outputs)(**fields)``, so a key that is not a declared field (``aux_loss`` set on a
    plain ``CausalLMOutputWithPast``) makes every DDP forward fail. The subclass (one per wrapped output type,
    cached) declares both, so the output survives the round trip and still is an instance of the wrapped type.
    """
    output_type = type(outputs)
    declared = {f.name for f in dataclasses.fields(output_type)}
    missing = [name for name in ROUTER_LOSS_FIELDS if name not in declared]
    if not missing:
        return outputs
    subclass = _OUTPUT_TYPES_WITH_ROUTER_LOSSES.get(output_type)
    if subclass is None:
        subclass = dataclasses.make_dataclass(
            f"MixLora{output_type.__name__}",
            [(name, torch.FloatTensor | None, dataclasses.field(default=None)) for name in missing],
            bases=(output_type,),
            namespace={"__module__": __name__},
        )
        _OUTPUT_TYPES_WITH_ROUTER_LOSSES[output_type] = subclass
        globals()[subclass.__name__] = subclass  # found by name, so its outputs pickle like the wrapped type's
    return subclass(**outputs)


class MixLoraModel(LoraModel):
    """PEFT tuner of MixLoRA (registered as PEFT type ``"MIXLORA"`` by :mod:`moe_zoo.peft.registration`)."""

    prefix: str = "lora_"
    target_module_mapping = {
        "llama": MIXLORA_DEFAULT_TARGETS,
        "mistral": MIXLORA_DEFAULT_TARGETS,
        "qwen2": MIXLORA_DEFAULT_TARGETS,
        "gemma": MIXLORA_DEFAULT_TARGETS,
        "phi": PHI_DEFAULT_TARGETS,
        "phi3": PHI3_DEFAULT_TARGETS,
    }

    def _check_new_adapter_config(self, config: MixLoraConfig) -> None:
        if not isinstance(config, MixLoraConfig):
            raise ValueError(f"MixLoraModel needs a MixLoraConfig, got {type(config).__name__}.")
        if len(self.peft_config) > 1:
            raise ValueError(
                "moe-zoo's MixLoRA supports one adapter per model; this model already has "
                f"{[name for name in self.peft_config if self.peft_config[name] is not config]}."
            )
        super()._check_new_adapter_config(config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        self._pending_ffn_targets: dict[str, set[str]] = {}
        super().inject_adapter(model, adapter_name, **kwargs)
        config = self.peft_config[adapter_name]
        _check_ffn_targets_exist(config, self._pending_ffn_targets, model)
        for ffn_key, targeted in self._pending_ffn_targets.items():
            parent, ffn, ffn_name = _get_submodules(model, ffn_key)
            setattr(parent, ffn_name, MixLoraFeedForward(ffn, adapter_name, config, targeted))
        self._pending_ffn_targets = {}
        # PEFT froze and activated adapters before the FFNs existed; do it again now that they do.
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _create_and_replace(
        self, lora_config, adapter_name, target, target_name, parent, current_key, *, parameter_name=None
    ) -> None:
        layout = ffn_layout_of(parent)
        if parameter_name is None and layout is not None and target_name in layout.projections:
            ffn_key = current_key.rpartition(".")[0]
            self._pending_ffn_targets.setdefault(ffn_key, set()).add(target_name)
            return
        if parameter_name is None and target_name in FFN_PROJECTIONS:
            raise ValueError(
                f"`{current_key}` is named like an FFN projection, but its module {type(parent).__name__} is not an "
                f"FFN layout MixLoRA supports; supported: {supported_layouts()}. Remove it from `target_modules` to "
                "train only the other projections."
            )
        super()._create_and_replace(
            lora_config, adapter_name, target, target_name, parent, current_key, parameter_name=parameter_name
        )

    def forward(self, *args: Any, **kwargs: Any):
        labels = kwargs.get("labels")
        with collect_routing() as records:
            outputs = self.model(*args, **kwargs)
        if not records:
            return outputs
        config = self.peft_config[self.active_adapters[0]]
        mask = kwargs.get("attention_mask")
        token_mask = mask.reshape(-1) if mask is not None and mask.dim() == 2 else None
        logits = [r.logits for r in records]
        aux = switch_load_balancing_loss(logits, config.num_experts, config.experts_per_token, token_mask)
        z_loss = sum(router_z_loss(layer, token_mask) for layer in logits) / len(logits)
        router_loss = config.router_aux_loss_coef * aux + config.router_z_loss_coef * z_loss
        add_router_loss = labels is not None and (config.router_aux_loss_coef or config.router_z_loss_coef)
        if isinstance(outputs, tuple):
            if add_router_loss:
                outputs = (outputs[0] + router_loss.to(outputs[0].dtype),) + outputs[1:]
            return outputs
        outputs = with_router_loss_fields(outputs)
        if add_router_loss and outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + router_loss.to(outputs["loss"].dtype)
        outputs["aux_loss"] = aux
        if config.router_z_loss_coef:
            outputs["z_loss"] = z_loss
        return outputs

    def _merge_error(self) -> NotImplementedError:
        return NotImplementedError(
            "MixLoRA adapters cannot be merged: each token mixes a different set of LoRA experts chosen by the "
            "router, so no single weight matrix computes the FFN. Keep the adapter unmerged (PeftModel works for "
            "inference and generate as is)."
        )

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise self._merge_error()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        raise self._merge_error()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("add_weighted_adapter is not supported for MixLoRA adapters.")
