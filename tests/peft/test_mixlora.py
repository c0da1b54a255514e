"""MixLoRA's behaviour: it reduces to PEFT's LoRA with one expert, the fused path equals the naive one, the router
loss reaches the model's loss, merging is refused and bad configs are rejected."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_test_models import (
    ARCHS,
    arch_mixlora,
    attention_targets,
    batch,
    copy_lora_into_mixlora,
    ffn_targets,
    ffns,
    mixlora,
    randomize_dora_magnitudes,
    randomize_lora_b,
    tiny_causal_lm,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moe_zoo  # noqa: F401  (registers MIXLORA)
from moe_zoo.core import collect_routing

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
"""LoRA options the one-expert equivalence runs with (each passed to both PEFT's LoraConfig and MixLoraConfig)."""


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_expert_equals_peft_lora_with_the_same_weights(arch, variant):
    """One expert with top-1 routing has weight 1 on every token, so MixLoRA must compute PEFT's LoRA (rsLoRA's
    alpha/sqrt(r) scaling, DoRA with magnitudes away from their init) on the same modules, for every FFN layout."""
    options = VARIANTS[variant]
    targets = attention_targets(arch)[:2] + ffn_targets(arch)
    lora = get_peft_model(tiny_causal_lm(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options))
    randomize_lora_b(lora)
    inputs = batch()
    with torch.no_grad():
        before = lora(**inputs).logits
    randomize_dora_magnitudes(lora)
    mix = get_peft_model(tiny_causal_lm(arch), mixlora(num_experts=1, top_k=1, target_modules=targets, **options))
    assert copy_lora_into_mixlora(lora, mix, ffn_targets(arch)) == 2 * len(targets)
    with torch.no_grad():
        expected = lora(**inputs).logits
        got = mix(**inputs).logits
        with lora.disable_adapter():
            untouched = lora(**inputs).logits
    if variant == "dora":
        assert (before - expected).abs().max() > 1e-3, "the DoRA magnitudes should change the logits"
    assert len(ffns(mix)) == 2
    assert all(
        ffn.expert_scaling["default"] == lora.peft_config["default"].lora_alpha / (2 if variant == "rslora" else 4)
        for ffn in ffns(mix)
    )
    assert (expected - untouched).abs().max() > 1e-3, "the LoRA weights should change the logits"
    assert (got - expected).abs().max() <= 1e-5


def test_fresh_adapter_computes_the_base_model():
    """B = 0 at init and the top-k weights sum to 1, so a new MixLoRA model is the dense model."""
    base = tiny_causal_lm()
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
        got = get_peft_model(base, mixlora()).eval()(**inputs).logits
    assert (got - expected).abs().max() <= 1e-5


def _fused_and_naive_pair(arch: str, **options):
    fused = get_peft_model(tiny_causal_lm(arch), arch_mixlora(arch, expert_forward="fused", **options))
    randomize_lora_b(fused)
    randomize_dora_magnitudes(fused)
    with torch.no_grad():  # a router that separates tokens more than the 0.02 init does
        for ffn in ffns(fused):
            ffn.moe_gate["default"].weight.normal_(0.0, 1.0)
    naive = get_peft_model(tiny_causal_lm(arch), arch_mixlora(arch, expert_forward="naive", **options))
    set_peft_model_state_dict(naive, get_peft_model_state_dict(fused))
    for a, b in zip(get_peft_model_state_dict(fused).values(), get_peft_model_state_dict(naive).values(), strict=True):
        assert torch.equal(a, b)
    return fused, naive


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_forward_equals_naive_in_outputs_and_gradients(arch, use_dora):
    """For every FFN layout (Phi's biased fc1/fc2 included) and with DoRA experts (whose output projection the fused
    path runs per expert), fused and naive agree in logits, loss and every trainable gradient."""
    fused, naive = _fused_and_naive_pair(arch, use_dora=use_dora)
    assert {ffn.expert_forward["default"] for ffn in ffns(fused)} == {"fused"}
    assert {ffn.expert_forward["default"] for ffn in ffns(naive)} == {"naive"}
    inputs = batch(batch_size=3, length=11)
    results = []
    for model in (fused, naive):
        model.train()
        with collect_routing() as records:
            out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), grads, records))
    (logits_f, loss_f, grads_f, records), (logits_n, loss_n, grads_n, _) = results
    chosen = torch.cat([r.indices.reshape(-1) for r in records])
    assert chosen.unique().numel() == 4, "the test needs tokens routed to every expert"
    assert (logits_f - logits_n).abs().max() <= 1e-5
    assert (loss_f - loss_n).abs() <= 1e-5
    assert grads_f.keys() == grads_n.keys()
    output_projection = ffn_targets(arch)[-1]
    assert any(f"lora_B_{output_projection}" in name for name in grads_f)
    assert any("moe_gate" in name for name in grads_f)
    assert any(f"lora_magnitude_{output_projection}" in name for name in grads_f) == use_dora
    for name, grad in grads_f.items():
        assert (grad - grads_n[name]).abs().max() <= 1e-5, name
        assert grad.abs().sum() > 0, f"{name} got no gradient"


