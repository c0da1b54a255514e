"""SMORA is a PEFT type after ``import moe_zoo``: create, save, reload (PeftModel and AutoPeftModel) with the same
logits, the trained selection bias included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft_test_models import batch, randomize_lora_b, reload_adapter, save_adapter, smora, smora_layers, tiny_causal_lm
from transformers import AutoModelForCausalLM

import moe_zoo  # noqa: F401  (registers SMORA)
from moe_zoo.peft import SmoraConfig, SmoraModel


def _trained_looking(model) -> None:
    """Random B, and selection biases / router weights away from their init, so a reload has something to lose."""
    randomize_lora_b(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in smora_layers(model):
            router = layer.lora_router["default"]
            router.selection_bias.copy_(torch.randn(router.selection_bias.shape, generator=generator) * 0.05)
            router.weight.add_(torch.randn(router.weight.shape, generator=generator))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_reload_gives_identical_logits(tmp_path, arch):
    base_dir = tmp_path / "base"
    tiny_causal_lm(arch).save_pretrained(base_dir)
    config = smora(r=8, activate_r=4, rank_partition=2, bias_balancing="original", bias_update_rate=2e-5)
    # eval() after wrapping: PEFT's new layers start in training mode, where "original" moves the bias every forward.
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    _trained_looking(model)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits

    adapter_dir = tmp_path / "adapter"
    saved, weights = save_adapter(model, adapter_dir)
    assert saved["peft_type"] == "SMORA"
    assert (saved["r"], saved["activate_r"], saved["rank_partition"]) == (8, 4, 2)
    assert (saved["bias_update_rate"], saved["bias_balancing"]) == (2e-5, "original")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    assert weights[f"{prefix}.lora_A.weight"].shape == (8, 32)
    assert weights[f"{prefix}.lora_B.weight"].shape == (32, 8)
    assert weights[f"{prefix}.lora_router.weight"].shape == (4, 32)
    bias = weights[f"{prefix}.lora_router.selection_bias"]
    assert bias.shape == (4,) and bias.dtype == torch.float32 and bias.abs().sum() > 0
    assert not any("pending_load" in key for key in weights), "the loads of an unfinished step are not saved"

    reloaded, auto = reload_adapter(base_dir, adapter_dir, SmoraConfig, SmoraModel)
    for loaded in (reloaded, auto):
        for ours, theirs in zip(smora_layers(model), smora_layers(loaded), strict=True):
            assert torch.equal(ours.lora_router["default"].selection_bias, theirs.lora_router["default"].selection_bias)
            assert theirs.lora_router["default"].original_balancing
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected)


def test_adapter_can_be_loaded_under_another_name_and_trained_further(tmp_path):
    model = get_peft_model(tiny_causal_lm(), smora())
    _trained_looking(model)
    inputs = batch()
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path, adapter_name="mine", is_trainable=True)
    assert any(n.endswith("lora_router.mine.weight") and p.requires_grad for n, p in reloaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**inputs).logits, expected)


def test_docs_example_runs(tmp_path, monkeypatch):
    page = Path(__file__).resolve().parents[2] / "docs" / "smora.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/smora.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "smora-adapter" / "adapter_model.safetensors").is_file()
