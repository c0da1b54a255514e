"""MixLoRA as a PEFT method: LoRA experts on a shared frozen FFN, chosen per token by a top-k router."""

from .config import EXPERT_FORWARDS, MIXLORA_PEFT_TYPE, ROUTING_STRATEGIES, MixLoraConfig
from .layer import FFN_LAYOUTS, MixLoraFeedForward
from .model import MixLoraModel
from .original_format import export_mixlora_adapter, is_original_mixlora_adapter, load_mixlora_adapter

__all__ = [
    "EXPERT_FORWARDS",
    "FFN_LAYOUTS",
    "MIXLORA_PEFT_TYPE",
    "ROUTING_STRATEGIES",
    "MixLoraConfig",
    "MixLoraFeedForward",
    "MixLoraModel",
    "export_mixlora_adapter",
    "is_original_mixlora_adapter",
    "load_mixlora_adapter",
]
