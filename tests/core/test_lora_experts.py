"""The core's LoRA-expert kernel (``lora_experts_ffn``) equals every routed expert run as its own FFN, in outputs
and in the gradients of the input, the routing weights, the LoRA tensors and (when they train) the frozen weights,
for every backend, combine and routing shape (variable experts per token, empty slots, a token routed nowhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_zoo.core import GatedCombine, LoraProjection, lora_experts_ffn, route_pairs

T, H, FFN, E, K, R = 29, 16, 24, 4, 3, 4
SCALING = 0.75


def routing(seed: int = 0, num_tokens: int = T) -> torch.Tensor:
    """``(T, K)`` expert indices with distinct experts per token, some slots empty (sentinel ``E``): token 3 is
    routed to no expert, token 5 to one, token 7 has its first slot empty."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(num_tokens)])
    indices[3] = E
    indices[5, 1:] = E
    indices[7, 0] = E
    return indices


def weights_of(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of the chosen experts (weight 0 in empty slots), differentiable in ``logits``."""
    return torch.softmax(logits, -1).gather(1, indices.clamp(max=E - 1)) * (indices < E)


def projection(out: int, inp: int, generator: torch.Generator, bias: bool = False, lora: bool = True, dtype=None):
    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).to(dtype or torch.float32)

    return LoraProjection(
        weight=rand(out, inp),
        bias=rand(out) if bias else None,
        lora_A=rand(E, R, inp).requires_grad_() if lora else None,
        lora_B=rand(E, out, R).requires_grad_() if lora else None,
    )


def gated(seed: int = 1, dtype=None, up_lora: bool = True):
    generator = torch.Generator().manual_seed(seed)
    inputs = [projection(FFN, H, generator, dtype=dtype), projection(FFN, H, generator, lora=up_lora, dtype=dtype)]
    return inputs, projection(H, FFN, generator, dtype=dtype)


def plain_with_biases(seed: int = 2):
    """Phi's layout: ``fc2(act(fc1 x + b1)) + b2``."""
    generator = torch.Generator().manual_seed(seed)
    return [projection(FFN, H, generator, bias=True)], projection(H, FFN, generator, bias=True)


def apply(proj: LoraProjection, expert: int, rows: torch.Tensor) -> torch.Tensor:
    weight = proj.weight
    if proj.lora_A is not None:
        weight = weight + SCALING * proj.lora_B[expert] @ proj.lora_A[expert]
    return F.linear(rows, weight, proj.bias)


def reference(x, weights, indices, inputs, combine, output) -> torch.Tensor:
    """Every routed (token, expert) pair through expert ``e``'s own FFN (``W + s B_e A_e``), weighted and summed."""
    out = torch.zeros(x.shape[0], output.weight.shape[0], dtype=x.dtype)
    for expert in range(E):
        token, slot = torch.nonzero(indices == expert, as_tuple=True)
        if token.numel():
            hidden = combine(*(apply(p, expert, x[token]) for p in inputs))
            out = out.index_add(0, token, apply(output, expert, hidden) * weights[token, slot, None])
    return out


def leaves(x, logits, inputs, output) -> list[torch.Tensor]:
    tensors = [x, logits]
    for proj in (*inputs, output):
        tensors += [t for t in proj.tensors() if t is not None and t.requires_grad]
    return tensors


def outputs_and_grads(fn, x, logits, indices, inputs, output, seed: int = 7):
    for tensor in leaves(x, logits, inputs, output):
        tensor.grad = None
    out = fn(x, weights_of(logits, indices), indices)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    return out.detach(), [t.grad.clone() for t in leaves(x, logits, inputs, output)]


def assert_close_outputs_and_grads(got, expected, tol: float = 1e-5) -> None:
    (out, grads), (out_ref, grads_ref) = got, expected
    assert (out - out_ref).abs().max() <= tol
    assert len(grads) == len(grads_ref)
    for index, (grad, grad_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert (grad - grad_ref).abs().max() <= tol, f"gradient {index}"
        assert grad_ref.abs().sum() > 0, f"gradient {index} is zero: the test would not see a wrong one"


def fresh_inputs(seed: int = 3, num_tokens: int = T, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, H, generator=generator, dtype=dtype).requires_grad_()
    logits = torch.randn(num_tokens, E, generator=generator, dtype=dtype).requires_grad_()
    return x, logits


@pytest.mark.parametrize("grouped", [False, True], ids=["addmm-loop", "grouped_mm"])
@pytest.mark.parametrize("combine_kind", ["gated-silu", "gated-gelu", "plain-function"])
def test_gated_layout_equals_per_expert_ffns(grouped, combine_kind):
    x, logits = fresh_inputs()
    indices = routing()
    inputs, output = gated()
    combine = {
        "gated-silu": GatedCombine(nn.SiLU()),
        "gated-gelu": GatedCombine(nn.GELU(approximate="tanh")),
        "plain-function": lambda gate, up: F.silu(gate) * up,
    }[combine_kind]
    expected = outputs_and_grads(
        lambda x, w, i: reference(x, w, i, inputs, combine, output), x, logits, indices, inputs, output
    )
    got = outputs_and_grads(
        lambda x, w, i: lora_experts_ffn(x, w, i, E, inputs, combine, output, SCALING, grouped=grouped),
        x,
        logits,
        indices,
        inputs,
        output,
    )
    assert_close_outputs_and_grads(got, expected)
    assert got[0][3].abs().max() == 0, "a token routed to no expert gets a zero output"


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(approximate="tanh")], ids=["silu", "gelu"])
def test_chunked_gate_up_layout(act):
    """Phi-3's fused ``gate_up_proj`` (gate = first half): ``GatedCombine(chunked=True)`` equals the per-expert
    FFNs, its backward writing both halves of one gradient buffer."""
    x, logits = fresh_inputs()
    indices = routing()
    generator = torch.Generator().manual_seed(4)
    inputs, output = [projection(2 * FFN, H, generator)], projection(H, FFN, generator)

    def reference_combine(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return up * act(gate)

    expected = outputs_and_grads(
        lambda x, w, i: reference(x, w, i, inputs, reference_combine, output), x, logits, indices, inputs, output
    )
    combine = GatedCombine(act, chunked=True)
    got = outputs_and_grads(
        lambda x, w, i: lora_experts_ffn(x, w, i, E, inputs, combine, output, SCALING),
        x,
        logits,
        indices,
        inputs,
        output,
    )
    assert_close_outputs_and_grads(got, expected)


def test_plain_layout_with_biases_and_trainable_frozen_weights():
    """Phi-style ``fc1``/``fc2`` with biases: the output bias is added with the token's total routing weight;
    when the base weights and biases require grad they get exact gradients too."""
    x, logits = fresh_inputs()
    indices = routing()
    inputs, output = plain_with_biases()
    for proj in (*inputs, output):
        proj.weight.requires_grad_()
        proj.bias.requires_grad_()
    combine = nn.GELU()
    expected = outputs_and_grads(
        lambda x, w, i: reference(x, w, i, inputs, combine, output), x, logits, indices, inputs, output
    )
    got = outputs_and_grads(
        lambda x, w, i: lora_experts_ffn(x, w, i, E, inputs, combine, output, SCALING),
        x,
        logits,
        indices,
        inputs,
        output,
    )
    assert_close_outputs_and_grads(got, expected)


def test_untargeted_projection_and_no_grad_forward():
    """A projection without LoRA uses the frozen weight for every expert; the no-grad forward (inference) gives
    the same output as the differentiable one."""
    x, logits = fresh_inputs()
    indices = routing()
    inputs, output = gated(up_lora=False)
    combine = GatedCombine(nn.SiLU())
    expected = outputs_and_grads(
        lambda x, w, i: reference(x, w, i, inputs, combine, output), x, logits, indices, inputs, output
    )
    got = outputs_and_grads(
        lambda x, w, i: lora_experts_ffn(x, w, i, E, inputs, combine, output, SCALING),
        x,
        logits,
        indices,
        inputs,
        output,
    )
    assert_close_outputs_and_grads(got, expected)
    with torch.no_grad():
        inference = lora_experts_ffn(x, weights_of(logits, indices), indices, E, inputs, combine, output, SCALING)
    assert torch.equal(inference, got[0])


def test_every_slot_empty_gives_zeros_and_zero_gradients():
    x, logits = fresh_inputs(num_tokens=5)
    indices = torch.full((5, K), E)
    inputs, output = gated()
    out = lora_experts_ffn(x, weights_of(logits, indices), indices, E, inputs, GatedCombine(nn.SiLU()), output, 1.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(5, H))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert all(t.grad is None or not t.grad.any() for t in leaves(x, logits, inputs, output)[1:])


@pytest.mark.parametrize("own_backward", [True, False], ids=["GatedCombine", "autograd-combine"])
def test_gradcheck_in_float64_with_dropout(own_backward):
    """torch's numerical gradient check of the hand-written backward, dropout masks included (the RNG is reseeded
    before every call, so each call draws the same masks)."""
    x, logits = fresh_inputs(num_tokens=8, dtype=torch.float64)
    indices = routing(num_tokens=8)
    inputs, output = gated(dtype=torch.float64)
    combine = GatedCombine(nn.SiLU()) if own_backward else (lambda gate, up: F.silu(gate) * up)
    tensors = leaves(x, logits, inputs, output)

    def function(x, logits, *lora):
        projections = []
        for index, proj in enumerate((*inputs, output)):
            projections.append(LoraProjection(proj.weight, proj.bias, lora[2 * index], lora[2 * index + 1]))
        torch.manual_seed(0)
        return lora_experts_ffn(
            x, weights_of(logits, indices), indices, E, projections[:-1], combine, projections[-1], SCALING, 0.3
        )

    assert torch.autograd.gradcheck(function, tuple(tensors), eps=1e-6, atol=1e-6, fast_mode=True)
    torch.manual_seed(0)
    with_dropout = function(*tensors)
    without = lora_experts_ffn(x, weights_of(logits, indices), indices, E, inputs, combine, output, SCALING)
    assert (with_dropout - without).abs().max() > 1e-3, "dropout should change the output"


def test_routed_pairs_put_rows_back_in_token_order():
    indices = routing()
    routed = route_pairs(indices, E)
    assert routed.num_pairs == int((indices < E).sum())
    experts_of_pairs = indices.reshape(-1)[routed.pairs]
    assert torch.equal(experts_of_pairs, experts_of_pairs.sort(stable=True).values), "pairs sorted by expert"
    assert routed.offsets.tolist() == torch.bincount(experts_of_pairs, minlength=E).cumsum(0).tolist()
    rows = torch.randn(routed.num_pairs, 5)
    weights = torch.rand(T, K)
    expected = torch.zeros(T, 5)
    for pair, slot in enumerate(routed.pairs.tolist()):
        expected[slot // K] += weights[slot // K, slot % K] * rows[pair]
    assert torch.allclose(routed.sum_per_token(rows, weights * routed.slot_mask), expected, atol=1e-6)


def test_gated_combine_recognises_silu_modules():
    """transformers' ``SiLUActivation`` (what Llama's ``act_fn`` is) gets the fused SiLU derivative, others not."""
    from transformers.activations import ACT2FN

    assert GatedCombine(ACT2FN["silu"]).is_silu and GatedCombine(nn.SiLU()).is_silu and GatedCombine(F.silu).is_silu
    assert not GatedCombine(ACT2FN["gelu_pytorch_tanh"]).is_silu and not GatedCombine(nn.GELU()).is_silu
