"""The fused CPU pass of the LoRA-expert kernel (``moe_zoo.core.lora_pairs_kernel``, ``lora_pairs.c``): with
``MOE_ZOO_COMPILE=always`` (here on small inputs) the kernel still equals every routed expert run as its own FFN, in
outputs and every gradient, for each variant of the SiLU-gated layout; it runs only where it applies; a missing C
compiler falls back to the eager kernel with a warning; the built library is cached; the kept backward buffers never
corrupt a second backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from moe_zoo.core import GatedCombine, LoraProjection, lora_experts_ffn
from moe_zoo.core import lora_pairs_kernel as kernel
from moe_zoo.peft import MixLoraConfig, MixLoraFeedForward
from tests.core.test_lora_experts import (
    SCALING,
    E,
    assert_close_outputs_and_grads,
    fresh_inputs,
    gated,
    leaves,
    outputs_and_grads,
    reference,
    routing,
    weights_of,
)

SILU = GatedCombine(ACT2FN["silu"])


@pytest.fixture
def fused_always(monkeypatch):
    monkeypatch.setenv(kernel.COMPILE_ENV, "always")
    assert kernel._library() is not None, "the test machine has a C compiler; the kernel must build"


def ffn(inputs, output, dropout: float = 0.0):
    return lambda x, w, i: lora_experts_ffn(x, w, i, E, inputs, SILU, output, SCALING, dropout)


def calls_the_kernel(monkeypatch) -> list[str]:
    """Records each fused pass, so a test knows the kernel (not the eager fallback) computed its result."""
    calls = []
    for name in ("forward", "backward"):
        original = getattr(kernel, name)

        def recorded(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(kernel, name, recorded)
    return calls


def with_ranks(projection: LoraProjection, rank: int, seed: int) -> LoraProjection:
    """``projection`` with fresh LoRA factors of ``rank`` (the kernel unrolls ranks by four: 3, 5 and 6 leave rest)."""
    generator = torch.Generator().manual_seed(seed)
    out, inp = projection.weight.shape
    lora_a = (torch.randn(E, rank, inp, generator=generator) * 0.3).requires_grad_()
    lora_b = (torch.randn(E, out, rank, generator=generator) * 0.3).requires_grad_()
    return LoraProjection(projection.weight, projection.bias, lora_a, lora_b)


@pytest.mark.parametrize(
    "variant", ["all-targeted", "up-untargeted", "output-untargeted", "biases-trainable-base", "ranks-6-3-5"]
)
def test_fused_pass_equals_per_expert_ffns(fused_always, monkeypatch, variant):
    """Outputs and the gradients of the input, the routing weights, every LoRA tensor (and the frozen weights and
    biases when they train), with empty slots and a token routed nowhere (:func:`routing`)."""
    x, logits = fresh_inputs()
    indices = routing()
    inputs, output = gated(up_lora=variant != "up-untargeted")
    if variant == "output-untargeted":
        output = LoraProjection(output.weight)
    if variant == "biases-trainable-base":
        bias = [torch.randn(p.weight.shape[0]).requires_grad_() for p in inputs]
        inputs = [
            LoraProjection(p.weight.clone().requires_grad_(), b, p.lora_A, p.lora_B)
            for p, b in zip(inputs, bias, strict=True)
        ]
        output = LoraProjection(output.weight.clone().requires_grad_(), None, output.lora_A, output.lora_B)
    if variant == "ranks-6-3-5":
        inputs = [with_ranks(inputs[0], 6, seed=11), with_ranks(inputs[1], 3, seed=12)]
        output = with_ranks(output, 5, seed=13)
    expected = outputs_and_grads(
        lambda x, w, i: reference(x, w, i, inputs, SILU, output), x, logits, indices, inputs, output
    )
    calls = calls_the_kernel(monkeypatch)
    got = outputs_and_grads(ffn(inputs, output), x, logits, indices, inputs, output)
    assert calls == ["forward", "backward"]
    assert_close_outputs_and_grads(got, expected)


def test_fused_pass_with_dropout_equals_the_eager_kernel(fused_always, monkeypatch):
    """LoRA dropout: the masks are drawn before the kernel runs, so under one seed the fused and the eager kernel
    compute the same function (and dropout does change it)."""
    x, logits = fresh_inputs()
    indices = routing()
    inputs, output = gated()

    def run():
        torch.manual_seed(0)
        return outputs_and_grads(ffn(inputs, output, dropout=0.3), x, logits, indices, inputs, output)

    fused = run()
    monkeypatch.setenv(kernel.COMPILE_ENV, "never")
    eager = run()
    assert_close_outputs_and_grads(fused, eager)
    assert (fused[0] - outputs_and_grads(ffn(inputs, output), x, logits, indices, inputs, output)[0]).abs().max() > 1e-3


def test_inference_and_a_second_backward_through_a_retained_graph(fused_always):
    """A no-grad forward gives the differentiable forward's output; a second backward through a retained graph,
    after another call reused the kept buffers with other values, gives the first backward's gradients again."""
    x, logits = fresh_inputs()
    indices = routing()
    inputs, output = gated()
    weights = weights_of(logits, indices)
    out = lora_experts_ffn(x, weights, indices, E, inputs, SILU, output, SCALING)
    with torch.no_grad():
        assert torch.allclose(lora_experts_ffn(x, weights, indices, E, inputs, SILU, output, SCALING), out)
    grad = torch.randn_like(out)
    out.backward(grad, retain_graph=True)
    first = [t.grad.clone() for t in leaves(x, logits, inputs, output)]
    other = lora_experts_ffn(x.detach() * 2, weights.detach(), indices, E, inputs, SILU, output, SCALING)
    other.sum().backward()
    for tensor in leaves(x, logits, inputs, output):
        tensor.grad = None
    out.backward(grad)
    for before, tensor in zip(first, leaves(x, logits, inputs, output), strict=True):
        assert torch.allclose(before, tensor.grad, atol=1e-6)


