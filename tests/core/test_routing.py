"""Routers of ``moe_zoo.core.routing`` against transformers' own routers and against the math written out here.

Every expected value is computed by transformers or by independent code in this file, never by moe_zoo itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from moe_zoo.core import (
    DenseToSparseRouter,
    MoeOptions,
    TopAnyRouter,
    TopKRouter,
    TopPRouter,
    build_router,
    update_selection_biases,
)

HIDDEN, EXPERTS = 16, 8


def _options(**overrides) -> MoeOptions:
    base = {"num_experts": EXPERTS, "num_experts_per_tok": 2}
    base.update(overrides)
    return MoeOptions(**base)


def _tokens(num_tokens: int = 64, seed: int = 1, hidden: int = HIDDEN) -> torch.Tensor:
    return torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed))


def _random_weight(router: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.Tensor:
    weight = torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        router.weight.copy_(weight)
    return weight


def _sorted_by_index(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, sort the chosen experts by id and carry their weights along (order-free comparison)."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


# ---------------------------------------------------------------------------------------------------------------
# Fixed top-k routers against transformers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_softmax_topk_matches_mixtral_router(top_k):
    reference = MixtralTopKRouter(
        MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=top_k)
    )
    ours = TopKRouter(_options(num_experts_per_tok=top_k, router_type="softmax_topk", norm_topk_prob=True), HIDDEN)
    weight = _random_weight(ours)
    with torch.no_grad():
        reference.weight.copy_(weight)
    x = _tokens()
    ref_logits, ref_weights, ref_indices = reference(x)
    logits, weights, indices = ours(x)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)
    # Renormalised: every token's weights sum to 1.
    torch.testing.assert_close(weights.sum(-1), torch.ones(x.shape[0]), atol=1e-6, rtol=0)


def test_softmax_topk_without_renormalisation_matches_qwen2_moe_router():
    reference = Qwen2MoeTopKRouter(
        Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=False)
    )
    ours = TopKRouter(_options(router_type="softmax_topk", norm_topk_prob=False), HIDDEN)
    weight = _random_weight(ours, seed=3)
    with torch.no_grad():
        reference.weight.copy_(weight)
    x = _tokens(seed=4)
    _, ref_weights, ref_indices = reference(x)
    _, weights, indices = ours(x)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)
    # The raw probabilities are really not renormalised.
    assert (weights.sum(-1) < 1 - 1e-3).all()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sigmoid_topk_with_selection_bias_matches_deepseek_v3_router(norm_topk_prob):
    scaling = 2.5
    reference = DeepseekV3TopkRouter(
        DeepseekV3Config(
            hidden_size=HIDDEN,
            n_routed_experts=EXPERTS,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=scaling,
            norm_topk_prob=norm_topk_prob,
        )
    )
    ours = TopKRouter(
        _options(router_type="sigmoid_topk", norm_topk_prob=norm_topk_prob, routed_scaling_factor=scaling), HIDDEN
    )
    weight = _random_weight(ours, seed=5)
    bias = torch.tensor([0.3, -0.2, 0.0, 0.15, -0.4, 0.25, 0.05, -0.1])
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.e_score_correction_bias.copy_(bias)
        ours.selection_bias.copy_(bias)
    x = _tokens(seed=6)
    ref_logits, ref_weights, ref_indices = reference(x)
    logits, weights, indices = ours(x)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    ref_indices, ref_weights = _sorted_by_index(ref_indices, ref_weights)
    indices, weights = _sorted_by_index(indices, weights)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)
    # The bias really changed the selection for some tokens (so the comparison covers it).
    unbiased = torch.topk(torch.sigmoid(x @ weight.t()), 2, dim=-1).indices.sort(dim=-1).values
    assert (unbiased != indices).any(dim=-1).sum() >= 5


def test_topk_softmax_is_softmax_over_the_selected_logits():
    ours = TopKRouter(_options(router_type="topk_softmax", num_experts_per_tok=3), HIDDEN)
    weight = _random_weight(ours, seed=7)
    x = _tokens(seed=8)
    _, weights, indices = ours(x)
    logits = (x.double() @ weight.double().t()).tolist()
    for token, row in enumerate(logits):
        ranked = sorted(range(EXPERTS), key=lambda e: row[e], reverse=True)[:3]
        normaliser = sum(math.exp(row[e]) for e in ranked)
        expected = {e: math.exp(row[e]) / normaliser for e in ranked}
        assert sorted(indices[token].tolist()) == sorted(ranked)
        for slot, expert in enumerate(indices[token].tolist()):
            assert weights[token, slot].item() == pytest.approx(expected[expert], abs=1e-6)
    # It differs from softmax-then-top-k without renormalisation (the whole-distribution probabilities).
    full = torch.softmax(x @ weight.t(), dim=-1).gather(-1, indices)
    assert (full - weights).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Precision and jitter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router_type", ["softmax_topk", "sigmoid_topk", "top_p", "dense_to_sparse"])
def test_router_computes_in_fp32_when_module_is_bf16(router_type):
    router = build_router(_options(router_type=router_type), HIDDEN)
    _random_weight(router, seed=9)
    router.to(torch.bfloat16).eval()
    assert router.weight.dtype == torch.bfloat16
    x = _tokens(seed=10).to(torch.bfloat16)
    logits, weights, _ = router(x)
    assert logits.dtype == torch.float32
    assert weights.dtype == torch.float32
    # Exactly the fp32 product of the (bf16-stored) values, not a bf16 matmul rounded to bf16.
    expected = x.double() @ router.weight.double().t()
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=0)
    bf16_product = (x @ router.weight.t()).double()
    assert (bf16_product - expected).abs().max() > 1e-4  # a bf16 computation would be measurably off


def test_input_jitter_only_in_training():
    jitter = 0.1
    router = TopKRouter(_options(router_type="softmax_topk", router_jitter_noise=jitter), HIDDEN)
    weight = _random_weight(router, seed=11)
    x = _tokens(seed=12)
    clean = x @ weight.t()
    router.eval()
    eval_a = router(x)
    eval_b = router(x)
    for a, b in zip(eval_a, eval_b, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(eval_a[0], clean, atol=1e-5, rtol=0)
    router.train()
    train_logits = router(x)[0]
    assert (train_logits - clean).abs().max() > 1e-3
    assert not torch.equal(router(x)[0], train_logits)  # fresh noise each call


def test_jitter_multiplies_the_input_by_uniform_noise_in_range():
    jitter = 0.2
    router = TopKRouter(_options(num_experts=2, num_experts_per_tok=1, router_jitter_noise=jitter), 1)
    with torch.no_grad():
        router.weight.fill_(1.0)
    x = torch.linspace(0.5, 3.0, 400)[:, None]
    router.train()
    factors = router(x)[0][:, 0] / x[:, 0]
    assert factors.min() >= 1 - jitter - 1e-6
    assert factors.max() <= 1 + jitter + 1e-6
    assert factors.std() > jitter / 4  # really spread over the range, not a constant


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's Gumbel second expert
# ---------------------------------------------------------------------------------------------------------------


def _gumbel_router() -> tuple[TopKRouter, torch.Tensor]:
    router = TopKRouter(_options(router_type="softmax_topk", router_second_expert_gumbel=True), HIDDEN)
    weight = _random_weight(router, seed=13, std=0.2)
    return router.eval(), weight


def test_gumbel_second_expert_first_is_argmax_and_second_is_noisy():
    router, weight = _gumbel_router()
    x = _tokens(num_tokens=200, seed=14)
    logits = x @ weight.t()
    plain_top2 = torch.topk(logits, 2, dim=-1).indices
    torch.manual_seed(0)
    _, weights, indices = router(x)  # eval: DeepSpeed draws the noise at eval too
    assert torch.equal(indices[:, 0], logits.argmax(dim=-1))
    assert (indices[:, 1] != indices[:, 0]).all()
    assert (indices[:, 1] != plain_top2[:, 1]).sum() >= 10
    # The weights are the chosen softmax probabilities renormalised over the two.
    chosen = torch.softmax(logits, dim=-1).gather(-1, indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True), atol=1e-6, rtol=0)


def test_gumbel_second_expert_follows_the_gumbel_max_distribution():
    # Gumbel-max: the noisy argmax over the remaining experts picks j with probability softmax(logits without i1)_j.
    router, weight = _gumbel_router()
    x = _tokens(num_tokens=3, seed=15).repeat_interleave(20_000, dim=0)
    torch.manual_seed(1)
    _, _, indices = router(x)
    logits = (x[::20_000] @ weight.t()).double()
    for token in range(3):
        draws = indices[token * 20_000 : (token + 1) * 20_000]
        first = int(logits[token].argmax())
        assert (draws[:, 0] == first).all()
        remaining = logits[token].clone()
        remaining[first] = float("-inf")
        expected = torch.softmax(remaining, dim=-1)
        observed = torch.bincount(draws[:, 1], minlength=EXPERTS).double() / draws.shape[0]
        torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


def test_gumbel_second_expert_with_zero_noise_is_plain_top2(monkeypatch):
    router, weight = _gumbel_router()
    x = _tokens(num_tokens=200, seed=14)
    # U = exp(-1) gives Gumbel noise -log(-log(U)) = 0 for every logit.
    monkeypatch.setattr(torch, "rand_like", lambda t, **kw: torch.full_like(t, math.exp(-1.0), **kw))
    _, weights, indices = router(x)
    probs = torch.softmax(x @ weight.t(), dim=-1)
    top = torch.topk(probs, 2, dim=-1)
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Top-p
# ---------------------------------------------------------------------------------------------------------------


def _brute_force_top_p(probs: list[float], p: float) -> set[int]:
    chosen, mass = set(), 0.0
    for expert in sorted(range(len(probs)), key=lambda e: probs[e], reverse=True):
        chosen.add(expert)
        mass += probs[expert]
        if mass >= p:
            break
    return chosen


@pytest.mark.parametrize("p", [0.1, 0.4, 0.6, 0.85, 0.99])
def test_top_p_matches_brute_force(p):
    router = TopPRouter(_options(router_type="top_p", top_p_threshold=p), HIDDEN)
    weight = _random_weight(router, seed=15, std=0.6)
    x = _tokens(num_tokens=50, seed=16)
    _, weights, indices = router(x)
    probs = torch.softmax(x @ weight.t(), dim=-1)
    expected_sets = [_brute_force_top_p(row, p) for row in probs.tolist()]
    assert indices.shape[1] == max(len(s) for s in expected_sets)  # padded to the widest token
    for token, expected in enumerate(expected_sets):
        row_indices = indices[token].tolist()
        real = [(slot, e) for slot, e in enumerate(row_indices) if e != EXPERTS]
        assert {e for _, e in real} == expected
        assert len(real) == len(expected)  # no expert twice
        for slot, expert in real:  # raw, unrenormalised probabilities
            assert weights[token, slot].item() == pytest.approx(probs[token, expert].item(), abs=1e-6)
        for slot, expert in enumerate(row_indices):  # sentinel slots carry index E and weight 0
            if expert == EXPERTS:
                assert weights[token, slot].item() == 0.0
    if p < 0.99:
        assert (weights.sum(-1) < 1 - 1e-3).any()  # some token's weights do not sum to 1


def test_top_p_selects_a_variable_number_of_experts():
    router = TopPRouter(_options(router_type="top_p", top_p_threshold=0.6), HIDDEN)
    _random_weight(router, seed=15, std=0.6)
    _, _, indices = router(_tokens(num_tokens=50, seed=16))
    counts = (indices < EXPERTS).sum(-1)
    assert counts.min() < counts.max()
    assert (indices == EXPERTS).any()


# ---------------------------------------------------------------------------------------------------------------
# Top-any (DynMoE)
# ---------------------------------------------------------------------------------------------------------------

TOP_ANY_EXPERTS = 6


def _top_any_router(init_experts=None, gates=None) -> TopAnyRouter:
    torch.manual_seed(17)
    router = TopAnyRouter(
        _options(num_experts=TOP_ANY_EXPERTS, router_type="top_any", top_any_init_experts=init_experts), HIDDEN
    )
    if gates is not None:
        with torch.no_grad():
            router.gates.copy_(gates)
    return router


def _top_any_reference(router: TopAnyRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and the activity mask, written out: sigmoid(cos(x, column_e)) > sigmoid(gate_e), masked slots off."""
    w = router.sim_matrix.detach().double()
    xd = x.double()
    cosine = (xd @ w) / (xd.norm(dim=-1, keepdim=True) * w.norm(dim=0, keepdim=True))
    scores = 1.0 / (1.0 + torch.exp(-cosine))
    threshold = 1.0 / (1.0 + torch.exp(-router.gates.detach().double()))
    mask = router.experts_mask.bool()
    return scores, (scores > threshold) & mask


