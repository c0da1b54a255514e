"""Run by ``test_triton_grouped.py`` in a subprocess under ``TRITON_INTERPRET=1`` (the environment variable must be
set before Triton compiles anything, so it cannot share the test process): moe_zoo's Triton grouped GEMMs on CPU
tensors against torch, and a whole expert bank forward and backward through them against the per-expert loop.
Prints one JSON object of largest absolute differences and facts for the test to assert on."""

import functools
import json
import warnings

import torch
from transformers import PreTrainedConfig

from moe_zoo.core import (
    GatedCombine,
    GatedExperts,
    LoraProjection,
    MoeOptions,
    fused_experts,
    lora_experts,
    routed_pairs,
    triton_grouped,
)
from moe_zoo.core.triton_grouped import grouped_linear, grouped_outer, sorted_pairs, works


class BankConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_triton_bank"


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def kernel_differences() -> dict:
    generator = torch.Generator().manual_seed(1)
    counts = [0, 7, 70, 3, 0, 130]  # empty experts, a tile boundary crossed, a partial last tile
    routed = sorted_pairs(counts)
    num_pairs, num_experts, experts = routed.num_pairs, routed.num_experts, routed.experts
    x = torch.randn(50, 72, generator=generator)
    index = torch.randint(0, 50, (num_pairs,), generator=generator)
    weight = torch.randn(num_experts, 33, 72, generator=generator)
    transposed = torch.randn(num_experts, 72, 33, generator=generator).transpose(1, 2)  # the down weight's view
    left = torch.randn(num_pairs, 33, generator=generator)
    strided_out = torch.empty(num_experts, 72, 33).transpose(1, 2)
    grouped_outer(left, x, routed, right_index=index, out=strided_out)
    expected_outer = torch.stack([left[experts == e].t() @ x[index][experts == e] for e in range(num_experts)])
    return {
        "linear_gathered": _max_difference(
            grouped_linear(x, weight, routed, index), torch.einsum("pi,poi->po", x[index], weight[experts])
        ),
        "linear_transposed_weight": _max_difference(
            grouped_linear(x[index], transposed, routed), torch.einsum("pi,poi->po", x[index], transposed[experts])
        ),
        "outer_gathered": _max_difference(grouped_outer(left, x, routed, right_index=index), expected_outer),
        "outer_into_strided_out": _max_difference(strided_out, expected_outer),
        "outer_empty_experts_zero": float(grouped_outer(left, x, routed, right_index=index)[[0, 4]].abs().max()),
        "no_pairs_shape": list(grouped_linear(x, weight, sorted_pairs([0] * num_experts)).shape),
    }


def bank_differences() -> dict:
    """A gated bank through ``moe_zoo``'s experts implementation with the Triton kernels against the same bank
    through the per-expert loop: outputs and every gradient, with an empty slot and a token routed nowhere."""
    config = BankConfig(num_experts=5)
    config._experts_implementation = fused_experts.IMPLEMENTATION_NAME
    torch.manual_seed(0)
    bank = GatedExperts(config, 5, 24, 40, "silu")
    with torch.no_grad():
        for param in bank.parameters():
            param.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(5, generator=generator)[:2] for _ in range(37)])
    indices[3, 1] = 5  # an empty slot
    indices[8] = 6  # a token routed nowhere
    x = torch.randn(37, 24, generator=generator)
    weights = torch.rand(37, 2, generator=generator)
    grad = torch.randn(37, 24, generator=generator)
    results, saved_rows = [], []
    plain_route_pairs = fused_experts.route_pairs
    for triton in (False, True):
        fused_experts.route_pairs = functools.partial(plain_route_pairs, triton=triton)
        inputs, routing = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = bank(inputs, indices, routing)
        saved_rows.append(list(out.grad_fn.saved_tensors[0].shape))
        out.backward(grad)
        results.append(
            (out.detach(), inputs.grad, routing.grad, {n: p.grad.clone() for n, p in bank.named_parameters()})
        )
        bank.zero_grad()
    fused_experts.route_pairs = plain_route_pairs
    (out_a, gx_a, gw_a, gp_a), (out_b, gx_b, gw_b, gp_b) = results
    routed = routed_pairs.route_pairs(indices, 5, triton=True)
    return {
        "fuses_gather": routed_pairs.fuses_gather(routed, x, bank.gate_up_proj),
        "saved_rows_shapes": saved_rows,
        "output": _max_difference(out_a, out_b),
        "grad_input": _max_difference(gx_a, gx_b),
        "grad_routing_weights": _max_difference(gw_a, gw_b),
        "grad_parameters": max(_max_difference(gp_a[n], gp_b[n]) for n in gp_a),
    }


