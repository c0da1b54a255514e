"""MIXLORA (and SMORA) are PEFT types after ``import moe_zoo``: create, save, reload (PeftModel and AutoPeftModel)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import mapping as peft_mapping
from peft_test_models import (
    ARCHS,
    ATTENTION,
    FFN,
    attention_targets,
    batch,
    ffn_targets,
    randomize_dora_magnitudes,
    randomize_lora_b,
    reload_adapter,
    save_adapter,
    tiny_causal_lm,
)
from transformers import AutoModelForCausalLM

import moe_zoo  # noqa: F401  (registers MIXLORA and SMORA)
from moe_zoo.peft import MixLoraConfig, MixLoraModel, SmoraConfig, SmoraModel
from moe_zoo.peft.registration import PEFT_TABLES, peft_tables, register_peft_methods


def test_peft_still_has_the_tables_we_register_into():
    """Fails loudly when a PEFT release renames or retypes the dispatch dicts registration.py writes to."""
    tables = peft_tables()
    assert set(tables) == set(PEFT_TABLES)
    assert tables["PEFT_TYPE_TO_CONFIG_MAPPING"]["LORA"].__name__ == "LoraConfig"
    assert tables["PEFT_TYPE_TO_TUNER_MAPPING"]["LORA"].__name__ == "LoraModel"
    assert tables["PEFT_TYPE_TO_PREFIX_MAPPING"]["LORA"] == "lora_"
    # The modules that dispatch must share these very dict objects (they import them by name).
    from peft import peft_model
    from peft.utils import save_and_load

    assert peft_model.PEFT_TYPE_TO_TUNER_MAPPING is peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING
    assert peft_model.PEFT_TYPE_TO_CONFIG_MAPPING is peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    assert save_and_load.PEFT_TYPE_TO_TUNER_MAPPING is peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING


def test_import_registers_mixlora_idempotently():
    register_peft_methods()
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["MIXLORA"] is MixLoraConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["MIXLORA"] is MixLoraModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["MIXLORA"] == MixLoraModel.prefix


def test_import_registers_smora_idempotently():
    """registration.py registers every moe-zoo PEFT type; SMoRA's round trips are in test_smora_registration.py."""
    register_peft_methods()
    register_peft_methods()
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["SMORA"] is SmoraConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["SMORA"] is SmoraModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["SMORA"] == SmoraModel.prefix == "lora_"
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["MIXLORA"] is MixLoraConfig


def _mixlora_config(**overrides) -> MixLoraConfig:
    values = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=ATTENTION + FFN, task_type="CAUSAL_LM")
    values.update(overrides)
    return MixLoraConfig(**values)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_and_reload_gives_identical_logits(tmp_path, arch):
    base_dir = tmp_path / "base"
    tiny_causal_lm(arch).save_pretrained(base_dir)
    config = _mixlora_config(target_modules=attention_targets(arch) + ffn_targets(arch), use_dora=arch == "phi")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(), config)
    randomize_lora_b(model)
    randomize_dora_magnitudes(model)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits

    adapter_dir = tmp_path / "adapter"
    saved, weights = save_adapter(model, adapter_dir)
    assert saved["peft_type"] == "MIXLORA"
    assert (saved["num_experts"], saved["top_k"], saved["routing_strategy"]) == (4, 2, "mixlora")
    keys = weights.keys()
    assert "base_model.model.model.layers.0.mlp.moe_gate.weight" in keys
    assert f"base_model.model.model.layers.1.mlp.lora_A_{ffn_targets(arch)[-1]}" in keys
    assert f"base_model.model.model.layers.0.self_attn.{attention_targets(arch)[0]}.lora_A.weight" in keys
    if arch == "phi":  # DoRA: one magnitude per expert on the FFN, PEFT's on the attention LoRA
        assert "base_model.model.model.layers.1.mlp.lora_magnitude_fc2" in keys
        assert "base_model.model.model.layers.0.self_attn.dense.lora_magnitude_vector" in keys
    assert not any("selection_bias" in key for key in keys), "the unused router bias should not be saved"

    reloaded, auto = reload_adapter(base_dir, adapter_dir, MixLoraConfig, MixLoraModel)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
        assert torch.equal(auto(**inputs).logits, expected)


def test_adapter_can_be_loaded_under_another_name(tmp_path):
    model = get_peft_model(tiny_causal_lm(), _mixlora_config())
    randomize_lora_b(model)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path, adapter_name="mine")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


def test_docs_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "mixlora.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/mixlora.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "mixlora-adapter" / "adapter_model.safetensors").is_file()
