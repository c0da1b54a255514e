"""LoRA-expert PEFT methods (MixLoRA, SMoRA); importing this package registers them with PEFT (see :mod:`.registration`)."""

from .mixlora import (
    MixLoraConfig,
    MixLoraFeedForward,
    MixLoraModel,
    export_mixlora_adapter,
    is_original_mixlora_adapter,
    load_mixlora_adapter,
)
from .registration import register_peft_methods
from .smora import SmoraConfig, SmoraLinear, SmoraModel

__all__ = [
    "MixLoraConfig",
    "MixLoraFeedForward",
    "MixLoraModel",
    "export_mixlora_adapter",
    "is_original_mixlora_adapter",
    "load_mixlora_adapter",
    "register_peft_methods",
    "SmoraConfig",
    "SmoraLinear",
    "SmoraModel",
]
