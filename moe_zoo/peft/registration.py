"""Registers moe-zoo's PEFT methods (MIXLORA, SMORA) with the installed PEFT.

PEFT 0.21.2 has ``peft.utils.register_peft_method``, but it refuses names missing from its ``PeftType`` enum, so an
outside package cannot use it. Every dispatch in PEFT (``get_peft_model``, ``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained``, ``get/set_peft_model_state_dict``, ``AutoPeftModel*``) looks the PEFT type string up
in three dicts of ``peft.mapping``; we add our entries to them, the way ``register_peft_method`` itself does, and
keep this the only place that touches PEFT's tables. ``tests/peft/test_mixlora_registration.py`` fails if a PEFT release
renames or retypes them, and checks that both types are registered.
"""

from __future__ import annotations

from peft import mapping as peft_mapping

from .mixlora import MIXLORA_PEFT_TYPE, MixLoraConfig, MixLoraModel
from .smora import SMORA_PEFT_TYPE, SmoraConfig, SmoraModel

PEFT_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
"""The ``peft.mapping`` dicts this module writes to."""


def peft_tables() -> dict[str, dict]:
    """The PEFT dispatch tables, or a ``RuntimeError`` naming the one this PEFT release lacks."""
    tables = {}
    for name in PEFT_TABLES:
        table = getattr(peft_mapping, name, None)
        if not isinstance(table, dict):
            raise RuntimeError(
                f"peft.mapping.{name} is missing or not a dict in this PEFT release; moe-zoo registers its PEFT "
                "methods there (tested with peft 0.21.2). Pin peft or update moe_zoo/peft/registration.py."
            )
        tables[name] = table
    return tables


PEFT_METHODS = {MIXLORA_PEFT_TYPE: (MixLoraConfig, MixLoraModel), SMORA_PEFT_TYPE: (SmoraConfig, SmoraModel)}
"""moe-zoo's PEFT types and their (config class, tuner class)."""


def register_peft_methods() -> None:
    """Make ``"MIXLORA"`` and ``"SMORA"`` PEFT types (idempotent; ``import moe_zoo`` calls it)."""
    tables = peft_tables()
    for peft_type, (config_cls, tuner_cls) in PEFT_METHODS.items():
        tables["PEFT_TYPE_TO_CONFIG_MAPPING"][peft_type] = config_cls
        tables["PEFT_TYPE_TO_TUNER_MAPPING"][peft_type] = tuner_cls
        tables["PEFT_TYPE_TO_PREFIX_MAPPING"][peft_type] = tuner_cls.prefix


register_peft_methods()
