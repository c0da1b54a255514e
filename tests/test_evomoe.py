"""EvoMoE's recipe (``moe_zoo.training.evomoe``): diversified experts are masked copies of the trained one, the
gate-sparsify phase anneals the Gumbel temperature and routes tokens to fewer experts as it goes, and the final
(top-1) model reloads with its logits."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

import moe_zoo
from moe_zoo.analysis import collect_expert_statistics
from moe_zoo.core.routing import DenseToSparseRouter, TopKRouter
from moe_zoo.training.evomoe import EvoMoeArguments, diversify_experts, run_evomoe, switch_to_top1

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _dense():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TEXT, pad_token_id=0))


def _dataset() -> Dataset:
    ids = torch.randint(1, 64, (32, 12), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "evomoe"),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


def _experts_per_token(model, ids: torch.Tensor) -> float:
    """Mean number of experts a token uses at eval (at the routers' current temperature), over the MoE blocks."""
    stats = collect_expert_statistics(model, [{"input_ids": ids}], progress=False)
    return sum(float(c.sum()) for c in stats.counts.values()) / (len(stats.counts) * stats.tokens)


def test_diversified_experts_are_masked_copies_of_the_first():
    moe = moe_zoo.upcycle(_dense(), num_experts=4)
    original = [b.experts.gate_up_proj[0].clone() for b in moe.moe_blocks()]
    diversify_experts(moe, mask_ratio=0.3, seed=1)
    for block, first in zip(moe.moe_blocks(), original, strict=True):
        bank = block.experts.gate_up_proj
        assert torch.equal(bank[0], first)  # the trained expert is kept
        for expert in range(1, 4):
            kept = bank[expert] != 0
            assert torch.equal(bank[expert][kept], first[kept])  # each weight is the trained one or zero
            assert (~kept).float().mean().item() == pytest.approx(0.3, abs=0.03)
        assert not torch.equal(bank[1], bank[2])  # different masks


def test_the_recipe_trains_one_expert_then_sparsifies_the_gate(tmp_path):
    dense = _dense()
    before = [p.clone() for p in dense.parameters()]
    options = EvoMoeArguments(num_experts=4, diversify_steps=3, sparsify_steps=12, gumbel_tau_min=0.02, seed=0)
    probe = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(9))
    moe, trainers = run_evomoe(dense, _dataset(), _args(tmp_path), options)
    assert any(not torch.equal(a, b) for a, b in zip(before, dense.parameters(), strict=True))  # phase 1 trained
    routers = [b.gate for b in moe.moe_blocks()]
    assert all(isinstance(r, DenseToSparseRouter) for r in routers)
    assert all(r.temperature == pytest.approx(0.02) for r in routers)  # annealed to tau_min over the phase
    assert trainers["sparsify"].state.global_step == 12
    logged = [e for e in trainers["sparsify"].state.log_history if "expert_load_max_ratio" in e]
    assert logged  # the MoE phase logs the expert load
    # Dense to sparse: at tau_max every token uses all 4 experts; at the final temperature about half as many
    # (measured 2.15: the tiny router's logits are small, hence the low tau_min).
    sparse = _experts_per_token(moe, probe)
    for router in routers:
        router.step.zero_()
    assert _experts_per_token(moe, probe) == 4.0
    assert sparse < 3.0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "evomoe")
    assert isinstance(reloaded.moe_blocks()[0].gate, DenseToSparseRouter)


def test_switching_to_top1_keeps_the_gate_weights_and_reloads(tmp_path):
    moe = moe_zoo.upcycle(_dense(), num_experts=4, router_type="dense_to_sparse").eval()
    weights = [b.gate.weight.clone() for b in moe.moe_blocks()]
    switch_to_top1(moe)
    ids = torch.arange(1, 25).reshape(2, 12)
    for block, weight in zip(moe.moe_blocks(), weights, strict=True):
        assert isinstance(block.gate, TopKRouter) and torch.equal(block.gate.weight, weight)
        _, _, indices = block.route(torch.randn(5, TEXT["hidden_size"]))
        assert indices.shape == (5, 1)
    moe.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.router_type == "softmax_topk" and reloaded.config.num_experts_per_tok == 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, moe(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no dense-to-sparse gate"):
        switch_to_top1(moe)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        EvoMoeArguments(mask_ratio=1.0)
    with pytest.raises(ValueError, match="num_experts must be >= 2"):
        EvoMoeArguments(num_experts=1)
    with pytest.raises(ValueError, match="sparsify_steps"):
        EvoMoeArguments(sparsify_steps=0)
