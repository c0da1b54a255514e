"""Our SparseMoeBlock, with every experts implementation (moe_zoo's included), against transformers' own MoE blocks
with the same weights (fp32, outputs and input grads)."""

import pytest
import torch
from transformers import MixtralConfig, PreTrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from moe_zoo.core import MoeOptions, SparseMoeBlock

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 16, 24, 6, 2
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm", "moe_zoo"]


def reference_implementation(implementation: str) -> str:
    """transformers' block runs the same implementation, except ours, which is checked against its eager loop."""
    return "eager" if implementation == "moe_zoo" else implementation


class BlockConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_block"


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)


def _copy_into_ours(ours: SparseMoeBlock, reference: torch.nn.Module) -> None:
    with torch.no_grad():
        ours.gate.weight.copy_(reference.gate.weight)
        ours.experts.gate_up_proj.copy_(reference.experts.gate_up_proj)
        ours.experts.down_proj.copy_(reference.experts.down_proj)
        if hasattr(reference, "shared_expert"):
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(ours.shared_expert, name).weight.copy_(getattr(reference.shared_expert, name).weight)
            ours.shared_expert_gate.weight.copy_(reference.shared_expert_gate.weight)


def _compare(reference: torch.nn.Module, ours: SparseMoeBlock) -> None:
    x = torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(1))
    x_ref = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    out_ours = ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=0)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=0)
    # The blocks really did something: a different router picks different experts and changes the output.
    with torch.no_grad():
        ours.gate.weight.mul_(-1)
    assert (ours(x) - out_ref).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_mixtral_block(implementation):
    ref_config = MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    ref_config._experts_implementation = reference_implementation(implementation)
    reference = MixtralSparseMoeBlock(ref_config)
    _randomise(reference)
    config = BlockConfig(num_experts=EXPERTS, num_experts_per_tok=TOP_K, router_type="softmax_topk")
    config._experts_implementation = implementation
    ours = SparseMoeBlock(config, HIDDEN, INTERMEDIATE, "silu")
    _copy_into_ours(ours, reference)
    _compare(reference, ours)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_qwen2_moe_block_with_shared_expert(implementation):
    ref_config = Qwen2MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTERMEDIATE,
        shared_expert_intermediate_size=2 * INTERMEDIATE,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
    )
    ref_config._experts_implementation = reference_implementation(implementation)
    reference = Qwen2MoeSparseMoeBlock(ref_config)
    _randomise(reference)
    config = BlockConfig(
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
        num_shared_experts=1,
        shared_expert_intermediate_size=2 * INTERMEDIATE,
        shared_expert_gate=True,
    )
    config._experts_implementation = implementation
    ours = SparseMoeBlock(config, HIDDEN, INTERMEDIATE, "silu")
    _copy_into_ours(ours, reference)
    _compare(reference, ours)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_qwen3_moe_block(implementation):
    ref_config = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTERMEDIATE,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
    )
    ref_config._experts_implementation = reference_implementation(implementation)
    reference = Qwen3MoeSparseMoeBlock(ref_config)
    _randomise(reference)
    config = BlockConfig(num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True)
    config._experts_implementation = implementation
    ours = SparseMoeBlock(config, HIDDEN, INTERMEDIATE, "silu")
    _copy_into_ours(ours, reference)
    _compare(reference, ours)
