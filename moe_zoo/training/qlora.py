"""QLoRA for a stage's trainable set (MoE-tuning on a 4-bit / 8-bit base): what a stage would train in full precision
is realised on a bitsandbytes-quantized model as

- its full-precision parameters (routers, biases, norms, embeddings, anything left unquantized) train directly;
- every quantized ``nn.Linear`` (``Linear4bit`` / ``Linear8bitLt``) in the set gets a PEFT LoRA adapter
  (``<layer>.lora_A.default.weight``, ``<layer>.lora_B.default.weight``; the packed weight moves to
  ``<layer>.base_layer.weight``), injected with ``peft.inject_adapter_in_model`` into the model itself (no
  ``PeftModel`` wrapper, so the stage's model stays a MoE-LLaVA model with its own class and methods);
- every quantized expert projection (:class:`~moe_zoo.core.quantized_experts.QuantizedProjection`) in the set gets
  per-expert LoRA factors (``<projection>.lora_A (E, r, in)``, ``<projection>.lora_B (E, out, r)``).

:func:`merge_qlora` ends such a stage the way QLoRA users do: the base is dequantized and the LoRA deltas are added
to the **dequantized** weights. The quantized model computes with exactly those dequantized weights, so the merged
full-precision model equals the trained one up to float rounding; it differs from the full-precision model the stage
started from by the quantization error of the base.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..core.quantized_experts import QuantizedProjection, dense_weight, is_quantized_linear, quantized_tensor_names

ADAPTER_NAME = "default"
"""The PEFT adapter name the quantized ``nn.Linear`` layers' LoRA gets (PEFT's default)."""


def is_quantized_model(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes-quantized weights (``nn.Linear`` layers or expert banks)."""
    return bool(quantized_tensor_names(model))


def quantize_in_memory(model: Any, quantization_config: Any, auto_class: Any) -> Any:
    """``model`` reloaded through ``from_pretrained(..., quantization_config=...)``: transformers quantizes while
    loading only, so a model built or upcycled in memory (MoE-tuning's stage I and III) is saved to a temporary
    folder and loaded back quantized (its expert banks too). The full-precision copy is freed before loading."""
    with tempfile.TemporaryDirectory(prefix="moe-zoo-qlora-") as folder:
        model.save_pretrained(folder)
        del model
        return auto_class.from_pretrained(folder, quantization_config=quantization_config, dtype=torch.float32)


def _quantized_targets(model: nn.Module, patterns: Sequence[re.Pattern]) -> tuple[list[str], list[QuantizedProjection]]:
    """The quantized ``nn.Linear`` layers (by module name) and expert projections whose quantized tensors the
    trainable set ``patterns`` covers."""
    covered = {name for name in quantized_tensor_names(model) if any(p.match(name) for p in patterns)}
    linears, projections = [], []
    for name, module in model.named_modules():
        if is_quantized_linear(module) and f"{name}.weight" in covered:
            linears.append(name)
        elif isinstance(module, QuantizedProjection) and any(
            f"{name}.{b}" in covered for b, _ in module.named_buffers()
        ):
            projections.append(module)
    return linears, projections


def add_qlora_adapters(model: nn.Module, patterns: Sequence[re.Pattern], rank: int, alpha: float) -> None:
    """Put LoRA (rank ``rank``, scaling ``alpha / rank``, ``B`` zero so nothing changes before training) on every
    quantized weight ``patterns`` cover: PEFT LoRA on the ``nn.Linear`` layers, per-expert factors on the expert
    projections. Raises ``ValueError`` for a model that holds no quantized weight (QLoRA would be plain training)."""
    if rank < 1:
        raise ValueError(f"qlora_rank must be >= 1, got {rank}.")
    if not is_quantized_model(model):
        raise ValueError(
            "QLoRA needs a quantized model (loaded with a bitsandbytes quantization_config, e.g. load_in_4bit=True); "
            "this one holds no quantized weight. Drop qlora_rank to train it in full precision."
        )
    linears, projections = _quantized_targets(model, patterns)
    if linears:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=linears)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for projection in projections:
        projection.add_lora(rank, alpha)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT LoRA layers (those wrapping a ``base_layer``) under ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def has_qlora_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries QLoRA adapters (PEFT LoRA layers or per-expert LoRA factors)."""
    return bool(_lora_layers(model)) or any(
        isinstance(module, QuantizedProjection) and module.lora_rank for module in model.modules()
    )


def show_adapters_to_trainer(model: nn.Module) -> Callable[[], None]:
    """Mark ``model`` as carrying adapters the way transformers' own ``add_adapter`` does
    (``_hf_peft_config_loaded``), so that the ``Trainer``'s check against training a "purely quantized" model (which
    knows only ``PeftModel`` wrappers and that flag) passes for a model whose LoRA was injected in place; returns
    the function that removes the mark again, to call once the ``Trainer`` is built. Left on, the mark would make
    ``save_pretrained`` write only PEFT's adapter (and want a newer peft for it), while the Trainer's checkpoints
    should hold the whole model."""
    if not has_qlora_adapters(model):
        raise ValueError("This quantized model carries no QLoRA adapter; set the stage's trainable set first.")
    previous = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True

    def hide() -> None:
        model._hf_peft_config_loaded = previous

    return hide


@torch.no_grad()
def merge_qlora(model: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Turn a trained QLoRA model into a plain full-precision one, in place, and return it: each PEFT LoRA layer
    becomes an ``nn.Linear`` holding ``dequantize(W) + s * B A`` (its bias kept), then ``model.dequantize()``
    dequantizes the remaining bitsandbytes layers and the expert banks (merging their per-expert ``s * B_e A_e``)
    and removes the quantization config, so ``save_pretrained`` writes a full model folder that ``from_pretrained``
    loads (and may load quantized again)."""
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        weight = dense_weight(base).to(torch.float32)
        for adapter in layer.active_adapters:
            weight = weight + layer.get_delta_weight(adapter).to(torch.float32)
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter(weight.to(dtype))
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    return model.dequantize(dtype=dtype)


__all__ = [
    "ADAPTER_NAME",
    "add_qlora_adapters",
    "has_qlora_adapters",
    "is_quantized_model",
    "merge_qlora",
    "quantize_in_memory",
    "show_adapters_to_trainer",
]
