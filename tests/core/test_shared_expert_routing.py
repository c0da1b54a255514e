"""UniMoE-Audio's shared-expert weighting (``shared_expert_routing``): each token's selected routed experts and all
shared experts share one softmax over their logits, checked against a token-by-token computation with the shared
experts run one by one from their slices of the fused FFN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig, PreTrainedConfig

import moe_zoo
from moe_zoo.core import MoeOptions, SparseMoeBlock

HIDDEN, INTERMEDIATE, SHARED_INTERMEDIATE = 16, 24, 8
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


class BlockConfig(PreTrainedConfig, MoeOptions):
    model_type = "shared_routing_test"


def _block(**options) -> SparseMoeBlock:
    config = BlockConfig(
        num_experts=6,
        router_type="top_p",
        top_p_threshold=0.7,
        num_null_experts=1,
        num_shared_experts=2,
        shared_expert_intermediate_size=SHARED_INTERMEDIATE,
        shared_expert_routing=True,
        **options,
    )
    torch.manual_seed(0)
    block = SparseMoeBlock(config, HIDDEN, INTERMEDIATE, "silu")
    block.reset_routing(0.5)
    with torch.no_grad():
        for param in [*block.experts.parameters(), *block.shared_expert.parameters()]:
            param.copy_(torch.randn_like(param) * 0.3)
    return block.double()


def _reference(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    logits, _, indices = block.route(x)
    shared_logits = block.shared_expert_router(x)
    mlp = block.shared_expert
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = [int(i) for i in indices[t] if int(i) < logits.shape[-1]]
        scores = torch.softmax(torch.cat([logits[t, chosen], shared_logits[t]]), dim=0)
        for slot, weight in zip(chosen, scores[: len(chosen)], strict=True):
            if slot < block.num_experts:  # the null expert outputs zero
                out[t] += weight * block.experts.expert_forward(slot, x[t : t + 1])[0]
        for s, weight in enumerate(scores[len(chosen) :]):
            part = slice(s * SHARED_INTERMEDIATE, (s + 1) * SHARED_INTERMEDIATE)
            hidden = mlp.act_fn(x[t] @ mlp.gate_proj.weight[part].T) * (x[t] @ mlp.up_proj.weight[part].T)
            out[t] += weight * (hidden @ mlp.down_proj.weight[:, part].T)
    return out


def test_selected_and_shared_experts_share_one_softmax():
    block = _block()
    x = torch.randn(24, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference(block, x))
        _, _, indices = block.route(x)
        routed, shared = block._weights_with_shared_experts(x, block.route(x)[0], indices)
    torch.testing.assert_close(routed.sum(-1) + shared.sum(-1), torch.ones(24, dtype=torch.float64))
    assert (shared > 0).all()
    assert len({int((indices < 7).sum(-1)[t]) for t in range(24)}) > 1  # top-p: a varying number of experts


def test_the_shared_expert_router_trains():
    block = _block()
    x = torch.randn(10, HIDDEN, dtype=torch.float64)
    block(x).square().sum().backward()
    assert block.shared_expert_router.weight.grad.abs().sum() > 0
    assert block.gate.weight.grad.abs().sum() > 0  # the routed logits get gradient through the joint softmax


def test_an_upcycled_model_with_it_reloads_identically(tmp_path):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT))
    moe = moe_zoo.upcycle(
        dense, num_experts=4, router_type="top_p", num_null_experts=1, num_shared_experts=2, shared_expert_routing=True
    ).eval()
    assert all(isinstance(b.shared_expert_router, nn.Linear) for b in moe.moe_blocks())
    moe.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, moe(ids).logits, atol=0, rtol=0)


def test_it_is_refused_where_it_cannot_apply():
    text = LlamaConfig(**TEXT)
    with pytest.raises(ValueError, match="`shared_expert_routing` is True.*num_shared_experts >= 1"):
        moe_zoo.UpcycledMoeConfig(text_config=text, shared_expert_routing=True)  # no shared experts
    with pytest.raises(ValueError, match="`shared_expert_routing` is True.*shared_expert_gate is False"):
        moe_zoo.UpcycledMoeConfig(
            text_config=text, num_shared_experts=1, shared_expert_gate=True, shared_expert_routing=True
        )
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="gated shared experts"):
        moe_zoo.upcycle(
            AutoModelForCausalLM.from_config(PhiConfig(**TEXT)), num_shared_experts=1, shared_expert_routing=True
        )
