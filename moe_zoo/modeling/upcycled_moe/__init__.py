from .bam import bam_upcycle
from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import UpcycledMoeForCausalLM, UpcycledMoePreTrainedModel
from .upcycling import max_logit_difference, upcycle

__all__ = [
    "UpcycledMoeConfig",
    "bam_upcycle",
    "UpcycledMoeForCausalLM",
    "UpcycledMoePreTrainedModel",
    "max_logit_difference",
    "upcycle",
]