def _as_sets(indices: torch.Tensor, num_experts: int) -> list[set[int]]:
    return [{e for e in row if e != num_experts} for row in indices.tolist()]


def test_top_any_activates_experts_above_their_thresholds_with_uniform_weights():
    gates = torch.tensor([0.15, 0.1, 0.2, 0.12, 0.18, 0.14])
    router = _top_any_router(gates=gates).train()
    x = _tokens(num_tokens=300, seed=18)
    _, weights, indices = router(x)
    _, active = _top_any_reference(router, x)
    expected_sets = [set(torch.nonzero(row).flatten().tolist()) for row in active]
    assert _as_sets(indices, TOP_ANY_EXPERTS) == expected_sets
    sizes = [len(s) for s in expected_sets]
    assert min(sizes) == 0 and max(sizes) >= 3  # the inputs exercise empty and multi-expert tokens
    for token, expected in enumerate(expected_sets):
        for slot, expert in enumerate(indices[token].tolist()):
            want = 1.0 / len(expected) if expert != TOP_ANY_EXPERTS else 0.0
            assert weights[token, slot].item() == pytest.approx(want, abs=1e-7)


def test_top_any_eval_falls_back_to_argmax_but_training_routes_nowhere():
    gates = torch.full((TOP_ANY_EXPERTS,), 0.3)
    router = _top_any_router(gates=gates)
    x = _tokens(num_tokens=300, seed=19)
    scores, active = _top_any_reference(router, x)
    empty = ~active.any(-1)
    assert empty.sum() >= 10
    _, train_weights, train_indices = router.train()(x)
    assert (train_indices[empty] == TOP_ANY_EXPERTS).all()
    assert (train_weights[empty] == 0).all()
    _, eval_weights, eval_indices = router.eval()(x)
    eval_sets = _as_sets(eval_indices, TOP_ANY_EXPERTS)
    for token in range(x.shape[0]):
        if empty[token]:
            assert eval_sets[token] == {int(scores[token].argmax())}
            assert eval_weights[token].sum().item() == pytest.approx(1.0)
        else:
            assert eval_sets[token] == set(torch.nonzero(active[token]).flatten().tolist())


