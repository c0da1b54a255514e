"""Tiny random decoder models for the PEFT tests (CPU, fp32, built in-process; nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moe_zoo.peft import MixLoraConfig, MixLoraFeedForward, SmoraConfig, SmoraLinear

VOCAB = 64
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def tiny_causal_lm(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A 2-layer random Llama or Qwen2 in eval mode (hidden 32, FFN 48)."""
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()
    raise ValueError(f"unknown arch {arch!r}")


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every LoRA B (zero at init) random values, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def batch(seed: int = 2, batch_size: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mixlora(**overrides) -> MixLoraConfig:
    """A small MixLoRA config on every attention and FFN projection; ``overrides`` replace its fields."""
    values = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=ATTENTION + FFN, task_type="CAUSAL_LM")
    values.update(overrides)
    return MixLoraConfig(**values)


def ffns(model: torch.nn.Module) -> list[MixLoraFeedForward]:
    """The MixLoRA FFNs of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MixLoraFeedForward)]


def smora(**overrides) -> SmoraConfig:
    """A small SMoRA config (r=8, 2 active ranks) on every attention and FFN projection; ``overrides`` replace its
    fields."""
    values = dict(r=8, activate_r=2, lora_alpha=16, target_modules=ATTENTION + FFN, task_type="CAUSAL_LM")
    values.update(overrides)
    return SmoraConfig(**values)


def smora_layers(model: torch.nn.Module) -> list[SmoraLinear]:
    """The SMoRA layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SmoraLinear)]
