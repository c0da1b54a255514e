from .configuration_uni_moe import MODALITIES, UniMoeConfig
from .modeling_uni_moe import UniMoeForConditionalGeneration, UniMoeModel, UniMoePreTrainedModel

__all__ = [
    "MODALITIES",
    "UniMoeConfig",
    "UniMoeForConditionalGeneration",
    "UniMoeModel",
    "UniMoePreTrainedModel",
]
