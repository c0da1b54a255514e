"""``SmoraModel``: the PEFT tuner that replaces targeted ``nn.Linear`` layers with SMoRA layers.

It subclasses PEFT's ``LoraModel`` and reuses its walk over the model (``rank_pattern`` / ``alpha_pattern``,
``layers_to_transform``, ``exclude_modules``, ``modules_to_save``, adding and deleting adapters, ``unload``); only
the layer it creates differs. There is no auxiliary loss: the rank routers are balanced by their selection bias
(see :class:`~moe_zoo.peft.smora.layer.SmoraRankRouter`), which :func:`moe_zoo.core.update_selection_biases` updates
like every other core router.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import SmoraConfig
from .layer import SmoraLinear


def unknown_target_names(model: nn.Module, target_modules: Iterable[str]) -> list[str]:
    """The names in a list of ``target_modules`` that match no module of ``model`` (PEFT's rule for a list: a module
    matches a name when its key is the name or ends with ``"." + name``)."""
    keys = [key for key, _ in model.named_modules() if key]
    return sorted(name for name in target_modules if not any(k == name or k.endswith(f".{name}") for k in keys))


class SmoraModel(LoraModel):
    """PEFT tuner of SMoRA (registered as PEFT type ``"SMORA"`` by :mod:`moe_zoo.peft.registration`).

    ``target_modules=None`` uses LoRA's defaults for the architecture (``q_proj`` / ``v_proj`` for Llama);
    ``"all-linear"`` targets every linear layer but the output head, as the original's example runs do.
    """

    prefix: str = "lora_"

    def _check_new_adapter_config(self, config: SmoraConfig) -> None:
        if not isinstance(config, SmoraConfig):
            raise ValueError(f"SmoraModel needs a SmoraConfig, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, *args: Any, state_dict: dict | None = None, **kwargs: Any
    ) -> None:
        """PEFT's injection, after refusing ``target_modules`` names that match no module.

        PEFT only raises when *no* name matches and silently skips the others, so a typo next to a valid name
        (``["q_proj", "v_prj"]``) would train a different adapter than asked for; SMoRA raises instead. Regex
        strings and ``"all-linear"`` are PEFT's to resolve.
        """
        targets = self.peft_config[adapter_name].target_modules
        if state_dict is None and isinstance(targets, (list, set, tuple)):
            unknown = unknown_target_names(model, targets)
            if unknown:
                raise ValueError(
                    f"`target_modules` names {unknown}, which match no module of the model; every name must be a "
                    "module name or the last part of one (e.g. 'q_proj' for 'model.layers.0.self_attn.q_proj')."
                )
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    @staticmethod
    def _create_new_module(lora_config: SmoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"`target_modules` matched `{kwargs.get('target_name', target)}` ({type(base).__name__}), but SMoRA "
                "adapts torch.nn.Linear layers only; remove it from `target_modules` (or add it to "
                "`exclude_modules`)."
            )
        # A bitsandbytes Linear4bit / Linear8bitLt base (QLoRA) works as is: SmoraLinear runs the frozen base layer
        # itself and adds the rank experts' delta in full precision (tests/test_qlora.py).
        return SmoraLinear(target, adapter_name, config=lora_config, **kwargs)

    def _merge_error(self) -> NotImplementedError:
        return NotImplementedError(
            "SMoRA adapters cannot be merged: the router gives every token its own active ranks and gate values, so "
            "no single weight matrix computes the adapted layer. Keep the adapter unmerged (PeftModel works for "
            "inference and generate as is)."
        )

    def _check_merge_allowed(self) -> None:
        raise self._merge_error()

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise self._merge_error()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        raise self._merge_error()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter is not supported for SMoRA adapters: a weighted sum of LoRA pairs has no rank "
            "router, and concatenating routers would change which ranks each token uses."
        )