def test_top_any_straight_through_gradients_reach_sim_matrix_and_gates():
    gates = torch.tensor([0.15, 0.1, 0.2, 0.12, 0.18, 0.14])
    router = _top_any_router(gates=gates).train()
    x = _tokens(num_tokens=120, seed=20)
    _, weights, indices = router(x)
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(21))
    (weights * upstream).sum().backward()
    assert router.sim_matrix.grad is not None and router.sim_matrix.grad.abs().sum() > 0
    assert router.gates.grad is not None
    # Straight-through: d weight / d gate_value = 1 / K for active slots, and the gate value is
    # step(score - sigmoid(g)), so d loss / d g_e = -sigmoid'(g_e) * sum over tokens activating e of upstream / K.
    _, active = _top_any_reference(router, x)
    k = active.sum(-1).clamp_min(1).double()
    per_expert = torch.zeros(x.shape[0], TOP_ANY_EXPERTS + 1, dtype=torch.float64)
    per_expert.scatter_add_(1, indices, upstream.double())
    per_expert = per_expert[:, :TOP_ANY_EXPERTS] * active / k[:, None]
    s = torch.sigmoid(gates.double())
    expected = -(s * (1 - s)) * per_expert.sum(0)
    torch.testing.assert_close(router.gates.grad.double(), expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().min() > 0


def test_top_any_switched_off_slot_is_never_selected():
    # Very low thresholds: every switched-on slot fires for every token, switched-off slots never.
    router = _top_any_router(init_experts=3, gates=torch.full((TOP_ANY_EXPERTS,), -10.0))
    assert router.experts_mask.tolist() == [1, 1, 1, 0, 0, 0]
    x = _tokens(num_tokens=100, seed=22)
    for mode in (True, False):
        logits, _, indices = router.train(mode)(x)
        assert all(s == {0, 1, 2} for s in _as_sets(indices, TOP_ANY_EXPERTS))
        assert torch.isneginf(logits[:, 3:]).all() and torch.isfinite(logits[:, :3]).all()
    # Switching slot 1 off removes it even from the eval fallback.
    with torch.no_grad():
        router.experts_mask[1] = 0
        router.gates.fill_(10.0)  # nothing passes its threshold: eval falls back to the argmax
    _, _, indices = router.eval()(x)
    chosen = set().union(*_as_sets(indices, TOP_ANY_EXPERTS))
    assert chosen <= {0, 2} and chosen


# ---------------------------------------------------------------------------------------------------------------
# Dense-to-sparse (EvoMoE)
# ---------------------------------------------------------------------------------------------------------------


def _dense_to_sparse(threshold=0.05, **overrides) -> DenseToSparseRouter:
    options = {
        "router_type": "dense_to_sparse",
        "gumbel_tau_max": 2.0,
        "gumbel_tau_min": 0.5,
        "gumbel_tau_decay_steps": 100,
        "gumbel_selection_threshold": threshold,
    }
    options.update(overrides)
    return DenseToSparseRouter(_options(**options), HIDDEN)


@pytest.mark.parametrize("step", [0, 1, 10, 50, 99, 100, 101, 250, 10_000])
def test_dense_to_sparse_temperature_schedule(step):
    router = _dense_to_sparse()
    router.step.fill_(step)
    expected = max(2.0 * (0.5 / 2.0) ** (step / 100), 0.5)
    assert router.temperature == pytest.approx(expected, rel=1e-12)
    assert router.temperature >= 0.5


def test_dense_to_sparse_eval_selects_gates_above_threshold():
    router = _dense_to_sparse().eval()
    weight = _random_weight(router, seed=23, std=0.6)
    router.step.fill_(40)
    tau = 2.0 * 0.25**0.4
    x = _tokens(num_tokens=80, seed=24)
    _, weights, indices = router(x)
    assert router.step.item() == 40  # eval does not advance the schedule
    logits = (x.double() @ weight.double().t()) / tau
    gates = torch.exp(logits - logits.max(-1, keepdim=True).values)
    gates = gates / gates.sum(-1, keepdim=True)
    expected_sets = [set(torch.nonzero(row > 0.05).flatten().tolist()) for row in gates]
    assert _as_sets(indices, EXPERTS) == expected_sets
    assert len({len(s) for s in expected_sets}) > 1
    for token, row in enumerate(indices.tolist()):
        for slot, expert in enumerate(row):
            want = gates[token, expert].item() if expert != EXPERTS else 0.0
            assert weights[token, slot].item() == pytest.approx(want, abs=1e-6)


def test_dense_to_sparse_training_uses_gumbel_softmax_and_counts_steps(monkeypatch):
    router = _dense_to_sparse().train()
    _random_weight(router, seed=25, std=0.6)
    x = _tokens(num_tokens=80, seed=26)
    seen = []
    real_gumbel_softmax = F.gumbel_softmax

    def recording(logits, tau=1.0, hard=False, dim=-1, **kwargs):
        out = real_gumbel_softmax(logits, tau=tau, hard=hard, dim=dim, **kwargs)
        seen.append((tau, hard, out.detach().clone()))
        return out

    monkeypatch.setattr(F, "gumbel_softmax", recording)
    for call in range(3):
        expected_tau = max(2.0 * 0.25 ** (call / 100), 0.5)
        _, weights, indices = router(x)
        tau, hard, gates = seen[-1]
        assert tau == pytest.approx(expected_tau, rel=1e-12)
        assert hard is False
        assert router.step.item() == call + 1
        expected_sets = [set(torch.nonzero(row > 0.05).flatten().tolist()) for row in gates]
        assert _as_sets(indices, EXPERTS) == expected_sets
        picked = torch.where(indices < EXPERTS, indices, 0)
        torch.testing.assert_close(weights, torch.where(indices < EXPERTS, gates.gather(-1, picked), 0.0))
    router.eval()
    router(x)
    assert router.step.item() == 3 and len(seen) == 3  # no noise and no step at eval


# ---------------------------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing (selection bias)
# ---------------------------------------------------------------------------------------------------------------


def _skewed_router(router_type="sigmoid_topk", rate=0.01, top_k=2, **overrides):
    router = build_router(
        _options(router_type=router_type, num_experts_per_tok=top_k, router_bias_update_rate=rate, **overrides),
        HIDDEN,
    )
    weight = _random_weight(router, seed=27, std=0.3)
    with torch.no_grad():
        router.weight[0, 0] = 3.0  # expert 0 wins for most tokens
    x = _tokens(num_tokens=256, seed=28)
    x[:, 0] += 1.0
    return router, weight, x


def _load(router, x) -> torch.Tensor:
    was_training = router.training
    _, _, indices = router.eval()(x)
    router.train(was_training)
    flat = indices.reshape(-1)
    return torch.bincount(flat[flat < router.num_experts], minlength=router.num_experts).float()


@pytest.mark.parametrize("top_k", [1, 2])
def test_selection_bias_update_balances_a_skewed_load(top_k):
    router, _, x = _skewed_router(top_k=top_k)
    before = _load(router, x)
    assert before[0] > 2.5 * before[1:].max()  # really skewed towards expert 0
    router.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 200 tiny matmuls: thread start-up would dominate on a busy machine
    try:
        for _ in range(200):
            router(x)
            router.update_bias()
    finally:
        torch.set_num_threads(threads)
    after = _load(router, x)
    assert after.sum() == before.sum()
    assert after.std() < 0.2 * before.std()
    assert after.max() / after.min() < 1.6
    assert router.selection_bias[0] < 0  # the overloaded expert was pushed down


def test_one_bias_update_step_is_u_times_sign_of_mean_minus_load():
    router, _, x = _skewed_router(router_type="bias_balanced", rate=0.0)
    assert router.bias_update_rate == 1e-3  # bias_balanced switches the update on by default
    start = torch.tensor([0.01, -0.02, 0.0, 0.03, 0.0, -0.01, 0.02, 0.0])
    with torch.no_grad():
        router.selection_bias.copy_(start)
    router.train()
    loads = torch.zeros(EXPERTS)
    for chunk in x.split(64):  # several forwards accumulate before one update
        _, _, indices = router(chunk)
        loads += torch.bincount(indices.reshape(-1), minlength=EXPERTS).float()
    router.update_bias()
    expected = start + 1e-3 * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(router.selection_bias, expected, atol=1e-7, rtol=0)
    assert (router.pending_load == 0).all()
    # Eval forwards record nothing, so a second update without training moves nothing.
    router.eval()(x)
    router.update_bias()
    torch.testing.assert_close(router.selection_bias, expected, atol=0, rtol=0)


@pytest.mark.parametrize("router_type", ["sigmoid_topk", "softmax_topk"])
def test_selection_bias_changes_choice_but_never_the_weights(router_type):
    scaling = 1.7
    router, weight, x = _skewed_router(router_type=router_type, routed_scaling_factor=scaling)
    router.eval()
    _, _, unbiased_indices = router(x)
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 0.0, 0.0, 0.3, 0.0, 0.0]))
    _, weights, indices = router(x)
    assert (indices.sort(-1).values != unbiased_indices.sort(-1).values).any(-1).float().mean() > 0.5
    logits = x @ weight.t()
    scores = torch.sigmoid(logits) if router_type == "sigmoid_topk" else torch.softmax(logits, dim=-1)
    chosen = scores.gather(-1, indices)  # gathered from the unbiased scores
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * scaling, atol=1e-6, rtol=0)


