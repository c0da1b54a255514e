from .configuration_moe_llava import MoeLlavaConfig
from .convert_moe_llava_original import convert_moe_llava_original
from .modeling_moe_llava import MoeLlavaForConditionalGeneration, MoeLlavaModel, MoeLlavaPreTrainedModel
from .processing_moe_llava import MOE_LLAVA_CHAT_TEMPLATE, MOE_LLAVA_SYSTEM_PROMPT, MoeLlavaProcessor
from .upcycling import upcycle_moe_llava

__all__ = [
    "MOE_LLAVA_CHAT_TEMPLATE",
    "MOE_LLAVA_SYSTEM_PROMPT",
    "MoeLlavaConfig",
    "MoeLlavaForConditionalGeneration",
    "MoeLlavaModel",
    "MoeLlavaPreTrainedModel",
    "MoeLlavaProcessor",
    "convert_moe_llava_original",
    "upcycle_moe_llava",
]
