"""SMoRA's layer: it equals PEFT's LoRA when every rank is active, its masked computation equals a dense per-rank
reference in outputs and gradients without building an N x out x r tensor, merging is refused and bad configs are
rejected."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft_test_models import ATTENTION, FFN, batch, randomize_lora_b, smora, smora_layers, tiny_causal_lm
from smora_reference import IN, OUT, dense_reference, one_layer_model
from torch.overrides import TorchFunctionMode

import moe_zoo  # noqa: F401  (registers SMORA)
from moe_zoo.peft import SmoraLinear


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((output * weight).sum(), inputs))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("rank_partition", "use_rslora"), [(1, False), (2, False), (1, True)])
def test_all_ranks_active_equals_peft_lora_with_the_same_weights(arch, rank_partition, use_rslora):
    """With ``activate_r == r`` every rank is chosen. The router weights are set to zero, so every score is
    sigmoid(0) = 0.5 and each gate is 0.5 / (0.5 * r) * r = 1; SMoRA's scaling lora_alpha / activate_r (or
    / sqrt(activate_r) with rsLoRA) is then LoRA's lora_alpha / r (or / sqrt(r)), and the two models must agree in
    logits and in the gradients of A and B."""
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    lora = get_peft_model(
        tiny_causal_lm(arch), LoraConfig(r=8, lora_alpha=16, use_rslora=use_rslora, target_modules=targets)
    )
    randomize_lora_b(lora)
    config = smora(r=8, activate_r=8, rank_partition=rank_partition, use_rslora=use_rslora, target_modules=targets)
    model = get_peft_model(tiny_causal_lm(arch), config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SmoraLinear)}
    assert len(layers) == 8
    with torch.no_grad():
        for name, layer in layers.items():
            source = lora.get_submodule(name)
            layer.lora_A["default"].weight.copy_(source.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(source.lora_B["default"].weight)
            layer.lora_router["default"].weight.zero_()
            assert layer.scaling["default"] == source.scaling["default"]
    inputs = batch()
    results = []
    for peft_model in (lora, model):
        out = peft_model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n}
        results.append((out.logits.detach(), grads))
    (expected, lora_grads), (got, smora_grads) = results
    with torch.no_grad(), lora.disable_adapter():
        untouched = lora(**inputs).logits
    assert (expected - untouched).abs().max() > 1e-2, "the LoRA weights should change the logits"
    assert (got - expected).abs().max() <= 1e-5
    assert lora_grads.keys() == smora_grads.keys()
    for name, grad in lora_grads.items():
        assert (smora_grads[name] - grad).abs().max() <= 1e-5, name


@pytest.mark.parametrize(("r", "activate_r", "rank_partition"), [(8, 3, 1), (8, 4, 2), (6, 6, 3), (8, 1, 1)])
@pytest.mark.parametrize("bias_balancing", ["per_step", "original"])
def test_masked_computation_equals_the_dense_reference(r, activate_r, rank_partition, bias_balancing):
    """Outputs and the gradients of A, B, the router and the input agree with :func:`dense_reference` (float64, eval
    mode so the bias does not move), with a random selection bias that changes which ranks some tokens choose."""
    model, layer = one_layer_model(
        r=r, activate_r=activate_r, rank_partition=rank_partition, bias_balancing=bias_balancing
    )
    model.eval()
    x = torch.randn(3, 7, IN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 7, OUT, dtype=torch.float64)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_router["default"].weight]
    got = model(x)
    expected = dense_reference(layer, x, original=bias_balancing == "original")
    assert got.shape == expected.shape == (3, 7, OUT)
    assert (got - expected).abs().max() <= 1e-12
    for ours, reference in zip(_grads(got, params + [x], weight), _grads(expected, params + [x], weight), strict=True):
        assert (ours - reference).abs().max() <= 1e-12
        assert ours.abs().sum() > 0
    router = layer.lora_router["default"]
    scores = torch.sigmoid(x.detach().reshape(-1, IN) @ router.weight.detach().t())
    k = activate_r // rank_partition
    if k < router.num_experts:
        unbiased_choice = scores.topk(k, dim=-1).indices.sort(-1).values
        biased_choice = (scores + router.selection_bias).topk(k, dim=-1).indices.sort(-1).values
        assert (unbiased_choice != biased_choice).any(), "the test's bias should change some tokens' ranks"


def test_gate_has_activate_r_nonzeros_per_token_summing_to_activate_r():
    model, layer = one_layer_model(r=8, activate_r=4, rank_partition=2)
    router = layer.lora_router["default"]
    _, weights, indices = router(torch.randn(10, IN, dtype=torch.float64))
    gate = router.rank_gate(weights, indices)
    assert gate.shape == (10, 8)
    assert ((gate != 0).sum(-1) == 4).all()
    assert torch.allclose(gate.sum(-1), torch.full((10,), 4.0, dtype=torch.float64))
    # Ranks 2e and 2e + 1 belong to expert e and share its gate.
    assert torch.equal(gate[:, 0::2], gate[:, 1::2])


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_forward_never_materialises_a_tokens_by_out_by_r_tensor():
    model, layer = one_layer_model(r=8, activate_r=2)
    model.train()
    x = torch.randn(64, IN, dtype=torch.float64, requires_grad=True)
    saved = []
    with (
        _LargestTensor() as created,
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t),
    ):
        out = model(x)
    out.sum().backward()
    assert created.largest <= 64 * OUT, f"the forward built a tensor of {created.largest} elements"
    assert max(saved) <= 64 * OUT
    with _LargestTensor() as dense:
        dense_reference(layer, x)
    assert dense.largest == 64 * OUT * 8, "the probe should see the reference's N x out x r tensor"


def test_fresh_adapter_computes_the_base_model():
    """B = 0 at init (PEFT's LoRA init), so a new SMoRA model is the base model whatever the router picks."""
    base = tiny_causal_lm()
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
        got = get_peft_model(base, smora()).eval()(**inputs).logits
    assert (got - expected).abs().max() <= 1e-6


def test_only_adapter_weights_train_and_the_bias_is_a_saved_buffer():
    model = get_peft_model(tiny_causal_lm(), smora(target_modules=["q_proj", "up_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.lora_router.default.weight") for n in trainable)
    assert any(n.endswith("up_proj.lora_A.default.weight") for n in trainable)
    assert not any("base_layer" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)
    assert not any("selection_bias" in n for n, _ in model.named_parameters())
    buffers = dict(model.named_buffers())
    bias = buffers["base_model.model.model.layers.0.self_attn.q_proj.lora_router.default.selection_bias"]
    assert bias.shape == (8,) and bias.dtype == torch.float32 and not bias.requires_grad
    assert any(k.endswith("q_proj.lora_router.default.selection_bias") for k in model.state_dict())
    layer = smora_layers(model)[0]
    assert layer.lora_router["default"].weight.shape == (8, 32)
    assert layer.scaling["default"] == 16 / 2


def test_rank_partition_sets_the_router_width_and_bias_per_expert():
    model = get_peft_model(tiny_causal_lm(), smora(r=8, activate_r=4, rank_partition=2, target_modules=["v_proj"]))
    router = smora_layers(model)[0].lora_router["default"]
    assert (router.num_experts, router.top_k, router.routed_scaling_factor) == (4, 2, 2.0)
    assert router.weight.shape == (4, 32) and router.selection_bias.shape == (4,)


def test_disable_adapter_and_generate():
    model = get_peft_model(tiny_causal_lm(), smora())
    randomize_lora_b(model)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        expected = tiny_causal_lm()(**inputs).logits
        generated = model.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert (adapted - expected).abs().max() > 1e-2
    assert torch.equal(disabled, expected)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_merging_is_refused_with_a_clear_error_and_unload_returns_the_base_model():
    model = get_peft_model(tiny_causal_lm(), smora())
    randomize_lora_b(model)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        smora_layers(model)[0].merge()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        smora_layers(model)[0].get_delta_weight("default")
    inputs = batch()
    base = model.unload().eval()
    assert not smora_layers(base)
    with torch.no_grad():
        assert torch.equal(base(**inputs).logits, tiny_causal_lm()(**inputs).logits)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r": 4, "activate_r": 5}, r"`activate_r` is 5, but it must be an integer in \[1, r=4\]"),
        ({"activate_r": 0}, r"`activate_r` is 0, but it must be an integer in \[1, r=8\]"),
        (
            {"r": 8, "activate_r": 3, "rank_partition": 3},
            r"`rank_partition` is 3, but it must be a divisor of both r=8",
        ),
        ({"r": 8, "activate_r": 3, "rank_partition": 2}, r"`rank_partition` is 2, .*activate_r=3"),
        ({"rank_partition": 0}, r"`rank_partition` is 0, but it must be a positive integer"),
        (
            {"rank_pattern": {"q_proj": 1}},
            r"`activate_r` is 2, but it must be an integer in \[1, rank_pattern\['q_proj'\]=1\]",
        ),
        (
            {"bias_balancing": "every_forward"},
            r"`bias_balancing` is 'every_forward', but it must be one of \('per_step', 'original'\)",
        ),
        ({"bias_update_rate": -1e-5}, r"`bias_update_rate` is -1e-05, but it must be a number >= 0"),
        ({"use_dora": True}, r"`use_dora` is True, .*no form of this LoRA variant"),
        (
            {"init_lora_weights": "pissa"},
            r"`init_lora_weights` is 'pissa', but it must be one of \(True, False, 'gaussian'\)",
        ),
        ({"lora_bias": True}, r"`lora_bias` is True"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, r"`target_parameters`"),
    ],
)
def test_bad_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        smora(**overrides)