def test_update_selection_biases_updates_every_router_in_a_model():
    torch.manual_seed(29)
    model = torch.nn.ModuleDict(
        {
            "a": build_router(_options(router_type="bias_balanced"), HIDDEN),
            "b": build_router(_options(router_type="sigmoid_topk", router_bias_update_rate=0.05), HIDDEN),
            "c": torch.nn.Sequential(build_router(_options(router_type="top_p", router_bias_update_rate=0.02), HIDDEN)),
            "off": build_router(_options(router_type="sigmoid_topk"), HIDDEN),
        }
    )
    routers = {"a": model["a"], "b": model["b"], "c": model["c"][0], "off": model["off"]}
    rates = {"a": 1e-3, "b": 0.05, "c": 0.02, "off": 0.0}
    x = _tokens(num_tokens=128, seed=30)
    model.train()
    expected = {}
    for name, router in routers.items():
        _random_weight(router, seed=31 + len(name), std=0.8)
        _, _, indices = router(x)
        flat = indices.reshape(-1)
        load = torch.bincount(flat[flat < EXPERTS], minlength=EXPERTS).float()
        expected[name] = rates[name] * torch.sign(load.mean() - load)
    update_selection_biases(model)
    for name, router in routers.items():
        torch.testing.assert_close(router.selection_bias, expected[name], atol=1e-7, rtol=0)
        assert (router.selection_bias != 0).any() == (name != "off")


