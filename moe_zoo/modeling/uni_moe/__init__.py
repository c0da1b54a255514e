from .configuration_uni_moe import MODALITIES, UniMoeConfig
from .convert_uni_moe_original import convert_original_inputs, convert_uni_moe_original
from .modeling_uni_moe import UniMoeForConditionalGeneration, UniMoeModel, UniMoePreTrainedModel
from .processing_uni_moe import UNI_MOE_CHAT_TEMPLATE, UNI_MOE_SYSTEM_PROMPT, UniMoeProcessor
from .upcycling import upcycle_uni_moe

__all__ = [
    "MODALITIES",
    "UNI_MOE_CHAT_TEMPLATE",
    "UNI_MOE_SYSTEM_PROMPT",
    "UniMoeConfig",
    "UniMoeForConditionalGeneration",
    "UniMoeModel",
    "UniMoePreTrainedModel",
    "UniMoeProcessor",
    "convert_original_inputs",
    "convert_uni_moe_original",
    "upcycle_uni_moe",
]
