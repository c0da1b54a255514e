"""QLoRA: MixLoRA and SMoRA adapters training on a bitsandbytes 4-bit (and 8-bit) base, saved and reloaded.

Models run in train mode where logits must match exactly: on a CPU bitsandbytes' ``Linear4bit`` repacks its weight
for a bf16 kernel on its first eval forward without gradients (see tests/test_quantized_experts.py).
"""

from __future__ import annotations

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import moe_zoo  # noqa: F401  (registers the MIXLORA and SMORA PEFT types)
from moe_zoo.core.quantized_experts import dense_weight, is_quantized_linear
from moe_zoo.peft import MixLoraConfig, SmoraConfig
from tests.peft.peft_test_models import VOCAB, tiny_causal_lm

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
FOUR_BIT = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny SmolLM2-shaped (Llama) dense base, saved in fp32."""
    folder = tmp_path_factory.mktemp("base")
    tiny_causal_lm("llama").save_pretrained(folder)
    return folder


def _adapter_config(method: str, **options):
    if method == "mixlora":
        return MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2, target_modules=TARGETS, **options)
    return SmoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **options)


def _quantized_base(base_dir, quantization=FOUR_BIT):
    base = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quantization)
    assert is_quantized_linear(base.model.layers[0].mlp.gate_proj)
    return base


@pytest.mark.parametrize("method", ["mixlora", "smora"])
def test_qlora_training_lowers_the_loss_and_the_adapter_reloads_with_identical_logits(base_dir, method, tmp_path):
    torch.manual_seed(0)
    base = prepare_model_for_kbit_training(_quantized_base(base_dir), use_gradient_checkpointing=False)
    model = get_peft_model(base, _adapter_config(method, task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"QLoRA {method} (NF4 base): loss {losses[0]:.3f} -> {losses[-1]:.3f} in 10 steps")
    assert losses[-1] < losses[0] - 0.2

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_quantized_base(base_dir), tmp_path / "adapter")
    model.train()
    reloaded.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_mixlora_on_a_4bit_base_computes_mixlora_on_the_dequantized_weights(base_dir):
    """The looped QLoRA path through bitsandbytes' matmul equals the fused kernel on an fp32 base holding the same,
    bitsandbytes-dequantized weights (and the same adapter)."""
    torch.manual_seed(0)
    quantized = get_peft_model(_quantized_base(base_dir), _adapter_config("mixlora", init_lora_weights=False))
    reference_base = LlamaForCausalLM.from_pretrained(base_dir)
    modules = dict(reference_base.named_modules())
    with torch.no_grad():
        for name, module in quantized.base_model.model.named_modules():
            if is_quantized_linear(module):
                modules[name.replace(".base_layer", "")].weight.copy_(dense_weight(module))
    reference = get_peft_model(reference_base, _adapter_config("mixlora", init_lora_weights=False))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(quantized))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    quantized.train()
    reference.train()
    got, expected = quantized(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-4
    got.square().mean().backward()
    expected.square().mean().backward()
    for (name, param), (_, ref_param) in zip(quantized.named_parameters(), reference.named_parameters(), strict=True):
        if param.requires_grad and "lora_" in name:
            assert (param.grad - ref_param.grad).abs().max() <= 1e-4, name


def test_mixlora_trains_on_an_8bit_base(base_dir):
    base = prepare_model_for_kbit_training(
        _quantized_base(base_dir, BitsAndBytesConfig(load_in_8bit=True)), use_gradient_checkpointing=False
    )
    model = get_peft_model(base, _adapter_config("mixlora", task_type="CAUSAL_LM")).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_B_gate_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_mixdora_experts_train_on_a_4bit_base(base_dir):
    model = get_peft_model(_quantized_base(base_dir), _adapter_config("mixlora", use_dora=True)).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_gate_proj" in n]
    assert magnitudes and all(torch.isfinite(p).all() and p.grad is not None for p in magnitudes)
