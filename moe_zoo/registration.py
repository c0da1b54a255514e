"""Registration of every moe_zoo architecture with transformers' Auto classes (run once, on ``import moe_zoo``).

transformers has no entry-point discovery, so importing the package is what makes ``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` find our model types. Registering twice is harmless.
"""

from __future__ import annotations

import transformers
from transformers import AutoConfig, AutoProcessor, PreTrainedConfig, PreTrainedModel

from .core.fused_experts import register_experts_implementation
from .modeling.metis_home import MetisHomeConfig, MetisHomeForConditionalGeneration
from .modeling.moe_llava import MoeLlavaConfig, MoeLlavaForConditionalGeneration, MoeLlavaModel, MoeLlavaProcessor
from .modeling.uni_moe import UniMoeConfig, UniMoeForConditionalGeneration, UniMoeModel, UniMoeProcessor
from .modeling.upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM

AUTO_MODEL_CLASSES: dict[type[PreTrainedConfig], dict[str, type[PreTrainedModel]]] = {
    UpcycledMoeConfig: {"AutoModelForCausalLM": UpcycledMoeForCausalLM},
    MoeLlavaConfig: {"AutoModel": MoeLlavaModel, "AutoModelForImageTextToText": MoeLlavaForConditionalGeneration},
    UniMoeConfig: {
        "AutoModel": UniMoeModel,
        "AutoModelForMultimodalLM": UniMoeForConditionalGeneration,
        "AutoModelForImageTextToText": UniMoeForConditionalGeneration,
    },
    MetisHomeConfig: {
        "AutoModelForCausalLM": MetisHomeForConditionalGeneration,
        "AutoModelForImageTextToText": MetisHomeForConditionalGeneration,
    },
}
"""Each moe_zoo config class and the model class each transformers Auto class maps it to. The one table that
registration and the remote-code export (:mod:`moe_zoo.publishing.remote_code`) both read."""

PROCESSOR_CLASSES = {MoeLlavaConfig: MoeLlavaProcessor, UniMoeConfig: UniMoeProcessor}


def auto_classes_for(config_class: type[PreTrainedConfig]) -> dict[str, type[PreTrainedModel]]:
    """The Auto class name -> model class map of a moe_zoo config class."""
    try:
        return AUTO_MODEL_CLASSES[config_class]
    except KeyError:
        raise ValueError(f"{config_class.__name__} is not a moe_zoo config class") from None


def register_auto_classes() -> None:
    register_experts_implementation()  # first: the models' default experts implementation
    for config_class, auto_classes in AUTO_MODEL_CLASSES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_class in auto_classes.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
    for config_class, processor_class in PROCESSOR_CLASSES.items():
        AutoProcessor.register(config_class, processor_class, exist_ok=True)
        processor_class.register_for_auto_class()  # saved processors carry their code (see publishing)
