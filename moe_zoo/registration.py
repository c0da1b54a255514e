"""Registration of every moe_zoo architecture with transformers' Auto classes (run once, on ``import moe_zoo``).

transformers has no entry-point discovery, so importing the package is what makes ``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` find our model types. Registering twice is harmless.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling.upcycled_moe import UpcycledMoeConfig, UpcycledMoeForCausalLM


def register_auto_classes() -> None:
    AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(UpcycledMoeConfig, UpcycledMoeForCausalLM, exist_ok=True)
