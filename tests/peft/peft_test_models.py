"""Tiny random decoder models for the PEFT tests (CPU, fp32, built in-process; nothing is downloaded)."""

from __future__ import annotations

import json

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from moe_zoo.peft import MixLoraConfig, MixLoraFeedForward, SmoraConfig, SmoraLinear

VOCAB = 64
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "phi": (PhiConfig, PhiForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}
"""Every architecture the MixLoRA tests build; their FFNs cover the three supported layouts."""
ARCH_ATTENTION = {"phi": ["q_proj", "k_proj", "v_proj", "dense"], "phi3": ["qkv_proj", "o_proj"]}
ARCH_FFN = {"phi": ["fc1", "fc2"], "phi3": ["gate_up_proj", "down_proj"]}


def attention_targets(arch: str) -> list[str]:
    return ARCH_ATTENTION.get(arch, ATTENTION)


def ffn_targets(arch: str) -> list[str]:
    """The FFN projections of ``arch``'s layout (input projections first, the output projection last)."""
    return ARCH_FFN.get(arch, FFN)


def tiny_causal_lm(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model of ``arch`` (a key of :data:`ARCHS`) in eval mode (hidden 32, FFN 48, head dim 8).
    Every Linear bias (Phi, Qwen2 have some) is N(0, 0.1), not transformers' zero init, so a wrongly counted bias
    shows (larger attention biases make Qwen2's tokens so alike that the router sends them to few experts)."""
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    config_class, model_class = ARCHS[arch]
    model = model_class(config_class(**sizes)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model


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


def arch_mixlora(arch: str, **overrides) -> MixLoraConfig:
    """:func:`mixlora` on every attention and FFN projection of ``arch``."""
    overrides.setdefault("target_modules", attention_targets(arch) + ffn_targets(arch))
    return mixlora(**overrides)


def randomize_dora_magnitudes(model: torch.nn.Module, seed: int = 4) -> None:
    """Scale every DoRA magnitude (PEFT's ``lora_magnitude_vector``, MixLoRA's ``lora_magnitude_<proj>``) by
    U(0.5, 1.5) per feature: at init they equal ``||W + s B A||`` and DoRA would compute plain LoRA."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude" in name:
                param.mul_(torch.rand(param.shape, generator=generator) + 0.5)


def copy_lora_into_mixlora(lora, mix, ffn_projections) -> int:
    """Copy every LoRA (and DoRA magnitude) tensor of PEFT's model into the same place of the one-expert MixLoRA
    model: attention modules one to one, FFN projections into row [0] of the stacked expert tensors."""
    copied = 0
    with torch.no_grad():
        for name, module in lora.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            parts = {
                "A": module.lora_A["default"].weight,
                "B": module.lora_B["default"].weight,
                "magnitude": module.lora_magnitude_vector["default"].weight
                if "default" in module.lora_magnitude_vector
                else None,
            }
            parent_name, _, proj = name.rpartition(".")
            if proj in ffn_projections:
                ffn = mix.get_submodule(parent_name)
                for kind, tensor in parts.items():
                    if tensor is not None:
                        getattr(ffn, f"lora_{kind}_{proj}")["default"][0].copy_(tensor)
            else:
                target = mix.get_submodule(name)
                target.lora_A["default"].weight.copy_(parts["A"])
                target.lora_B["default"].weight.copy_(parts["B"])
                if parts["magnitude"] is not None:
                    target.lora_magnitude_vector["default"].weight.copy_(parts["magnitude"])
            copied += 1
    return copied


def save_adapter(model: torch.nn.Module, adapter_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """Save ``model``'s adapter and return ``(adapter_config.json, weights)``, checking what every PEFT method must
    write: the two files, and keys free of the adapter name and of frozen base weights."""
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    assert not any("default" in key for key in weights), "adapter name leaked into the saved keys"
    assert not any("base_layer" in key for key in weights), "frozen base weights were saved with the adapter"
    return json.loads((adapter_dir / "adapter_config.json").read_text()), weights


def reload_adapter(base_dir, adapter_dir, config_cls: type, tuner_cls: type) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The adapter loaded back both ways, ``PeftModel.from_pretrained`` on the base folder and
    ``AutoPeftModelForCausalLM``, in eval mode, after checking the config and tuner classes PEFT dispatched to."""
    assert isinstance(PeftConfig.from_pretrained(adapter_dir), config_cls)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert isinstance(reloaded.base_model, tuner_cls) and isinstance(auto.base_model, tuner_cls)
    return reloaded, auto
