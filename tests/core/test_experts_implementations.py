"""eager, batched_mm, grouped_mm and moe_zoo's own implementation agree for our expert banks, also with a variable
number of experts per token, and the zero-computation / shared experts compute what they promise."""

import pytest
import torch
from transformers import PreTrainedConfig

from moe_zoo.core import MoeOptions, SparseMoeBlock

HIDDEN, INTERMEDIATE = 12, 20


class BlockConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_block"


ROUTINGS = {
    "top2": dict(router_type="softmax_topk", num_experts_per_tok=2),
    "top_p": dict(router_type="top_p", top_p_threshold=0.7),
    "top_any": dict(router_type="top_any", num_experts_per_tok=1),
    "dense_to_sparse": dict(router_type="dense_to_sparse", gumbel_selection_threshold=0.1),
    "capacity": dict(router_type="softmax_topk", num_experts_per_tok=2, capacity_factor=0.5),
    "null_experts": dict(router_type="top_p", top_p_threshold=0.6, num_null_experts=2),
}


def _block(implementation: str, gated: bool, **options) -> SparseMoeBlock:
    config = BlockConfig(num_experts=5, **options)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    block = SparseMoeBlock(config, HIDDEN, INTERMEDIATE, "silu" if gated else "gelu_new", gated=gated)
    block.experts.reset_parameters(0.3)
    if not gated:
        with torch.no_grad():
            block.experts.up_proj_bias.normal_(0, 0.3)
            block.experts.down_proj_bias.normal_(0, 0.3)
    block.reset_routing(0.5)
    return block.eval()


def _run(block: SparseMoeBlock, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out.backward(torch.cos(out.detach()))
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_implementations_agree(routing, gated):
    x = torch.randn(4, 9, HIDDEN, generator=torch.Generator().manual_seed(3))
    results = {
        impl: _run(_block(impl, gated, **ROUTINGS[routing]), x)
        for impl in ("eager", "batched_mm", "grouped_mm", "moe_zoo")
    }
    out, x_grad, grads = results["eager"]
    assert out.abs().max() > 1e-3  # the experts really ran
    assert "experts.down_proj" in grads and grads["experts.down_proj"].abs().max() > 0
    for impl in ("batched_mm", "grouped_mm", "moe_zoo"):
        other_out, other_x_grad, other_grads = results[impl]
        torch.testing.assert_close(other_out, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other_x_grad, x_grad, atol=1e-5, rtol=1e-5)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_variable_routing_really_varies():
    block = _block("eager", True, **ROUTINGS["top_p"])
    _, _, indices = block.route(torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(5)))
    per_token = (indices < block.num_experts).sum(dim=-1)
    assert per_token.min() < per_token.max()


def _reference_with_special_experts(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the definitions of FFN, copy, constant and zero experts."""
    _, weights, indices = block.route(x)
    experts = block.experts
    first_copy = block.num_experts
    first_constant = first_copy + block.num_copy
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros(HIDDEN)
        for w, e in zip(weights[t].tolist(), indices[t].tolist(), strict=True):
            if e < first_copy:
                gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                total += w * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
            elif e < first_constant:
                total += w * x[t]
            elif e < first_constant + block.num_constant:
                c = e - first_constant
                a = torch.softmax(block.constant_experts.mix[c] @ x[t], dim=0)
                total += w * (a[0] * x[t] + a[1] * block.constant_experts.vectors[c])
            # zero and null experts contribute nothing
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "moe_zoo"])
def test_zero_computation_experts(implementation):
    block = _block(
        implementation,
        True,
        router_type="softmax_topk",
        num_experts_per_tok=3,
        num_copy_experts=1,
        num_constant_experts=2,
        num_zero_experts=1,
    )
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(7))
    _, _, indices = block.route(x)
    assert (indices >= block.num_experts).any(), "the test needs tokens routed to zero-computation experts"
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference_with_special_experts(block, x), atol=1e-5, rtol=1e-5)


def test_shared_expert_is_always_on_and_gated():
    block = _block("eager", True, num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(6, HIDDEN)
    with torch.no_grad():
        routed_only = block.experts(x, *reversed(block.route(x)[1:]))
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        torch.testing.assert_close(block(x), routed_only + shared, atol=1e-6, rtol=1e-6)
