"""SMoRA as a PEFT method: each LoRA rank is a rank-one expert, chosen per token by a sigmoid router."""

from .config import BIAS_BALANCING_MODES, SMORA_PEFT_TYPE, SmoraConfig
from .layer import SmoraLayer, SmoraLinear, SmoraRankRouter
from .model import SmoraModel

__all__ = [
    "BIAS_BALANCING_MODES",
    "SMORA_PEFT_TYPE",
    "SmoraConfig",
    "SmoraLayer",
    "SmoraLinear",
    "SmoraModel",
    "SmoraRankRouter",
]
