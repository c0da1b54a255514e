"""4-bit and 8-bit loading that quantizes the experts too (moe_zoo.core.quantized_experts,
moe_zoo.modeling.quantized_loading).

bitsandbytes runs on the CPU, so nothing here is skipped. One bitsandbytes behaviour shapes the logit comparisons:
on a CPU, ``Linear4bit`` repacks its weight for a bf16 kernel on its first eval forward without gradients, so the
same model's logits move by ~2e-3 between its first and second call. Comparisons that must be exact therefore run the
models in train mode (no dropout in these tiny models), where every layer takes the dequantize-then-matmul path.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    PreTrainedModel,
)

import moe_zoo
from moe_zoo.core.experts import GatedExpertsBase, PlainExpertsBase
from moe_zoo.core.quantized_experts import (
    CONFIG_FIELD,
    ExpertQuantization,
    QuantizedExperts,
    is_quantized_linear,
    require_bitsandbytes,
)
from moe_zoo.modeling.upcycled_moe import UpcycledMoeForCausalLM
from moe_zoo.training.moe_tuning import set_trainable
from tests.remote_loading import load_in_fresh_process, save_reference
from tests.test_remote_code import FAMILIES

SPECS = {
    "nf4-double-quant": ExpertQuantization(bits=4, quant_type="nf4", double_quant=True),
    "fp4": ExpertQuantization(bits=4, quant_type="fp4"),
    "int8": ExpertQuantization(bits=8, quant_type="int8"),
}
CONFIGS = {
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}
AUTO = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoModelForImageTextToText": AutoModelForImageTextToText}


def _reference_weight(weight: torch.Tensor, spec: ExpertQuantization) -> torch.Tensor:
    """Each expert's slice quantized and dequantized by bitsandbytes on its own, stacked back: what the quantized
    bank must compute with."""
    experts = []
    for matrix in weight.detach():
        if spec.bits == 8:
            codes, row_absmax, _ = bnbF.int8_vectorwise_quant(matrix.contiguous())
            experts.append(bnbF.int8_vectorwise_dequant(codes, row_absmax))
        else:
            packed, state = bnbF.quantize_4bit(
                matrix.contiguous(), blocksize=64, compress_statistics=spec.double_quant, quant_type=spec.quant_type
            )
            experts.append(bnbF.dequantize_4bit(packed, state))
    return torch.stack(experts)


def _bank(gated: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    bank = (GatedExpertsBase if gated else PlainExpertsBase)(None, 6, 48, 40, "silu")
    for name, param in bank.named_parameters():
        torch.nn.init.normal_(param, std=0.5 if name.endswith("_bias") else 0.1)
    return bank


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_the_quantized_expert_pass_equals_fp32_experts_with_per_expert_bnb_dequantized_weights(gated, spec_name):
    spec = SPECS[spec_name]
    bank = _bank(gated)
    quantized = QuantizedExperts.from_bank(bank, spec)
    reference = _bank(gated)
    with torch.no_grad():
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            if hasattr(reference, name):
                getattr(reference, name).copy_(_reference_weight(getattr(bank, name), spec))
    x = torch.randn(13, 48, requires_grad=True)
    indices = torch.randint(0, 6, (13, 2))
    indices[3, 1] = 6  # an empty slot: no expert runs for it
    weights = torch.rand(13, 2, requires_grad=True)
    ours, theirs = quantized(x, indices, weights), reference(x, indices, weights)
    assert (ours - theirs).abs().max() <= 1e-5
    grads = torch.autograd.grad(ours.square().sum(), (x, weights))
    reference_grads = torch.autograd.grad(theirs.square().sum(), (x, weights))
    for got, expected in zip(grads, reference_grads, strict=True):
        assert (got - expected).abs().max() <= 1e-5
    assert not any(p.requires_grad for p in quantized.parameters())  # quantized experts (and biases) are frozen


def _save(model: PreTrainedModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory) -> dict[str, tuple[Path, dict, torch.Tensor]]:
    root = tmp_path_factory.mktemp("fp32")
    saved = {}
    for name, (build, _) in FAMILIES.items():
        model, inputs = build()
        with torch.no_grad():
            logits = model.train()(**inputs).logits
        saved[name] = (_save(model, root / name), inputs, logits)
    return saved


@pytest.mark.parametrize("bits", list(CONFIGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_loads_quantized_and_reloads_identically(saved_families, family, bits, tmp_path):
    folder, inputs, fp32_logits = saved_families[family]
    auto = AUTO[FAMILIES[family][1]]
    model = auto.from_pretrained(folder, quantization_config=CONFIGS[bits]).train()
    banks = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert banks and all(b.spec.bits == (4 if bits == "4bit" else 8) for b in banks)
    assert not any(isinstance(m, (GatedExpertsBase, PlainExpertsBase)) for m in model.modules())
    for name, param in model.named_parameters():  # routers and norms stay full precision
        if ".mlp.gate." in name or "norm" in name or name.startswith("router."):
            assert param.dtype == torch.float32, name
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    agreement = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    print(f"{family} {bits}: top-1 agreement with fp32 {agreement:.2f} (random tiny model)")
    assert agreement >= 0.3  # random tiny models have near-tied logits; the real check is the SmolLM2 test

    model.save_pretrained(tmp_path / "quantized")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    reloaded = auto.from_pretrained(tmp_path / "quantized").train()
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    for key, tensor in state.items():
        if ".experts." in key:
            assert torch.equal(reloaded_state[key], tensor), key


def _tiny_upcycled(tmp_path: Path) -> tuple[Path, UpcycledMoeForCausalLM]:
    """A model whose experts hold most of its weights, as in a real MoE."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    moe = moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=8, num_experts_per_tok=2)
    return _save(moe, tmp_path / "fp32"), moe


