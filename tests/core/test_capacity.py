"""Expert capacity and token dropping against a brute-force reference and the original MoE-LLaVA/DeepSpeed fixtures.

The fixtures (``router_logits*.pt``) were produced by the original MoE-LLaVA code on DeepSpeed 0.9.5's ``top2gating``
(Gumbel noise zeroed), see ``shared/fixtures/moe_llava_original/README.md``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_zoo.core import MoeOptions, TopKRouter, drop_over_capacity, expert_capacity

VARIANTS = ["stablelm", "phi", "qwen1_5"]


# ---------------------------------------------------------------------------------------------------------------
# Capacity formula
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 7, 54, 100, 1000])
@pytest.mark.parametrize("num_experts", [2, 4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5, 2.0, 4.0])
def test_expert_capacity_formula(num_tokens, num_experts, top_k, capacity_factor):
    # Factors exact in binary: the formula max(ceil(T / E * factor * k), min_capacity) in exact rational arithmetic.
    exact = math.ceil(num_tokens * capacity_factor * top_k / num_experts)
    assert expert_capacity(num_tokens, num_experts, top_k, capacity_factor, 0) == exact
    assert expert_capacity(num_tokens, num_experts, top_k, capacity_factor, exact + 3) == exact + 3
    assert expert_capacity(num_tokens, num_experts, top_k, capacity_factor, max(exact - 1, 0)) == exact


def _deepspeed_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """DeepSpeed 0.9.5 ``_capacity``: ``ceil((T / E) * factor_tensor)`` where ``factor_tensor`` is the fp32 tensor
    ``torch.tensor(capacity_factor * k)``, so the product is rounded to fp32 (written here with numpy)."""
    product = np.float32(num_tokens / num_experts) * np.float32(factor * top_k)
    return max(int(np.ceil(product)), min_capacity)


def test_expert_capacity_rounds_like_deepspeed_for_inexact_factors():
    # Factors such as 1.2 are not exact in binary; DeepSpeed rounds the product in fp32, which can move the
    # ceiling by one (e.g. T=50, E=2, k=2, factor 1.1: DeepSpeed 55, float64 56).
    checked = 0
    for num_tokens in range(1, 160):
        for num_experts in (2, 3, 4, 8):
            for top_k in (1, 2):
                for factor in (0.3, 0.7, 1.1, 1.2, 1.25, 1.5):
                    want = _deepspeed_capacity(num_tokens, num_experts, top_k, factor, 0)
                    assert expert_capacity(num_tokens, num_experts, top_k, factor, 0) == want, (
                        num_tokens,
                        num_experts,
                        top_k,
                        factor,
                    )
                    checked += 1
    assert checked > 7000


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["router_logits.pt", "router_logits_capacity_drop.pt"])
def test_expert_capacity_equals_the_original_capacity(moe_llava_fixtures, variant, name):
    data = torch.load(moe_llava_fixtures / variant / name, weights_only=True)
    for layer in data["moe_layers_idx"]:
        num_tokens, num_experts = data["router_logits"][layer].shape
        got = expert_capacity(num_tokens, num_experts, 2, data["eval_capacity_factor"], 0)
        assert got == int(data["capacity"][layer])


# ---------------------------------------------------------------------------------------------------------------
# Dropping against a brute-force reference
# ---------------------------------------------------------------------------------------------------------------


def _brute_force_drop(indices, weights, num_experts, capacity, renormalize):
    """Hand out buffer slots choice by choice (every first choice in token order, then every second choice, ...)."""
    num_tokens, top_k = len(indices), len(indices[0])
    used = [0] * (num_experts + 1)
    kept = [[False] * top_k for _ in range(num_tokens)]
    for choice in range(top_k):
        for token in range(num_tokens):
            expert = indices[token][choice]
            if expert == num_experts:  # an empty (sentinel) slot takes no expert's buffer
                continue
            if used[expert] < capacity:
                kept[token][choice] = True
            used[expert] += 1
    new_indices, new_weights = [], []
    for token in range(num_tokens):
        row_w = [w if k else 0.0 for w, k in zip(weights[token], kept[token], strict=True)]
        if renormalize:
            total, kept_total = sum(weights[token]), sum(row_w)
            row_w = [w / kept_total * total if kept_total > 0 else 0.0 for w in row_w]
        new_indices.append([e if k else num_experts for e, k in zip(indices[token], kept[token], strict=True)])
        new_weights.append(row_w)
    return new_indices, new_weights


def _random_routing(num_tokens, num_experts, top_k, seed, skew=2.0, sentinels=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, 0] += skew  # overload expert 0 so that capacity really bites
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if sentinels:  # a variable-width router's empty slots
        empty = torch.rand(num_tokens, top_k, generator=g) < 0.2
        empty[:, 0] = False
        indices = torch.where(empty, num_experts, indices)
        weights = torch.where(empty, 0.0, weights)
    return indices, weights


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [0, 1, 3, 6, 12, 40])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("sentinels", [False, True])
def test_drop_over_capacity_matches_brute_force(top_k, capacity, renormalize, sentinels):
    num_experts = 5
    indices, weights = _random_routing(30, num_experts, top_k, seed=top_k * 100 + capacity, sentinels=sentinels)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    got_indices, got_weights = drop_over_capacity(indices, weights, num_experts, capacity, renormalize)
    want_indices, want_weights = _brute_force_drop(
        indices.tolist(), weights.tolist(), num_experts, capacity, renormalize
    )
    assert got_indices.tolist() == want_indices
    torch.testing.assert_close(got_weights, torch.tensor(want_weights), atol=1e-6, rtol=0)
    # The set-up is discriminating: something is dropped unless capacity is large, nothing at capacity >= T.
    dropped = (got_indices == num_experts).sum() - (indices == num_experts).sum()
    if 0 < capacity <= 6:
        assert dropped > 0
    if capacity >= 30:
        assert dropped == 0


def test_first_choices_fill_buffers_before_second_choices():
    # Token 3's first choice of expert 0 beats tokens 0..2's *second* choices of expert 0, although it comes later.
    indices = torch.tensor([[1, 0], [2, 0], [1, 0], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    got_indices, got_weights = drop_over_capacity(indices, weights, 3, capacity=2, renormalize=True)
    # expert 0: token 3 (1st choice, slot 0), token 0 (2nd choice, slot 1); tokens 1 and 2 lose their 2nd choice.
    # expert 1: tokens 0 and 2 (1st choices, slots 0 and 1); token 3's 2nd choice is slot 2: dropped.
    assert got_indices.tolist() == [[1, 0], [2, 3], [1, 3], [0, 3]]
    torch.testing.assert_close(got_weights, torch.tensor([[0.6, 0.4], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))


def test_renormalisation_keeps_the_original_total_and_drops_everything_to_zero():
    # A sigmoid router with routed_scaling_factor: weights sum to 2.5, kept weights are rescaled to 2.5.
    indices = torch.tensor([[0, 1], [0, 1], [0, 1]])
    weights = torch.tensor([[1.5, 1.0], [2.0, 0.5], [1.25, 1.25]])
    got_indices, got_weights = drop_over_capacity(indices, weights, 2, capacity=1, renormalize=True)
    assert got_indices.tolist() == [[0, 1], [2, 2], [2, 2]]
    torch.testing.assert_close(got_weights, torch.tensor([[1.5, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    _, kept_one = drop_over_capacity(torch.tensor([[0, 1], [1, 0]]), weights[:2], 2, capacity=1, renormalize=True)
    # Both first choices take the single slots, both second choices are dropped: each token's whole 2.5 goes to
    # its first choice when renormalising, the raw first weight otherwise.
    torch.testing.assert_close(kept_one, torch.tensor([[2.5, 0.0], [2.5, 0.0]]))
    _, raw = drop_over_capacity(torch.tensor([[0, 1], [1, 0]]), weights[:2], 2, capacity=1, renormalize=False)
    torch.testing.assert_close(raw, torch.tensor([[1.5, 0.0], [2.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------------------
# Against the original MoE-LLaVA + DeepSpeed 0.9.5 fixtures
# ---------------------------------------------------------------------------------------------------------------


def _route_fixture_logits(logits: torch.Tensor, capacity: int) -> torch.Tensor:
    """Route precomputed router logits with our softmax_topk router (k=2, renormalised), drop over capacity and
    scatter the weights into a dense (T, E) matrix, the shape of the fixture's ``expert_weights``."""
    num_tokens, num_experts = logits.shape
    router = TopKRouter(MoeOptions(num_experts=num_experts, num_experts_per_tok=2, norm_topk_prob=True), num_experts)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))  # identity router: its logits are the fixture's logits
    router.eval()
    router_logits, weights, indices = router(logits)
    assert torch.equal(router_logits, logits)
    indices, weights = drop_over_capacity(indices, weights, num_experts, capacity, renormalize=True)
    dense = torch.zeros(num_tokens, num_experts + 1)
    dense.scatter_add_(1, indices, weights)
    return dense[:, :num_experts]