def lora_experts_differences() -> dict:
    """MixLoRA's kernel (:func:`~moe_zoo.core.lora_experts.lora_experts_ffn`, gated, rank 4, LoRA on every
    projection) with the Triton kernels against the per-expert loop: output and the gradients of the input, the
    routing weights and every LoRA tensor (at this size the eager pass runs, which is what Triton replaces)."""
    generator = torch.Generator().manual_seed(3)

    def projection(out: int, inp: int) -> LoraProjection:
        return LoraProjection(
            weight=torch.randn(out, inp, generator=generator) * 0.3,
            lora_A=(torch.randn(4, 4, inp, generator=generator) * 0.3).requires_grad_(),
            lora_B=(torch.randn(4, out, 4, generator=generator) * 0.3).requires_grad_(),
        )

    inputs, output = [projection(24, 16), projection(24, 16)], projection(16, 24)
    indices = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(29)])
    indices[3] = 4  # a token routed nowhere
    x, weights = torch.randn(29, 16, generator=generator), torch.rand(29, 2, generator=generator)
    leaves = [t for proj in (*inputs, output) for t in (proj.lora_A, proj.lora_B)]
    results = []
    plain_route_pairs = lora_experts.route_pairs
    for triton in (False, True):
        lora_experts.route_pairs = functools.partial(plain_route_pairs, triton=triton)
        for leaf in leaves:
            leaf.grad = None
        inputs_x, routing = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = lora_experts.lora_experts_ffn(
            inputs_x, routing, indices, 4, inputs, GatedCombine(torch.nn.SiLU()), output, 0.5
        )
        out.backward(torch.ones_like(out))
        results.append([out.detach(), inputs_x.grad, routing.grad, *(leaf.grad.clone() for leaf in leaves)])
    lora_experts.route_pairs = plain_route_pairs
    return {"lora_experts": max(_max_difference(a, b) for a, b in zip(*results, strict=True))}


def counting_kernel_calls(check) -> dict:
    """``check()``'s report plus how many times it launched each Triton kernel (so a fallback cannot pass)."""
    calls = {"grouped_linear": 0, "grouped_outer": 0}
    originals = {name: getattr(triton_grouped, name) for name in calls}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in calls:
        setattr(triton_grouped, name, counted(name))
    try:
        report = check()
    finally:
        for name, original in originals.items():
            setattr(triton_grouped, name, original)
    return {**report, f"{check.__name__}_kernel_calls": calls}


def probe_rejects_wrong_results() -> dict:
    """:func:`works` with a kernel that returns zeros: the probe must turn the path off, with a warning."""
    original = triton_grouped.grouped_linear
    triton_grouped.grouped_linear = lambda x, weight, routed, index=None: original(x, weight, routed, index) * 0
    works.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            accepted = works("cpu", torch.float32)
    finally:
        triton_grouped.grouped_linear = original
        works.cache_clear()
    return {"probe_accepts_wrong_kernel": accepted, "probe_warning": " ".join(str(w.message) for w in caught)}


if __name__ == "__main__":
    report = {"works": works("cpu", torch.float32), **kernel_differences()}
    report |= counting_kernel_calls(bank_differences) | counting_kernel_calls(lora_experts_differences)
    report |= probe_rejects_wrong_results()
    print(json.dumps(report))
