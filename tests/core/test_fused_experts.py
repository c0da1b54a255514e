"""moe_zoo's experts implementation (``experts_implementation="moe_zoo"``, :mod:`moe_zoo.core.fused_experts`):
its hand-written backward against torch's numerical gradients, transformers' own expert classes and models run
with it against their eager loop, and what it promises not to do (``index_add``, work for empty slots)."""

import pytest
import torch
from torch.func import functional_call
from transformers import GptOssConfig, PreTrainedConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

import moe_zoo
from moe_zoo.core import GatedExperts, MoeOptions, PlainExperts
from moe_zoo.core.fused_experts import IMPLEMENTATION_NAME, moe_zoo_experts_forward

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, TOKENS = 6, 10, 4, 2, 9


class BankConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_bank"


def _bank(gated: bool, dtype=torch.float64) -> torch.nn.Module:
    config = BankConfig(num_experts=EXPERTS)
    config._experts_implementation = IMPLEMENTATION_NAME
    bank_class = GatedExperts if gated else PlainExperts
    bank = bank_class(config, EXPERTS, HIDDEN, INTERMEDIATE, "silu" if gated else "gelu_new").to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in bank.parameters():
            param.normal_(0, 0.5)
    return bank


def _routing(num_tokens: int = TOKENS, dtype=torch.float64, empty_slots: bool = True):
    generator = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(num_tokens)])
    if empty_slots:
        indices[1, 1] = EXPERTS  # an empty slot (top-p padding, a dropped token)
        indices[4] = EXPERTS + 1  # a token routed nowhere (e.g. to a null expert)
    weights = torch.rand(num_tokens, TOP_K, generator=generator, dtype=dtype)
    return indices, weights


@pytest.mark.parametrize("gated", [True, False], ids=["gated-silu", "plain-gelu-biases"])
def test_gradcheck_in_float64(gated):
    """torch's numerical gradients of the states, the routing weights and every expert tensor (biases included)."""
    bank = _bank(gated)
    indices, weights = _routing()
    names = [name for name, _ in bank.named_parameters()]
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def function(x, weights, *params):
        return functional_call(bank, dict(zip(names, params, strict=True)), (x, indices, weights))

    inputs = (x.requires_grad_(), weights.requires_grad_(), *(p.detach().requires_grad_() for p in bank.parameters()))
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_equals_the_eager_loop_and_skips_empty_slots(gated):
    bank = _bank(gated, torch.float32)
    indices, weights = _routing(dtype=torch.float32)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))
    ours = bank(x, indices, weights)
    bank.config._experts_implementation = "eager"
    expected = bank(x, indices, weights)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[4], torch.zeros(HIDDEN)), "a token routed nowhere gets exactly 0"
    assert ours.abs().max() > 1e-2


def test_every_slot_empty_gives_zeros_and_zero_gradients():
    bank = _bank(True, torch.float32)
    x = torch.randn(5, HIDDEN, requires_grad=True)
    weights = torch.rand(5, TOP_K, requires_grad=True)
    out = bank(x, torch.full((5, TOP_K), EXPERTS), weights)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(5, HIDDEN))
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(weights.grad, torch.zeros_like(weights))
    assert not bank.gate_up_proj.grad.any() and not bank.down_proj.grad.any()


def test_inference_forward_equals_the_differentiable_one_and_keeps_no_graph():
    bank = _bank(True, torch.float32)
    indices, weights = _routing(dtype=torch.float32)
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    trained = bank(x, indices, weights)
    with torch.no_grad():
        inference = bank(x, indices, weights)
    assert torch.equal(inference, trained.detach())
    assert inference.grad_fn is None and trained.grad_fn is not None


def test_transformers_gpt_oss_experts_transposed_biased_custom_gate():
    """GPT-OSS stores experts transposed, with biases and an interleaved, clamped SwiGLU (its own ``_apply_gate``):
    our implementation runs it from the class's decorator flags and equals its eager loop, gradients included."""
    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS)
    config._experts_implementation = "eager"
    experts = GptOssExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.5)
    indices, weights = _routing(dtype=torch.float32, empty_slots=False)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))

    def run(implementation: str):
        config._experts_implementation = implementation
        experts.zero_grad(set_to_none=True)
        inputs, routing = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = experts(inputs, indices, routing)
        out.backward(torch.cos(out.detach()))
        return out.detach(), inputs.grad, routing.grad, {n: p.grad for n, p in experts.named_parameters()}

    ours, expected = run(IMPLEMENTATION_NAME), run("eager")
    torch.testing.assert_close(ours[:3], expected[:3], atol=1e-5, rtol=1e-5)
    for name, grad in expected[3].items():
        torch.testing.assert_close(ours[3][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert expected[0].abs().max() > 1e-2


def test_a_transformers_moe_model_trains_the_same_with_it():
    """A whole transformers Qwen3-MoE (its router, its experts class) with ``experts_implementation="moe_zoo"``:
    same logits and gradients as with ``eager``."""
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))

    def run(implementation: str):
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (logits, grads), (expected_logits, expected_grads) = run(IMPLEMENTATION_NAME), run("eager")
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and any("experts" in name for name in grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_it_is_the_default_of_moe_zoo_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
    )
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2)
    assert moe.config._experts_implementation == IMPLEMENTATION_NAME
    moe.set_experts_implementation("grouped_mm")  # another one can still be chosen
    assert moe.config._experts_implementation == "grouped_mm"


def test_forward_and_backward_never_call_index_add():
    """The per-token sum is a gather and a batched product in both directions, never ``index_add`` (atomic on
    GPU, slow with several CPU threads)."""
    bank = _bank(True, torch.float32)
    indices, weights = _routing(dtype=torch.float32)
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        moe_zoo_experts_forward(bank, x, indices, weights.requires_grad_()).sum().backward()
    events = profile.events()
    assert "aten::mm" in {event.name for event in events}  # the profile saw the expert matmuls
    assert not [event.name for event in events if "index_add" in event.name]
    # Scattered writes only touch 1-D index and weight vectors (T * k entries), never rows of states.
    row_writes = [e for e in events if "index_put" in e.name and any(len(shape) > 1 for shape in e.input_shapes)]
    assert not row_writes


def test_bfloat16_bank_with_float32_routing_weights():
    """A bf16 model (routers keep fp32 weights): the output is bf16 and within bf16 rounding of the fp32 result."""
    bank = _bank(True, torch.float32)
    indices, weights = _routing(dtype=torch.float32)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))
    expected = bank(x, indices, weights)
    bank = bank.to(torch.bfloat16)
    inputs = x.bfloat16().requires_grad_()
    out = bank(inputs, indices, weights.requires_grad_())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and inputs.grad.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert weights.grad.dtype == torch.float32 and torch.isfinite(bank.gate_up_proj.grad.float()).all()


def test_an_empty_batch():
    bank = _bank(True, torch.float32)
    x = torch.randn(0, HIDDEN, requires_grad=True)
    out = bank(x, torch.zeros(0, TOP_K, dtype=torch.long), torch.zeros(0, TOP_K))
    out.sum().backward()
    assert out.shape == (0, HIDDEN) and x.grad.shape == (0, HIDDEN)