def test_unknown_target_modules_are_rejected():
    # PEFT itself only raises when no name matches; a typo next to a valid name is refused as well.
    with pytest.raises(ValueError, match=r"`target_modules` names \['v_prj'\], which match no module"):
        get_peft_model(tiny_causal_lm(), smora(target_modules=["q_proj", "v_prj"]))
    with pytest.raises(ValueError, match=r"\['nope'\], which match no module"):
        get_peft_model(tiny_causal_lm(), smora(target_modules=["nope"]))


def test_non_linear_targets_are_rejected():
    with pytest.raises(ValueError, match=r"`model.embed_tokens` \(Embedding\), but SMoRA adapts torch.nn.Linear"):
        get_peft_model(tiny_causal_lm(), smora(target_modules=["q_proj", "embed_tokens"]))


def test_all_linear_and_architecture_defaults_resolve():
    model = get_peft_model(tiny_causal_lm(), smora(target_modules="all-linear"))
    assert len(smora_layers(model)) == 2 * len(ATTENTION + FFN)
    model = get_peft_model(tiny_causal_lm(), smora(target_modules=None))
    assert len(smora_layers(model)) == 2 * 2  # LoRA's Llama default: q_proj and v_proj


def test_a_second_adapter_can_be_added_and_switched_to():
    model = get_peft_model(tiny_causal_lm(), smora(target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    model.add_adapter("other", smora(target_modules=["q_proj", "v_proj"], activate_r=4))
    randomize_lora_b(model, seed=5)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        first = model(**inputs).logits
        model.set_adapter("other")
        second = model(**inputs).logits
    assert (first - second).abs().max() > 1e-3
    layer = smora_layers(model)[0]
    assert layer.activate_r == {"default": 2, "other": 4}
    assert layer.lora_router["other"].weight.requires_grad
    assert not layer.lora_router["default"].weight.requires_grad


def test_smora_on_an_upcycled_moe_leaves_its_router_logits_and_aux_loss_alone():
    """Rank routers do not report to collect_routing, so the MoE's own aux loss and router_logits are unchanged."""
    moe = moe_zoo.upcycle(tiny_causal_lm(), num_experts=4, output_router_logits=True, router_aux_loss_coef=0.1)
    inputs = batch()
    with torch.no_grad():
        expected = moe(**inputs, labels=inputs["input_ids"])
    model = get_peft_model(moe, smora(target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        got = model(**inputs, labels=inputs["input_ids"])
    assert len(got.router_logits) == len(expected.router_logits) == 2
    assert all(logits.shape[-1] == 4 for logits in got.router_logits)
    assert torch.allclose(got.aux_loss, expected.aux_loss) and torch.allclose(got.loss, expected.loss, atol=1e-6)
