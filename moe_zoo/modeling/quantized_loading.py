"""bitsandbytes loading for moe_zoo models: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
quantizes the expert banks too, not only the ``nn.Linear`` layers transformers converts.

How it plugs into transformers (5.25) without copying its loader:

- **From a full-precision checkpoint.** transformers' bitsandbytes quantizer converts the ``nn.Linear`` layers while
  loading (routers are not ``nn.Linear`` and are listed in ``_keep_in_fp32_modules_strict``; norms and embeddings are
  never converted; ``lm_head`` follows transformers' own skip rule), and the expert banks load in full precision.
  :meth:`QuantizedExpertsMixin.from_pretrained` then replaces each bank by a
  :class:`~moe_zoo.core.quantized_experts.QuantizedExperts`, quantizing one projection of one expert at a time and
  freeing the bank's full-precision tensors as it goes. Banks whose names match the quantizer's
  ``modules_to_not_convert`` (``llm_int8_skip_modules``) stay in full precision. Limitation: while loading, the
  full-precision experts are in memory once (quantizing inside transformers' per-tensor loading would need a
  quantizer of our own); the loaded model holds only the packed experts.
- **Saving** writes the packed buffers (``...experts.gate_up_proj.packed``, ``.absmax``, ...), transformers'
  ``quantization_config`` and, on each MoE config, ``quantized_experts`` (:data:`CONFIG_FIELD`: how the experts are
  stored).
- **From a quantized checkpoint.** ``post_init`` sees ``quantized_experts`` on the config and builds empty quantized
  banks (on the meta device) before transformers loads the packed buffers into them. Expert tensors missing from or
  unexpected in such a checkpoint raise a ``ValueError``: they are never silently initialised at random.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from ..core.block import SparseMoeBlock
from ..core.quantized_experts import (
    CONFIG_FIELD,
    FULL_PRECISION_BANKS,
    ExpertQuantization,
    QuantizedExperts,
    dequantize_experts,
    has_quantized_experts,
    install_empty_quantized_experts,
    quantize_experts,
)

ALL_BANKS = (*FULL_PRECISION_BANKS, QuantizedExperts)


def saved_expert_quantization(config: PreTrainedConfig) -> ExpertQuantization | None:
    """The expert quantization a (loaded) config records, or None."""
    saved = getattr(config, CONFIG_FIELD, None)
    return ExpertQuantization(**saved) if saved else None


def _moe_configs(model: nn.Module) -> list[PreTrainedConfig]:
    """The configs that describe ``model``'s MoE layers: the top-level config, every nested config with
    ``num_experts`` (MoE-LLaVA's inside Metis-HOME's ``base_config``) and the configs the MoE blocks read."""
    found: dict[int, PreTrainedConfig] = {}

    def visit(config: Any, top: bool) -> None:
        if not isinstance(config, PreTrainedConfig) or id(config) in found:
            return
        if top or hasattr(config, "num_experts"):
            found[id(config)] = config
        for value in vars(config).values():
            visit(value, False)

    visit(model.config, True)
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            visit(module.config, True)
    return list(found.values())


def record_expert_quantization(model: nn.Module, spec: ExpertQuantization) -> None:
    """Write ``quantized_experts`` on every MoE config of ``model``, so a saved checkpoint loads back quantized."""
    for config in _moe_configs(model):
        setattr(config, CONFIG_FIELD, spec.to_dict())


def _expert_keys(keys: Any, bank_names: list[str]) -> list[str]:
    return sorted(k for k in keys or () if any(k == n or k.startswith(f"{n}.") for n in bank_names))


def finish_quantized_loading(model: nn.Module, loading_info: dict) -> None:
    """After ``from_pretrained``: quantize the banks of a full-precision checkpoint loaded with a bitsandbytes
    ``quantization_config``; for quantized banks (or banks about to be), refuse expert tensors that were missing,
    mismatched or unexpected, rather than run (or quantize) experts initialised at random."""
    banks = [name for name, module in model.named_modules() if isinstance(module, ALL_BANKS)]
    quantized = has_quantized_experts(model)
    spec = None
    if getattr(model, "hf_quantizer", None) is not None:
        spec = ExpertQuantization.from_quantization_config(getattr(model.config, "quantization_config", None))
    if not quantized and spec is None:
        return
    problems = {
        kind: _expert_keys(keys, banks)
        for kind, keys in (
            ("missing", loading_info.get("missing_keys")),
            ("mismatched", [entry[0] for entry in loading_info.get("mismatched_keys") or ()]),
            ("unexpected", loading_info.get("unexpected_keys")),
        )
    }
    if any(problems.values()):
        details = ", ".join(f"{kind}: {keys[:6]}" for kind, keys in problems.items() if keys)
        raise ValueError(
            f"The checkpoint's expert tensors do not match the model's expert banks ({details}); experts are never "
            f"initialised at random when loading quantized. A quantized checkpoint needs `{CONFIG_FIELD}` in its "
            "config (save_pretrained writes it); a full-precision one needs every expert tensor."
        )
    if spec is not None:
        skip = getattr(model.hf_quantizer, "modules_to_not_convert", None)
        if quantize_experts(model, spec, keep=lambda name: not should_convert_module(name, skip)):
            record_expert_quantization(model, spec)


class QuantizedExpertsMixin:
    """List it before the ``PreTrainedModel`` base of a moe_zoo model: bitsandbytes loading quantizes its experts
    (see the module docstring)."""

    def post_init(self) -> None:
        spec = saved_expert_quantization(self.config)
        if spec is not None:
            install_empty_quantized_experts(self, spec)
        super().post_init()

    def dequantize(self, dtype: torch.dtype | None = None):
        """transformers' ``dequantize`` (the bitsandbytes ``nn.Linear`` layers), and the expert banks too: the
        result is a full-precision model that saves as one."""
        model = super().dequantize(dtype=dtype)
        dtype = dtype or getattr(self.config, "dtype", None) or torch.float32
        dequantize_experts(model, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        for config in _moe_configs(model):
            if hasattr(config, CONFIG_FIELD):
                delattr(config, CONFIG_FIELD)
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the expert banks quantized or checked
        (:func:`finish_quantized_loading`)."""
        wants_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        model, info = super().from_pretrained(*args, **kwargs)
        finish_quantized_loading(model, info)
        return (model, info) if wants_info else model