@pytest.mark.parametrize("variant", VARIANTS)
def test_capacity_drop_matches_original_deepspeed(moe_llava_fixtures, variant):
    data = torch.load(moe_llava_fixtures / variant / "router_logits_capacity_drop.pt", weights_only=True)
    for layer in data["moe_layers_idx"]:
        logits = data["router_logits"][layer]
        capacity = int(data["capacity"][layer])
        want = data["expert_weights"][layer]
        assert logits.shape == (54, 4) and capacity == 14
        got = _route_fixture_logits(logits, capacity)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # The fixture really drops: many tokens lost one or both experts.
        assert ((want > 0).sum(-1) < 2).sum() >= 20
        # And the no-capacity routing would differ.
        assert (_route_fixture_logits(logits, 54) - want).abs().max() > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_drop_fixture_keeps_every_assignment(moe_llava_fixtures, variant):
    data = torch.load(moe_llava_fixtures / variant / "router_logits.pt", weights_only=True)
    for layer in data["moe_layers_idx"]:
        logits = data["router_logits"][layer]
        capacity = int(data["capacity"][layer])
        assert capacity == 54
        want = data["expert_weights"][layer]
        got = _route_fixture_logits(logits, capacity)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert ((got > 0).sum(-1) == 2).all()
        torch.testing.assert_close(got.sum(-1), torch.ones(54), atol=1e-6, rtol=0)
        # The original's top-1 counts (before dropping) agree with our first choices.
        first = torch.bincount(logits.argmax(-1), minlength=4)
        assert first.tolist() == torch.as_tensor(data["exp_counts_top1"][layer]).tolist()
