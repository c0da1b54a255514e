from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import UpcycledMoeForCausalLM, UpcycledMoePreTrainedModel
from .upcycling import max_logit_difference, upcycle

__all__ = [
    "UpcycledMoeConfig",
    "UpcycledMoeForCausalLM",
    "UpcycledMoePreTrainedModel",
    "max_logit_difference",
    "upcycle",
]
