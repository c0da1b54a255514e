"""RMoE's residual experts (``moe_zoo.core.residual_experts``): the core is frozen and shared, only the residuals
train (full or low-rank), every experts implementation reads ``core + residual``, and merging gives a plain MoE
checkpoint with the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

import moe_zoo
from moe_zoo.core.residual_experts import (
    add_residual_experts,
    freeze_all_but_residuals,
    merge_residual_experts,
    residual_parameters,
)

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
IDS = torch.arange(3, 27).reshape(2, 12)


def _moe(config_class=LlamaConfig, distinct: bool = True, **options):
    torch.manual_seed(0)
    moe = moe_zoo.upcycle(AutoModelForCausalLM.from_config(config_class(**TEXT)), num_experts=4, **options)
    if distinct:
        with torch.no_grad():
            for block in moe.moe_blocks():
                for param in block.experts.parameters():
                    param.add_(0.05 * torch.randn_like(param))
    return moe.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("config_class", [LlamaConfig, PhiConfig])
def test_full_residuals_keep_the_function_and_train_only_the_residuals(config_class):
    moe = _moe(config_class)
    before = _logits(moe)
    add_residual_experts(moe)
    torch.testing.assert_close(_logits(moe), before, atol=1e-6, rtol=1e-6)
    trainable = freeze_all_but_residuals(moe, train_routers=True)
    assert trainable and all(".original" in n or ".gate." in n for n in trainable)
    moe.train()
    moe(IDS, labels=IDS).loss.backward()
    for block in moe.moe_blocks():
        for name, parametrization in block.experts.parametrizations.items():
            assert not parametrization[0].core.requires_grad  # a buffer: no gradient, no optimizer state
            assert parametrization.original.grad.abs().sum() > 0, name
            # One core per bank, shared by its experts: the mean of the (distinct) experts.
            assert parametrization[0].core.shape[0] == 1
    assert all(p.grad is None for n, p in moe.named_parameters() if "embed_tokens" in n)


@pytest.mark.parametrize("implementation", ["eager", "moe_zoo", "grouped_mm"])
def test_low_rank_residuals_start_at_the_core_and_every_implementation_reads_them(implementation):
    moe = _moe(distinct=False)  # upcycled: every expert is the core, so the function is kept at the start too
    before = _logits(moe)
    add_residual_experts(moe, rank=2)
    moe.set_experts_implementation(implementation)
    torch.testing.assert_close(_logits(moe), before, atol=1e-6, rtol=1e-6)
    freeze_all_but_residuals(moe, train_routers=False)
    trainable = sum(p.numel() for p in moe.parameters() if p.requires_grad)
    gate_up, down = (2 * 32, 16), (16, 32)  # (out, in) of the two expert tensors
    assert trainable == 2 * 4 * 2 * (sum(gate_up) + sum(down))  # layers x experts x rank x (out + in), per tensor
    optimizer = torch.optim.SGD(residual_parameters(moe), lr=0.5)
    moe.train()
    for _ in range(3):
        optimizer.zero_grad()
        moe(IDS, labels=IDS).loss.backward()
        optimizer.step()
    trained = _logits(moe.eval())
    assert (trained - before).abs().max() > 1e-4  # the residuals learned something
    moe.set_experts_implementation("eager")
    torch.testing.assert_close(_logits(moe), trained, atol=1e-5, rtol=1e-5)


def test_merged_residual_experts_save_as_a_plain_moe(tmp_path):
    moe = _moe()
    add_residual_experts(moe, rank=3)
    with torch.no_grad():
        for param in residual_parameters(moe):
            param.add_(0.1 * torch.randn_like(param))
    expected = _logits(moe)
    merge_residual_experts(moe)
    assert not any("parametrizations" in n for n, _ in moe.named_parameters())
    moe.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(_logits(reloaded.eval()), expected, atol=1e-6, rtol=1e-6)


def test_bad_requests_are_refused():
    moe = _moe()
    with pytest.raises(ValueError, match="rank must be None"):
        add_residual_experts(moe, rank=0)
    add_residual_experts(moe)
    with pytest.raises(ValueError, match="already has residual experts"):
        add_residual_experts(moe)
    low_rank = add_residual_experts(_moe(), rank=2)
    bank = low_rank.moe_blocks()[0].experts
    with pytest.raises(ValueError, match="cannot take an assigned weight"):
        bank.gate_up_proj = torch.zeros_like(bank.gate_up_proj)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no moe_zoo MoE block"):
        add_residual_experts(AutoModelForCausalLM.from_config(LlamaConfig(**TEXT)))