def test_a_mixlora_layer_runs_the_fused_pass_like_the_naive_one(fused_always, monkeypatch):
    """The PEFT layer (a transformers LlamaMLP base, its SiLU module) takes the fused pass and equals the naive
    path (every expert runs the whole FFN) in outputs and gradients."""
    torch.manual_seed(0)
    base = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu", num_attention_heads=1))
    layers = {}
    for forward in ("fused", "naive"):
        config = MixLoraConfig(
            r=4,
            lora_alpha=8,
            num_experts=4,
            top_k=2,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            expert_forward=forward,
            router_init_range=0.1,
        )
        layers[forward] = MixLoraFeedForward(
            base.requires_grad_(False), "default", config, {"gate_proj", "up_proj", "down_proj"}
        )
    with torch.no_grad():
        for param in layers["fused"].parameters():
            param.normal_(0.0, 0.1)
    layers["naive"].load_state_dict(layers["fused"].state_dict())
    x = torch.randn(40, 32)
    results = {}
    calls = calls_the_kernel(monkeypatch)
    for forward, layer in layers.items():
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        out.backward(torch.ones_like(out))
        results[forward] = (
            out.detach(),
            inputs.grad,
            {n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
        )
    assert calls == ["forward", "backward"]
    (out, grad_x, grads), (out_ref, grad_x_ref, grads_ref) = results["fused"], results["naive"]
    assert (out - out_ref).abs().max() < 1e-5 and (grad_x - grad_x_ref).abs().max() < 1e-5
    assert grads.keys() == grads_ref.keys() and len(grads) == 7  # router + 3 x (lora_A, lora_B)
    for name in grads:
        assert (grads[name] - grads_ref[name]).abs().max() < 1e-5, name


def test_the_fused_pass_runs_only_where_it_applies(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.delenv(kernel.COMPILE_ENV, raising=False)
    large, small = 2**30, kernel.MIN_PAIR_ELEMENTS - 1
    assert kernel.usable(SILU, x, [x], large)
    assert not kernel.usable(SILU, x, [x], small), "auto: small calls stay eager"
    assert not kernel.usable(GatedCombine(nn.SiLU(), chunked=True), x, [x], large), "Phi-3's chunked gate_up"
    assert not kernel.usable(GatedCombine(nn.GELU()), x, [x], large), "another activation"
    assert not kernel.usable(SILU, x, [x, torch.zeros(2, dtype=torch.bfloat16)], large), "bf16"
    assert not kernel.usable(SILU, torch.zeros(2, 2, device="meta"), [x], large)
    monkeypatch.setenv(kernel.COMPILE_ENV, "never")
    assert not kernel.usable(SILU, x, [x], large)
    monkeypatch.setenv(kernel.COMPILE_ENV, "always")
    assert kernel.usable(SILU, x, [x], 1)
    monkeypatch.setenv(kernel.COMPILE_ENV, "sometimes")
    with pytest.raises(ValueError, match="MOE_ZOO_COMPILE='sometimes': expected 'auto', 'always' or 'never'"):
        kernel.usable(SILU, x, [x], large)


def test_without_a_compiler_a_warning_says_so_and_the_eager_kernel_runs(monkeypatch):
    monkeypatch.setenv(kernel.COMPILE_ENV, "always")
    monkeypatch.setattr(kernel, "_compiler", lambda: None)
    kernel._library.cache_clear()
    try:
        x, logits = fresh_inputs()
        indices = routing()
        inputs, output = gated()
        expected = outputs_and_grads(
            lambda x, w, i: reference(x, w, i, inputs, SILU, output), x, logits, indices, inputs, output
        )
        with pytest.warns(RuntimeWarning, match="could not build its fused CPU kernel .*no C compiler found"):
            got = outputs_and_grads(ffn(inputs, output), x, logits, indices, inputs, output)
        assert_close_outputs_and_grads(got, expected)
    finally:
        kernel._library.cache_clear()


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_ZOO_CACHE", str(tmp_path))
    kernel._library.cache_clear()
    try:
        assert kernel._library() is not None
        (built,) = (tmp_path / "kernels").glob("lora_pairs-*.so")
        stamp = built.stat().st_mtime_ns
        kernel._library.cache_clear()
        assert kernel._library() is not None
        assert built.stat().st_mtime_ns == stamp and len(list((tmp_path / "kernels").iterdir())) == 1
    finally:
        kernel._library.cache_clear()


def test_workspace_buffers_are_kept_and_grow():
    kernel.release_workspace()
    like = torch.zeros(1)
    first = kernel.workspace("a", (4, 3), like)
    assert kernel.workspace("a", (2, 3), like).data_ptr() == first.data_ptr()
    assert kernel.workspace("b", (2, 3), like).data_ptr() != first.data_ptr()
    assert kernel.workspace("a", (8, 3), like).shape == (8, 3)
    assert kernel.workspace("a", (4, 3), like.double()).dtype == torch.float64
    kernel.release_workspace()
