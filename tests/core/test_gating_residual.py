"""MoE++'s gating residuals (``gating_residual``): every MoE block after the first adds the previous block's router
logits, through a learned map, to its own before choosing experts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import moe_zoo
from moe_zoo.core.recording import collect_routing

TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
IDS = torch.arange(3, 27).reshape(2, 12)


def _dense():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TEXT)).eval()


def _moe(**options):
    torch.manual_seed(1)
    return moe_zoo.upcycle(
        _dense(), num_experts=4, num_zero_experts=1, num_copy_experts=1, gating_residual=True, **options
    ).eval()


def _with_residual_weights(moe):
    torch.manual_seed(2)
    with torch.no_grad():
        for block in moe.moe_blocks()[1:]:
            block.gating_residual.weight.copy_(torch.randn_like(block.gating_residual.weight))
    return moe


def test_every_block_after_the_first_gets_a_zero_initialised_map():
    moe = _moe(moe_layers="all")
    blocks = moe.moe_blocks()
    assert blocks[0].gating_residual is None
    for block in blocks[1:]:
        assert block.gating_residual.weight.shape == (6, 6)  # 4 FFN + zero + copy slots
        assert block.gating_residual.weight.abs().sum() == 0
    plain = moe_zoo.upcycle(_dense(), num_experts=4, num_zero_experts=1, num_copy_experts=1)
    torch.manual_seed(1)
    with torch.no_grad():  # zero maps: the routing (and so the logits) is what it is without gating residuals
        torch.testing.assert_close(moe(IDS).logits, _same_routers(plain, moe)(IDS).logits)


def _same_routers(target, source):
    target.load_state_dict({k: v for k, v in source.state_dict().items() if "gating_residual" not in k})
    return target.eval()


def test_each_block_adds_the_previous_blocks_logits_through_its_map():
    moe = _with_residual_weights(_moe(moe_layers="all"))
    blocks = moe.moe_blocks()
    inputs = {}
    handles = [
        b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, 16)))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad(), collect_routing() as records:
        moe(IDS)
    for handle in handles:
        handle.remove()
    assert len(records) == 3
    with torch.no_grad():
        own = blocks[0].gate.logits(inputs[0])
        torch.testing.assert_close(records[0].logits, own)
        for position in (1, 2):
            own = blocks[position].gate.logits(inputs[position])
            expected = own + records[position - 1].logits @ blocks[position].gating_residual.weight.T
            torch.testing.assert_close(records[position].logits, expected)


def test_gradients_reach_the_maps_and_checkpointing_recomputes_the_same_routing():
    moe = _with_residual_weights(_moe(moe_layers="all", output_router_logits=True)).train()
    loss = moe(IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if "gating_residual" in n or ".gate." in n}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "gating_residual" in n)
    moe.zero_grad()
    moe.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = moe(IDS, labels=IDS).loss
    checkpointed.backward()
    assert checkpointed.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(moe.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_it_saves_reloads_and_generates(tmp_path):
    moe = _with_residual_weights(_moe(moe_layers="sparse"))  # layers 0 and 2: the residual skips the dense layer
    assert moe.moe_blocks()[1].gating_residual is not None
    moe.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(IDS).logits, moe(IDS).logits, atol=0, rtol=0)
    cached = moe.generate(IDS[:, :4], max_new_tokens=5, do_sample=False)
    uncached = moe.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="gating_residual"):
        moe_zoo.upcycle(_dense(), num_experts=4, router_type="top_any", gating_residual=True)


def test_pruning_keeps_the_maps_between_the_surviving_slots(tmp_path):
    from moe_zoo.analysis import prune_experts

    moe = _with_residual_weights(_moe(moe_layers="all"))
    blocks = moe.moe_blocks()
    full = [b.gating_residual.weight.clone() if b.gating_residual is not None else None for b in blocks]
    names = [n for n, m in moe.named_modules() if m in blocks]
    keep = {names[0]: [0, 1], names[1]: [1, 3], names[2]: [0, 2]}
    blocks[2].gating_residual.weight.requires_grad_(False)  # a frozen map stays frozen
    prune_experts(moe, keep)
    slots = [torch.tensor(kept + [4, 5]) for kept in keep.values()]  # the zero and copy slots stay
    for position in (1, 2):
        expected = full[position][slots[position]][:, slots[position - 1]]
        torch.testing.assert_close(blocks[position].gating_residual.weight, expected)
        assert blocks[position].gating_residual.in_features == blocks[position].gating_residual.out_features == 4
    assert [b.gating_residual.weight.requires_grad for b in blocks[1:]] == [True, False]
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, moe(IDS).logits, atol=0, rtol=0)


def test_bf16_load_keeps_the_maps_in_fp32_like_the_routers(tmp_path):
    _with_residual_weights(_moe(moe_layers="all")).save_pretrained(tmp_path)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    blocks = half.moe_blocks()
    assert {b.gating_residual.weight.dtype for b in blocks[1:]} == {torch.float32}
    assert blocks[1].experts.gate_up_proj.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(half(IDS).logits).all()