def _ideal_4bit_bytes(model: PreTrainedModel, skipped: tuple[str, ...]) -> float:
    """4-bit storage of every large weight (0.5 byte a parameter + one fp32 absmax per 64-value block); what
    bitsandbytes never quantizes (embeddings, ``lm_head``, routers, norms, biases) at its own size."""
    total = 0.0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        large = tensor.dim() >= 2 and not name.startswith(skipped) and ".mlp.gate." not in name
        total += tensor.numel() * (0.5 + 4 / 64) if large else tensor.numel() * tensor.element_size()
    return total


def test_the_4bit_footprint_is_near_ideal_and_far_below_what_transformers_alone_gives(tmp_path):
    folder, moe = _tiny_upcycled(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ours = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
    # transformers' own loading (the from_pretrained that moe_zoo's models extend): nn.Linear layers only.
    plain_loader = PreTrainedModel.from_pretrained.__func__
    transformers_alone = plain_loader(UpcycledMoeForCausalLM, folder, quantization_config=quantization)
    assert any(isinstance(m, GatedExpertsBase) for m in transformers_alone.modules())
    ideal = _ideal_4bit_bytes(moe, skipped=("model.embed_tokens.", "lm_head."))
    footprint = ours.get_memory_footprint()
    ratio, alone_ratio = footprint / ideal, transformers_alone.get_memory_footprint() / ideal
    print(
        f"4-bit footprint {footprint / 1e3:.0f} KB = {ratio:.3f}x ideal; transformers alone {alone_ratio:.2f}x; "
        f"fp32 {moe.get_memory_footprint() / ideal:.2f}x"
    )
    assert ratio <= 1.25
    assert footprint <= 0.35 * transformers_alone.get_memory_footprint()
    assert not is_quantized_linear(ours.lm_head)  # transformers' own rule keeps the output layer


def test_the_8bit_footprint_is_near_ideal(tmp_path):
    folder, moe = _tiny_upcycled(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CONFIGS["8bit"])
    ideal = 0.0  # int8 storage of every large weight: 1 byte a parameter + one fp32 scale per output row
    for name, tensor in [*moe.named_parameters(), *moe.named_buffers()]:
        large = tensor.dim() >= 2 and not name.startswith(("model.embed_tokens.", "lm_head.")) and ".gate." not in name
        ideal += (
            tensor.numel() + 4 * tensor.numel() / tensor.shape[-1] if large else tensor.numel() * tensor.element_size()
        )
    ratio = ours.get_memory_footprint() / ideal
    print(f"8-bit footprint {ours.get_memory_footprint() / 1e3:.0f} KB = {ratio:.3f}x ideal")
    assert ratio <= 1.25


def _held_out_text() -> str:
    """English prose shipped with Python itself (docstrings of the standard library), never seen in tuning here."""
    import argparse
    import logging
    import textwrap

    return "\n\n".join(inspect.getdoc(module) for module in (argparse, logging, textwrap, json))


def test_the_smollm2_moe_in_4bit_agrees_with_fp32_on_most_next_tokens(smollm2_dir, tmp_path):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_layers=[0, 10, 20, 29])
    with torch.no_grad():  # experts that differ from each other
        for block in moe.moe_blocks():
            for weight in (block.experts.gate_up_proj, block.experts.down_proj):
                weight.mul_(1 + 0.05 * torch.randn_like(weight))
    moe.save_pretrained(tmp_path / "fp32")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(_held_out_text(), return_tensors="pt").input_ids[:, :384]
    with torch.no_grad():
        expected = moe.eval()(ids).logits.argmax(-1)
        got = quantized.eval()(ids).logits.argmax(-1)
    agreement = (got == expected).float().mean().item()
    ideal = _ideal_4bit_bytes(moe, skipped=("model.embed_tokens.", "lm_head."))
    print(
        f"SmolLM2-135M MoE (4 experts in 4 layers), NF4 + double quant: next-token top-1 agreement with fp32 "
        f"{agreement:.3f} on {ids.shape[1]} held-out tokens; footprint {quantized.get_memory_footprint() / 1e6:.1f} "
        f"MB ({quantized.get_memory_footprint() / ideal:.3f}x the ideal), fp32 {moe.get_memory_footprint() / 1e6:.1f} MB"
    )
    assert agreement >= 0.65  # measured 0.73 on a 2-core AMD CPU (see docs/quantization.md)