def test_half_precision_cast_keeps_balancing_state_fp32():
    from transformers import PreTrainedConfig

    from moe_zoo.core import MoeOptions, build_router

    class Config(PreTrainedConfig, MoeOptions):
        model_type = "moe_zoo_test_router_cast"

    router = build_router(Config(router_type="bias_balanced"), 8)
    router.selection_bias.fill_(0.5 + 1e-3)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.selection_bias.dtype == torch.float32
    assert router.selection_bias[0] == torch.tensor(0.5 + 1e-3, dtype=torch.float32)
    assert router.pending_load.dtype == torch.float32


def test_gumbel_second_expert_refuses_a_selection_bias():
    from transformers import LlamaConfig

    from moe_zoo import UpcycledMoeConfig

    with pytest.raises(ValueError, match="router_second_expert_gumbel"):
        UpcycledMoeConfig(
            text_config=LlamaConfig(num_hidden_layers=2),
            router_second_expert_gumbel=True,
            router_bias_update_rate=1e-3,
        )


def test_router_materialises_from_meta():
    from transformers import PreTrainedConfig

    from moe_zoo.core import MoeOptions, build_router

    class Config(PreTrainedConfig, MoeOptions):
        model_type = "moe_zoo_test_router_meta"

    with torch.device("meta"):
        router = build_router(Config(router_type="bias_balanced"), 8)
    router.to_empty(device="cpu")
    assert router.selection_bias.device.type == "cpu" and router.selection_bias.dtype == torch.float32
