"""MixLoRA on every supported FFN layout (gate/up/down of Llama, Qwen2, Mistral, Gemma; Phi's biased fc1/fc2;
Phi-3's fused gate_up_proj), with LoRA and DoRA experts: the mixture equals transformers' own MLP run with each
expert's effective weights, biases are counted once per unit of routing weight, expert dropout reaches only the LoRA
input (as PEFT's LoRA does), and unsupported layouts or projections fail with a ValueError."""

from __future__ import annotations

import copy
import math

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
from torch import nn

import moe_zoo  # noqa: F401  (registers MIXLORA)
from moe_zoo.peft.mixlora import FFN_LAYOUTS, MixLoraConfig, MixLoraFeedForward

STRATEGIES = {
    "mixlora": {},
    "mixlora-dynamic": {"routing_strategy": "mixlora-dynamic", "top_p": 0.6},
    "mixlora-switch": {"routing_strategy": "mixlora-switch", "expert_capacity": 6},
}
"""Routing whose weights sum to 1 per token (top-k), to less (top-p's raw probabilities) and to 0 for the tokens
that switch drops over capacity: the output projection's bias must follow the sum."""


def trained_like(model, seed: int = 3):
    """Random LoRA B, DoRA magnitudes away from their init and a router that separates tokens (std 1)."""
    randomize_lora_b(model)
    randomize_dora_magnitudes(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ffn in ffns(model):
            weight = ffn.moe_gate["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


def expert_as_dense_ffn(ffn: MixLoraFeedForward, expert: int) -> nn.Module:
    """A copy of the frozen transformers MLP whose targeted weights are expert ``expert``'s effective weights,
    ``W + s B A`` (LoRA) or ``m / ||W + s B A|| * (W + s B A)`` per output row (DoRA), biases unchanged: running it
    is the expert written out in weight space, with the model's own forward (activation, Phi-3's chunking)."""
    dense = copy.deepcopy(ffn.base_layer)
    scaling = ffn.expert_scaling["default"]
    with torch.no_grad():
        for name in ffn.targeted["default"]:
            linear = getattr(dense, name)
            lora_a = getattr(ffn, f"lora_A_{name}")["default"][expert]
            lora_b = getattr(ffn, f"lora_B_{name}")["default"][expert]
            weight = linear.weight + scaling * lora_b @ lora_a
            if ffn.use_dora["default"]:
                magnitude = getattr(ffn, f"lora_magnitude_{name}")["default"][expert]
                weight = (magnitude / weight.norm(dim=1)).unsqueeze(-1) * weight
            linear.weight.copy_(weight)
    return dense


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixture_equals_the_models_mlp_with_each_experts_weights(arch, use_dora, strategy):
    model = trained_like(
        get_peft_model(tiny_causal_lm(arch), arch_mixlora(arch, use_dora=use_dora, **STRATEGIES[strategy]))
    )
    ffn = ffns(model)[0].eval()
    assert ffn.layout.projections == tuple(ffn_targets(arch))
    x = torch.randn(40, ffn.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, weights, indices = ffn.moe_gate["default"](x)
        got = ffn(x)
        experts = [expert_as_dense_ffn(ffn, e)(x) for e in range(4)]
    expected = torch.zeros_like(got)
    for t in range(x.shape[0]):
        for weight, expert in zip(weights[t].tolist(), indices[t].tolist(), strict=True):
            if expert < 4:
                expected[t] += weight * experts[expert][t]
    if strategy == "mixlora-switch":
        assert (indices == 4).any(), "the test should drop some tokens over capacity"
        dropped = (indices == 4).all(dim=-1)
        assert torch.equal(got[dropped], torch.zeros_like(got[dropped])), "a dropped token gets no FFN output"
    if strategy != "mixlora":
        routed_sum = (weights * (indices < 4)).sum(-1)
        assert (routed_sum < 0.999).any(), "the test needs tokens whose routing weights sum to less than 1"
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("strategy", ["mixlora-dynamic", "mixlora-switch"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["phi", "phi3", "qwen2"])
def test_fused_equals_naive_when_routing_weights_do_not_sum_to_one(arch, use_dora, strategy):
    """Phi's fc2 bias must be added ``bias * sum_e w_e`` times by the fused path (once per unit of routing
    weight), as each expert adds it in the naive one; outputs and gradients agree."""
    options = dict(use_dora=use_dora, **STRATEGIES[strategy])
    fused = trained_like(get_peft_model(tiny_causal_lm(arch), arch_mixlora(arch, expert_forward="fused", **options)))
    naive = get_peft_model(tiny_causal_lm(arch), arch_mixlora(arch, expert_forward="naive", **options))
    set_peft_model_state_dict(naive, get_peft_model_state_dict(fused))
    inputs = batch(batch_size=3, length=11)
    results = []
    for model in (fused, naive):
        model.eval()  # no jitter (switch defaults it to 0.01), so both see the same routing
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (logits_f, grads_f), (logits_n, grads_n) = results
    assert (logits_f - logits_n).abs().max() <= 1e-5
    assert grads_f.keys() == grads_n.keys()
    for name in grads_f:
        assert (grads_f[name] - grads_n[name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_expert_dropout_reaches_only_the_lora_input_as_in_peft(arch):
    """``expert_lora['lora_dropout']`` is the experts' dropout (the attention LoRA keeps the top-level 0): in
    training, one expert with top-1 draws the same masks on the same inputs as PEFT's LoRA with that dropout."""
    targets = ffn_targets(arch)
    lora = get_peft_model(tiny_causal_lm(arch), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=targets))
    randomize_lora_b(lora)
    config = mixlora(
        num_experts=1, top_k=1, lora_dropout=0.0, expert_lora={"lora_dropout": 0.3}, target_modules=targets
    )
    mix = get_peft_model(tiny_causal_lm(arch), config)
    copy_lora_into_mixlora(lora, mix, targets)
    assert all(isinstance(ffn.expert_dropout["default"], nn.Dropout) for ffn in ffns(mix))
    assert all(ffn.expert_dropout["default"].p == 0.3 for ffn in ffns(mix))
    inputs = batch()
    outputs = []
    for model in (lora, mix):
        model.train()
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
        model.eval()
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    lora_train, lora_eval, mix_train, mix_eval = outputs
    assert (lora_train - lora_eval).abs().max() > 1e-3, "dropout should act in training"
    assert (mix_train - lora_train).abs().max() <= 1e-5
    assert (mix_eval - lora_eval).abs().max() <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fused_equals_naive_with_expert_dropout_under_one_seed(use_dora):
    """Both paths draw the experts' dropout masks in the same order, so with one seed they agree in training."""
    options = dict(lora_dropout=0.2, use_dora=use_dora)
    fused = trained_like(get_peft_model(tiny_causal_lm("phi"), arch_mixlora("phi", expert_forward="fused", **options)))
    naive = get_peft_model(tiny_causal_lm("phi"), arch_mixlora("phi", expert_forward="naive", **options))
    set_peft_model_state_dict(naive, get_peft_model_state_dict(fused))
    inputs = batch()
    outputs = []
    for model in (fused, naive):
        model.train()
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    with torch.no_grad():
        eval_logits = fused.eval()(**inputs).logits
    assert (outputs[0] - eval_logits).abs().max() > 1e-3, "dropout should act in training"
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


def test_rslora_scales_the_experts_by_alpha_over_sqrt_r():
    config = mixlora(use_rslora=True, expert_lora={"r": 2, "lora_alpha": 6})
    assert config.expert_scaling == 6 / math.sqrt(2)
    model = get_peft_model(tiny_causal_lm(), config)
    assert all(ffn.expert_scaling["default"] == 6 / math.sqrt(2) for ffn in ffns(model))
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q_proj.scaling["default"] == 8 / math.sqrt(4), "attention LoRA keeps the top-level r and alpha"


@pytest.mark.parametrize("arch", ["gemma", "phi", "phi3"])
def test_default_targets_cover_every_projection_of_the_layout(arch):
    model = get_peft_model(tiny_causal_lm(arch), MixLoraConfig(r=4, lora_alpha=8, num_experts=2, task_type="CAUSAL_LM"))
    assert len(ffns(model)) == 2
    assert all(ffn.targeted["default"] == tuple(ffn_targets(arch)) for ffn in ffns(model))
    attention = model.get_submodule("base_model.model.model.layers.0.self_attn")
    assert all(hasattr(getattr(attention, name), "lora_A") for name in attention_targets(arch))


def test_layouts_are_declared_once_each():
    assert [layout.projections for layout in FFN_LAYOUTS] == [
        ("gate_proj", "up_proj", "down_proj"),
        ("fc1", "fc2"),
        ("gate_up_proj", "down_proj"),
    ]
    assert [layout.activation for layout in FFN_LAYOUTS] == ["act_fn", "activation_fn", "activation_fn"]


class _SwiGluWithoutActFn(nn.Module):
    """Named like a gated FFN but keeps its activation under another attribute: not a layout MixLoRA knows."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(32, 48, bias=False)
        self.up_proj = nn.Linear(32, 48, bias=False)
        self.down_proj = nn.Linear(48, 32, bias=False)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def test_an_unsupported_ffn_layout_raises_value_error_naming_the_supported_ones():
    model = tiny_causal_lm()
    for layer in model.model.layers:
        layer.mlp = _SwiGluWithoutActFn()
    supported = r"supported: gate_proj/up_proj/down_proj \+ act_fn .*fc1/fc2 \+ activation_fn .*gate_up_proj/down_proj"
    with pytest.raises(ValueError, match=r"_SwiGluWithoutActFn is not an FFN layout MixLoRA supports.*" + supported):
        get_peft_model(model, mixlora(target_modules=["q_proj", "up_proj"]))
    with pytest.raises(ValueError, match=supported):
        MixLoraFeedForward(_SwiGluWithoutActFn(), "default", mixlora(), {"up_proj"})


@pytest.mark.parametrize(
    ("arch", "targets", "missing"),
    [("phi", ["q_proj", "gate_proj"], "gate_proj"), ("llama", ["q_proj", "up_proj", "fc1"], "fc1")],
)
def test_targeting_a_projection_the_layout_lacks_raises_value_error(arch, targets, missing):
    """PEFT itself only fails when no target matches; MixLoRA refuses an FFN projection the model's layout lacks."""
    with pytest.raises(ValueError, match=rf"names the FFN projections \['{missing}'\], which this model's FFNs lack"):
        get_peft_model(tiny_causal_lm(arch), mixlora(target_modules=targets))
    ffn = tiny_causal_lm(arch).model.layers[0].mlp
    with pytest.raises(ValueError, match=rf"can target .*, got \['{missing}'\]"):
        MixLoraFeedForward(ffn, "default", mixlora(), {missing})
