"""LoRA-expert PEFT methods. Importing this package registers them with PEFT (see :mod:`.registration`)."""

from .mixlora import MixLoraConfig, MixLoraFeedForward, MixLoraModel
from .registration import register_peft_methods

__all__ = ["MixLoraConfig", "MixLoraFeedForward", "MixLoraModel", "register_peft_methods"]
