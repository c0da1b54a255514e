"""MixLoRA's other routing strategies: ``"mixlora-dynamic"`` (top-p) picks what a brute-force top-p picks and mixes
the experts with their raw probabilities; ``"mixlora-switch"`` (top-1) drops exactly the tokens over capacity and
adds the router z-loss; fused == naive for both; bad values are refused; save/reload keeps the logits."""

from __future__ import annotations

import copy
import json

import mixlora as mixlora_package
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_test_models import batch, ffns, mixlora, randomize_lora_b, tiny_causal_lm

import moe_zoo  # noqa: F401  (registers MIXLORA)
from moe_zoo.peft import MixLoraFeedForward, export_mixlora_adapter, load_mixlora_adapter

STRATEGIES = ("mixlora-dynamic", "mixlora-switch")


def trained_like(model, seed: int = 3):
    """Random LoRA B and a router that separates tokens (std 1), so routing and experts matter."""
    randomize_lora_b(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ffn in ffns(model):
            weight = ffn.moe_gate["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


def expert_output(ffn: MixLoraFeedForward, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` written out from the weights: ``down_e(act(gate_e(x)) * up_e(x))``, ``proj_e = W + s B_e A_e``."""
    scaling = ffn.expert_scaling["default"]

    def proj(name: str, inputs: torch.Tensor) -> torch.Tensor:
        a = getattr(ffn, f"lora_A_{name}")["default"][expert]
        b = getattr(ffn, f"lora_B_{name}")["default"][expert]
        return inputs @ (getattr(ffn.base_layer, name).weight + scaling * b @ a).t()

    return proj("down_proj", ffn.base_layer.act_fn(proj("gate_proj", x)) * proj("up_proj", x))


def brute_force_top_p(probs: torch.Tensor, p: float) -> list[set[int]]:
    """For each token, experts by descending probability until their sum reaches ``p`` (the crossing one included)."""
    chosen = []
    for row in probs.tolist():
        picked, total = set(), 0.0
        for expert in sorted(range(len(row)), key=lambda e: -row[e]):
            picked.add(expert)
            total += row[expert]
            if total >= p:
                break
        chosen.append(picked)
    return chosen


def routed_sets(indices: torch.Tensor, num_experts: int) -> list[set[int]]:
    return [{e for e in row if e < num_experts} for row in indices.tolist()]


def test_dynamic_picks_the_top_p_experts_and_mixes_them_with_raw_probabilities():
    model = trained_like(get_peft_model(tiny_causal_lm(), mixlora(routing_strategy="mixlora-dynamic", top_p=0.6)))
    ffn = ffns(model)[0]
    x = torch.randn(40, ffn.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, weights, indices = ffn.moe_gate["default"](x)
        got = ffn(x)
    probs = torch.softmax(x @ ffn.moe_gate["default"].weight.t(), dim=-1)
    expected_sets = brute_force_top_p(probs, 0.6)
    assert routed_sets(indices, 4) == expected_sets
    assert len({len(s) for s in expected_sets}) > 1, "the test should route tokens to different numbers of experts"
    assert indices.shape[1] > 1 and (indices == 4).any(), "narrow rows are padded with the sentinel index E"
    with torch.no_grad():
        expected = torch.stack(
            [
                sum(probs[t, e] * expert_output(ffn, e, x[t : t + 1])[0] for e in experts)
                for t, experts in enumerate(expected_sets)
            ]
        )
    assert (got - expected).abs().max() <= 1e-5


def test_switch_drops_exactly_the_tokens_beyond_capacity():
    model = trained_like(
        get_peft_model(tiny_causal_lm(), mixlora(routing_strategy="mixlora-switch", expert_capacity=3))
    )
    ffn = ffns(model)[0].eval()
    x = torch.randn(20, ffn.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, _, indices = ffn.moe_gate["default"](x)
        got = ffn(x)
    probs = torch.softmax(x @ ffn.moe_gate["default"].weight.t(), dim=-1)
    first = probs.argmax(dim=-1).tolist()
    seen = [0] * 4
    kept = []
    for expert in first:
        kept.append(seen[expert] < 3)
        seen[expert] += 1
    assert not all(kept), "the test should overflow some expert"
    assert indices.shape == (20, 1)
    assert indices[:, 0].tolist() == [e if k else 4 for e, k in zip(first, kept, strict=True)]
    with torch.no_grad():
        for t, (expert, keep) in enumerate(zip(first, kept, strict=True)):
            expected = probs[t, expert] * expert_output(ffn, expert, x[t : t + 1])[0] if keep else 0.0 * got[t]
            assert (got[t] - expected).abs().max() <= 1e-5


def _pair(strategy: str):
    overrides = dict(routing_strategy=strategy, expert_capacity=5, top_p=0.7)
    fused = trained_like(get_peft_model(tiny_causal_lm(), mixlora(expert_forward="fused", **overrides)))
    naive = get_peft_model(tiny_causal_lm(), mixlora(expert_forward="naive", **overrides))
    set_peft_model_state_dict(naive, get_peft_model_state_dict(fused))
    return fused, naive


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_equals_naive_in_outputs_and_gradients(strategy):
    inputs = batch(batch_size=3, length=11)
    results = []
    for model in _pair(strategy):
        model.eval()  # no jitter (switch defaults it to 0.01), so both see the same routing
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (logits_f, loss_f, grads_f), (logits_n, loss_n, grads_n) = results
    assert (logits_f - logits_n).abs().max() <= 1e-5
    assert (loss_f - loss_n).abs() <= 1e-5
    assert grads_f.keys() == grads_n.keys()
    for name in grads_f:
        assert (grads_f[name] - grads_n[name]).abs().max() <= 1e-5, name


def test_switch_adds_the_router_z_loss_to_the_loss():
    model = trained_like(get_peft_model(tiny_causal_lm(), mixlora(routing_strategy="mixlora-switch"))).eval()
    logits = []
    hooks = [f.moe_gate["default"].register_forward_hook(lambda m, i, o: logits.append(o[0])) for f in ffns(model)]
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    for hook in hooks:
        hook.remove()
    pooled = torch.cat(logits)
    z_expected = torch.logsumexp(pooled, dim=-1).square().mean()
    lm_loss = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), inputs["input_ids"][:, 1:].flatten()
    )
    config = model.peft_config["default"]
    assert config.router_z_loss_coef == 0.001
    assert torch.allclose(out.z_loss, z_expected, rtol=1e-6)
    expected = lm_loss + config.router_aux_loss_coef * out.aux_loss + 0.001 * z_expected
    assert torch.allclose(out.loss, expected, rtol=1e-6, atol=1e-7)


def test_strategy_defaults_apply_only_to_fields_the_user_left_unset():
    switch = mixlora(routing_strategy="mixlora-switch")
    assert (switch.jitter_noise, switch.router_init_range, switch.router_z_loss_coef) == (0.01, 1.0, 0.001)
    assert (switch.expert_capacity, switch.experts_per_token) == (32, 1)
    own = mixlora(routing_strategy="mixlora-switch", jitter_noise=0.0, router_init_range=0.5, router_z_loss_coef=0.0)
    assert (own.jitter_noise, own.router_init_range, own.router_z_loss_coef) == (0.0, 0.5, 0.0)
    dynamic = mixlora(routing_strategy="mixlora-dynamic")
    assert (dynamic.top_p, dynamic.temperature, dynamic.jitter_noise, dynamic.router_init_range) == (
        0.8,
        0.0,
        0.0,
        0.02,
    )
    plain = mixlora()
    assert (plain.jitter_noise, plain.router_init_range, plain.router_z_loss_coef) == (0.0, 0.02, 0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
        ({"expert_capacity": 0}, "`expert_capacity` must be an integer >= 1"),
        ({"expert_capacity": -3}, "`expert_capacity` must be an integer >= 1"),
        ({"expert_capacity": 2.5}, "`expert_capacity` must be an integer >= 1"),
        ({"temperature": 0.5}, "only 0.0"),
        ({"router_z_loss_coef": -1.0}, "`router_z_loss_coef` must be >= 0"),
    ],
)
def test_bad_values_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        mixlora(routing_strategy="mixlora-dynamic", **overrides)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_and_reload_give_identical_logits(strategy, tmp_path):
    model = trained_like(get_peft_model(tiny_causal_lm(), mixlora(routing_strategy=strategy, expert_capacity=4)))
    model.eval()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path).eval()
    config = loaded.peft_config["default"]
    assert (config.routing_strategy, config.expert_capacity, config.top_p) == (strategy, 4, 0.8)
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert torch.equal(got, expected)


EXPORTED_KEYS = {
    "mixlora-dynamic": {"top_p": 0.7, "temperature": 0.0, "top_k": 2},
    "mixlora-switch": {"expert_capacity": 4, "sparse_step": None},
}
"""What export writes for each strategy: MoE-PEFT's ``export()`` keys (plus our load-balancing k for top-p)."""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_original_format_round_trip_keeps_the_strategy_and_the_logits(strategy, tmp_path):
    """The pip package reads only ``"mixlora"``; export writes the other strategies with the keys MoE-PEFT's
    ``export()`` uses, and loading them back gives the identical model."""
    options = dict(routing_strategy=strategy, expert_capacity=4, top_p=0.7, lora_dropout=0.05)
    model = trained_like(get_peft_model(tiny_causal_lm(), mixlora(**options))).eval()
    export_mixlora_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["routing_strategy"] == strategy
    assert {key: saved[key] for key in EXPORTED_KEYS[strategy]} == EXPORTED_KEYS[strategy]
    other = "expert_capacity" if strategy == "mixlora-dynamic" else "top_p"
    assert other not in saved, "only the strategy's own keys are written"
    with pytest.raises(AssertionError, match="only supports MixLoRA models with 'mixlora' routing_strategy"):
        mixlora_package.load_adapter_weights(str(tmp_path), device="cpu")
    loaded = load_mixlora_adapter(tiny_causal_lm(), tmp_path)
    config = loaded.peft_config["default"]
    assert (config.routing_strategy, config.expert_capacity, config.top_p) == (
        strategy,
        4 if strategy == "mixlora-switch" else 32,
        0.7 if strategy == "mixlora-dynamic" else 0.8,
    )
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("strategy", ("mixlora",) + STRATEGIES)
def test_fused_equals_naive_for_one_ffn_with_input_gradients(strategy):
    """One MixLoRA FFN in training mode (jitter off, so both paths see the same routing): fused and naive agree in
    the output and in the gradients of the input, every LoRA A/B and the router weight, also for tokens that top-p
    pads and for tokens that switch routes to no expert (their output is exactly 0)."""
    config = mixlora(routing_strategy=strategy, expert_capacity=4, top_p=0.7, jitter_noise=0.0)
    fused_ffn = ffns(trained_like(get_peft_model(tiny_causal_lm(), config)))[0].train()
    naive_ffn = copy.deepcopy(fused_ffn)
    naive_ffn.expert_forward["default"] = "naive"
    x = torch.randn(2, 13, fused_ffn.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, _, indices = fused_ffn.moe_gate["default"](x.reshape(-1, fused_ffn.hidden_size))
    num_experts = fused_ffn.moe_gate["default"].num_experts
    if strategy == "mixlora-switch":
        unrouted = (indices == num_experts).all(dim=-1)
        assert unrouted.any(), "the test needs tokens dropped over capacity"
    if strategy == "mixlora-dynamic":
        assert (indices == num_experts).any() and (indices < num_experts).sum(-1).max() > 1
    results = []
    for ffn in (fused_ffn, naive_ffn):
        inputs = x.clone().requires_grad_()
        out = ffn(inputs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)))
        grads = {name: p.grad.clone() for name, p in ffn.named_parameters() if p.requires_grad}
        results.append((out.detach(), inputs.grad, grads))
    (out_f, grad_x_f, grads_f), (out_n, grad_x_n, grads_n) = results
    assert (out_f - out_n).abs().max() <= 1e-5
    assert (grad_x_f - grad_x_n).abs().max() <= 1e-5
    assert grads_f.keys() == grads_n.keys() and any("moe_gate" in name for name in grads_f)
    assert sum("lora_A" in name or "lora_B" in name for name in grads_f) == 6
    for name in grads_f:
        assert (grads_f[name] - grads_n[name]).abs().max() <= 1e-5, name
        assert grads_n[name].abs().sum() > 0, f"{name} got no gradient"
    if strategy == "mixlora-switch":
        assert not out_f.reshape(-1, out_f.shape[-1])[unrouted].any()
