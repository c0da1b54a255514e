"""Registration of every moe_zoo architecture with transformers' Auto classes (run once, on ``import moe_zoo``).

transformers has no entry-point discovery, so importing the package is what makes ``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` find our model types. Registering twice is harmless.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .core.fused_experts import register_experts_implementation
from .modeling.metis_home import MetisHomeConfig, MetisHomeForConditionalGeneration
from .modeling.moe_llava import MoeLlavaConfig, MoeLlavaForConditionalGeneration, MoeLlavaModel, MoeLlavaProcessor
from .modeling.uni_moe import UniMoeConfig, UniMoeForConditionalGeneration, UniMoeModel, UniMoeProcessor
from .modeling.upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM


def register_auto_classes() -> None:
    register_experts_implementation()  # first: the models' default experts implementation
    AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(UpcycledMoeConfig, UpcycledMoeForCausalLM, exist_ok=True)
    AutoConfig.register(MoeLlavaConfig.model_type, MoeLlavaConfig, exist_ok=True)
    AutoModel.register(MoeLlavaConfig, MoeLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(MoeLlavaConfig, MoeLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MoeLlavaConfig, MoeLlavaProcessor, exist_ok=True)
    AutoConfig.register(UniMoeConfig.model_type, UniMoeConfig, exist_ok=True)
    AutoModel.register(UniMoeConfig, UniMoeModel, exist_ok=True)
    AutoModelForMultimodalLM.register(UniMoeConfig, UniMoeForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(UniMoeConfig, UniMoeForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(UniMoeConfig, UniMoeProcessor, exist_ok=True)
    AutoConfig.register(MetisHomeConfig.model_type, MetisHomeConfig, exist_ok=True)
    AutoModelForCausalLM.register(MetisHomeConfig, MetisHomeForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(MetisHomeConfig, MetisHomeForConditionalGeneration, exist_ok=True)