def test_aux_loss_is_added_to_the_loss_and_masks_padding():
    coef = 0.5
    model, _ = _fused_and_naive_pair("llama")
    without = get_peft_model(tiny_causal_lm(), mixlora(router_aux_loss_coef=0.0))
    set_peft_model_state_dict(without, get_peft_model_state_dict(model))
    model.peft_config["default"].router_aux_loss_coef = coef
    inputs = batch()
    inputs["attention_mask"][0, :3] = 0  # left padding in the first row
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad(), collect_routing() as records:
        out = model(**inputs, labels=labels)
    with torch.no_grad():
        lm_only = without(**inputs, labels=labels)
    expected_aux = load_balancing_loss_func(tuple(r.logits for r in records), 4, 2, inputs["attention_mask"])
    unmasked_aux = load_balancing_loss_func(tuple(r.logits for r in records), 4, 2, None)
    assert len(records) == 2
    assert (unmasked_aux - expected_aux).abs() > 1e-4, "padding should change the aux loss in this test"
    assert torch.allclose(out.aux_loss, expected_aux, atol=1e-6)
    assert torch.allclose(out.loss, lm_only.loss + coef * expected_aux, atol=1e-6)
    with torch.no_grad():
        no_labels = model(**inputs)
    assert no_labels.loss is None and torch.allclose(no_labels.aux_loss, expected_aux, atol=1e-6)


def test_only_adapter_weights_train():
    model = get_peft_model(tiny_causal_lm(), mixlora(target_modules=["q_proj", "up_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("mlp.moe_gate.default.weight") for n in trainable)
    assert any(n.endswith("mlp.lora_A_up_proj.default") for n in trainable)
    assert not any("base_layer" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)
    assert all(ffn.targeted["default"] == ("up_proj",) for ffn in ffns(model))


def test_expert_lora_overrides_expert_rank_only():
    model = get_peft_model(tiny_causal_lm(), mixlora(expert_lora={"r": 2, "lora_alpha": 6}))
    ffn = ffns(model)[0]
    assert ffn.lora_A_gate_proj["default"].shape == (4, 2, 32)
    assert ffn.lora_B_down_proj["default"].shape == (4, 32, 2)
    assert ffn.expert_scaling["default"] == 3.0
    assert model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_A["default"].out_features == 4


def test_merging_is_refused_with_a_clear_error():
    model = get_peft_model(tiny_causal_lm(), mixlora())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        ffns(model)[0].merge()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"routing_strategy": "mixlora-top-any"}, r"must be one of \(.mixlora., .mixlora-dynamic."),
        ({"top_k": 5}, "between 1 and `num_experts`"),
        ({"num_experts": 0}, "positive integer"),
        ({"expert_forward": "grouped"}, "fused"),
        ({"expert_lora": {"rank": 2}}, "allowed keys"),
    ],
)
def test_bad_configs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        mixlora(**overrides)


def test_unknown_target_module_raises_value_error():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_causal_lm(), mixlora(target_modules=["w_gate"]))


def test_disable_adapter_gives_the_base_model_and_generate_runs():
    base = tiny_causal_lm()
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(base, mixlora())
    randomize_lora_b(model)
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        generated = model.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert (adapted - expected).abs().max() > 1e-2
    assert torch.equal(disabled, expected)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A_gate_proj" in n)


def test_fused_matches_naive_with_a_bfloat16_base():
    """A bf16 base FFN with the fp32 experts and router: the fused kernel casts where the naive path does, so both
    agree to bf16 precision and the adapter gradients stay fp32."""
    model = get_peft_model(tiny_causal_lm(), mixlora())
    randomize_lora_b(model)
    fused = ffns(model)[0]
    fused.base_layer.to(torch.bfloat16)
    naive = copy.deepcopy(fused)
    naive.expert_forward["default"] = "naive"
    x = torch.randn(2, 9, fused.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    results = []
    for ffn in (fused, naive):
        inputs = x.clone().requires_grad_()
        out = ffn(inputs)
        out.float().sum().backward()
        grads = {name: p.grad for name, p in ffn.named_parameters() if p.grad is not None}
        results.append((out.float(), inputs.grad.float(), grads))
    (out_f, grad_x_f, grads_f), (out_n, grad_x_n, grads_n) = results
    assert out_f.abs().max() > 0.1
    assert (out_f - out_n).abs().max() <= 2e-2 * out_n.abs().max()
    assert (grad_x_f - grad_x_n).abs().max() <= 3e-2 * grad_x_n.abs().max()
    assert grads_f.keys() == grads_n.keys() and len(grads_f) == 7
    for name, grad in grads_f.items():
        assert grad.dtype == torch.float32, name
        assert (grad - grads_n[name]).abs().max() <= 3e-2 * grads_n[name].abs().max(), name