def test_missing_bitsandbytes_gives_an_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=r"`bitsandbytes`.*pip install bitsandbytes"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="bitsandbytes"):
        QuantizedExperts.from_bank(_bank(True), SPECS["fp4"])
    import transformers.quantizers.quantizer_bnb_4bit as bnb_4bit

    monkeypatch.setattr(bnb_4bit, "is_bitsandbytes_available", lambda: False)
    folder = _save(
        moe_zoo.upcycle(
            AutoModelForCausalLM.from_config(
                LlamaConfig(
                    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
                )
            )
        ),
        tmp_path / "m",
    )
    with pytest.raises(ImportError, match="bitsandbytes"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=CONFIGS["4bit"])


def test_incomplete_quantized_checkpoints_raise_instead_of_initialising_experts(tmp_path):
    folder, _ = _tiny_upcycled(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CONFIGS["4bit"])
    quantized.save_pretrained(tmp_path / "q")
    weights_file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(weights_file)
    dropped = next(k for k in tensors if k.endswith("experts.down_proj.absmax"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="never initialised at random"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    del config[CONFIG_FIELD]  # a quantized checkpoint that no longer says its experts are quantized
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=CONFIG_FIELD):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_prepare_model_for_kbit_training_and_router_training_on_a_4bit_moe(tmp_path):
    from peft import prepare_model_for_kbit_training

    folder, _ = _tiny_upcycled(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CONFIGS["4bit"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    for block in model.moe_blocks():  # the routers are full precision and may train on the 4-bit base
        block.gate.weight.requires_grad_(True)
    model.train()
    ids = torch.randint(0, 128, (2, 10))
    model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
    assert all(block.gate.weight.grad is not None for block in model.moe_blocks())


def test_moe_tuning_refuses_to_train_quantized_weights_and_trains_what_stays_full_precision(saved_families):
    folder = saved_families["moe_llava"][0]
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=CONFIGS["4bit"])
    for stage in (1, 2, 3):  # bitsandbytes quantizes the projector's nn.Linear layers too
        with pytest.raises(ValueError, match="quantized .*cannot train"):
            set_trainable(model, stage)
    keep_projector = BitsAndBytesConfig(
        load_in_4bit=True, llm_int8_skip_modules=["model.multi_modal_projector", "lm_head"]
    )
    model = AutoModelForImageTextToText.from_pretrained(folder, quantization_config=keep_projector)
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())
    trainable = set_trainable(model, 1)
    assert trainable and all(name.startswith("model.multi_modal_projector.") for name in trainable)


def test_training_through_quantized_experts_saves_no_dequantized_weight_for_backward():
    quantized = QuantizedExperts.from_bank(_bank(True), SPECS["nf4-double-quant"])
    x = torch.randn(13, 48, requires_grad=True)
    indices, weights = torch.randint(0, 6, (13, 2)), torch.rand(13, 2, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = quantized(x, indices, weights)
    one_expert = {(80, 48), (48, 80), (48, 40), (40, 48)}  # gate_up (2I, H) and down (H, I), either way round
    assert saved and not any(shape in one_expert or len(shape) == 3 for shape in saved)
    out.sum().backward()
    assert x.grad is not None and weights.grad is not None


def test_dequantize_restores_full_precision_banks_with_the_bnb_dequantized_weights(tmp_path):
    folder, moe = _tiny_upcycled(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CONFIGS["4bit"]).dequantize()
    spec = SPECS["nf4-double-quant"]
    for block, original in zip(model.moe_blocks(), moe.moe_blocks(), strict=True):
        assert isinstance(block.experts, GatedExpertsBase)
        for name in ("gate_up_proj", "down_proj"):
            expected = _reference_weight(getattr(original.experts, name), spec)
            assert torch.equal(getattr(block.experts, name).detach(), expected)
    model.save_pretrained(tmp_path / "dequantized")
    config = json.loads((tmp_path / "dequantized" / "config.json").read_text())
    assert "quantization_config" not in config and CONFIG_FIELD not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    assert not any(isinstance(m, QuantizedExperts) for m in reloaded.modules())


def test_a_quantized_checkpoint_loads_with_trust_remote_code_where_moe_zoo_is_absent(tmp_path):
    folder, _ = _tiny_upcycled(tmp_path)
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=CONFIGS["4bit"]).save_pretrained(tmp_path / "q")
    assert {"quantized_experts.py", "quantized_loading.py"} <= {p.name for p in (tmp_path / "q").glob("*.py")}
    # Both sides make their first eval call on a model loaded from the quantized checkpoint (see the module docstring).
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    save_reference(reference, {"input_ids": torch.randint(0, 128, (2, 7))}, tmp_path / "q.pt")
    item = {"source": tmp_path / "q", "auto": "AutoModelForCausalLM", "reference": tmp_path / "q.pt"}
    result = load_in_fresh_process([item], tmp_path)
    assert not result["moe_zoo_imported"]
    assert result[str(tmp_path / "q")]["equal"], result
