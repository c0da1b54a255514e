"""moe-zoo: Mixture-of-Experts systems from recent papers as native Hugging Face transformers models.

``import moe_zoo`` registers every moe_zoo architecture with transformers' Auto classes.
"""

from .core import MoeOptions, SparseMoeBlock, update_selection_biases
from .modeling.metis_home import MetisHomeConfig, MetisHomeForConditionalGeneration, expand_to_metis_home
from .modeling.moe_llava import (
    MoeLlavaConfig,
    MoeLlavaForConditionalGeneration,
    MoeLlavaProcessor,
    upcycle_moe_llava,
)
from .modeling.uni_moe import UniMoeConfig, UniMoeForConditionalGeneration
from .modeling.upcycled_moe import (
    UpcycledMoeConfig,
    UpcycledMoeForCausalLM,
    bam_upcycle,
    max_logit_difference,
    upcycle,
)
from .peft import MixLoraConfig, MixLoraModel  # noqa: F401  (importing it registers the MIXLORA PEFT type)
from .registration import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "MetisHomeConfig",
    "MetisHomeForConditionalGeneration",
    "MoeLlavaConfig",
    "MoeLlavaForConditionalGeneration",
    "MoeLlavaProcessor",
    "MoeOptions",
    "SparseMoeBlock",
    "UniMoeConfig",
    "UniMoeForConditionalGeneration",
    "UpcycledMoeConfig",
    "UpcycledMoeForCausalLM",
    "__version__",
    "bam_upcycle",
    "expand_to_metis_home",
    "max_logit_difference",
    "update_selection_biases",
    "upcycle_moe_llava",
    "upcycle",
]
