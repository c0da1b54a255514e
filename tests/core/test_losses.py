"""Router losses against transformers' ``load_balancing_loss_func``, the original MoE-LLaVA/DeepSpeed fixtures and
formulas written out independently here; plus the MoE config validation messages."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moe_zoo
from moe_zoo.core import (
    AUX_LOSS_TYPES,
    MOE_LAYER_MODES,
    ROUTER_TYPES,
    LayerRouting,
    MoeOptions,
    TopAnyRouter,
    TopKRouter,
    dynmoe_diverse_simple_loss,
    gshard_load_balancing_loss,
    router_aux_loss,
    router_entropy_loss,
    router_z_loss,
    switch_load_balancing_loss,
)

VARIANTS = ["stablelm", "phi", "qwen1_5"]
BATCH, SEQ, EXPERTS = 4, 10, 6


def _layer_logits(num_layers: int = 3, seed: int = 0, scale: float = 1.5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH * SEQ, EXPERTS, generator=g) * scale for _ in range(num_layers)]


def _attention_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for row, length in enumerate([10, 7, 4, 9]):  # right padding
        mask[row, length:] = 0
    return mask


# --- independent formulas (plain Python / float64), no moe_zoo code -------------------------------------------


def _probs(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _gshard_reference(logits: torch.Tensor, mask: list[float] | None = None) -> float:
    """GShard / DeepSpeed top-1 loss: E^2 * mean_e(me_e * ce_e) over the (unmasked) tokens."""
    rows = logits.double().tolist()
    mask = mask or [1.0] * len(rows)
    num_experts, count = len(rows[0]), sum(mask)
    me, ce = [0.0] * num_experts, [0.0] * num_experts
    for row, m in zip(rows, mask, strict=True):
        probs = _probs(row)
        for e in range(num_experts):
            me[e] += m * probs[e] / count
        ce[max(range(num_experts), key=lambda e: row[e])] += m / count
    return num_experts * num_experts * sum(a * b for a, b in zip(me, ce, strict=True)) / num_experts


def _z_reference(logits: torch.Tensor, mask: list[float] | None = None) -> float:
    rows = logits.double().tolist()
    mask = mask or [1.0] * len(rows)
    values = [math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows]
    return sum(v * m for v, m in zip(values, mask, strict=True)) / sum(mask)


def _entropy_reference(logits: torch.Tensor, mask: list[float] | None = None) -> float:
    rows = logits.double().tolist()
    mask = mask or [1.0] * len(rows)
    values = [-sum(p * math.log(p) for p in _probs(row)) for row in rows]
    return sum(v * m for v, m in zip(values, mask, strict=True)) / sum(mask)


def _dynmoe_reference(sim_matrix: torch.Tensor, experts_mask: torch.Tensor) -> float:
    """sqrt(sum over active pairs (cos(w_i, w_j) - [i == j])^2) + mean over all columns of ||w_e||."""
    columns = sim_matrix.double().t().tolist()
    active = [bool(m) for m in experts_mask.tolist()]
    norms = [math.sqrt(sum(v * v for v in c)) for c in columns]
    squared = 0.0
    for i, ci in enumerate(columns):
        for j, cj in enumerate(columns):
            if active[i] and active[j]:
                cosine = sum(a * b for a, b in zip(ci, cj, strict=True)) / (norms[i] * norms[j])
                squared += (cosine - (1.0 if i == j else 0.0)) ** 2
    return math.sqrt(squared) + sum(norms) / len(norms)


# ---------------------------------------------------------------------------------------------------------------
# Switch load balancing vs transformers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_switch_loss_matches_transformers(top_k, num_layers, masked):
    logits = _layer_logits(num_layers, seed=top_k + 10 * num_layers)
    attention_mask = _attention_mask() if masked else None
    expected = load_balancing_loss_func(tuple(logits), EXPERTS, top_k, attention_mask)
    token_mask = attention_mask.reshape(-1) if masked else None
    got = switch_load_balancing_loss(logits, EXPERTS, top_k, token_mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    if masked:  # the mask matters for these inputs
        unmasked = load_balancing_loss_func(tuple(logits), EXPERTS, top_k, None)
        assert (unmasked - expected).abs() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# GShard loss vs the original MoE-LLaVA + DeepSpeed fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["router_logits.pt", "router_logits_capacity_drop.pt"])
def test_gshard_loss_matches_original_l_aux(moe_llava_fixtures, variant, name):
    data = torch.load(moe_llava_fixtures / variant / name, weights_only=True)
    assert data["moe_layers_idx"] == [0, 2]
    for layer in data["moe_layers_idx"]:
        got = gshard_load_balancing_loss(data["router_logits"][layer])
        torch.testing.assert_close(got, torch.as_tensor(data["l_aux"][layer], dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_loss_is_coef_times_sum_of_layer_losses(moe_llava_fixtures, variant):
    data = torch.load(moe_llava_fixtures / variant / "router_logits.pt", weights_only=True)
    moe_loss = torch.load(moe_llava_fixtures / variant / "intermediates.pt", weights_only=True)["moe_loss"]
    layers = [data["router_logits"][layer] for layer in data["moe_layers_idx"]]
    direct = 0.01 * sum(gshard_load_balancing_loss(logits) for logits in layers)
    torch.testing.assert_close(direct, moe_loss.float(), atol=1e-7, rtol=1e-6)
    # The same through router_aux_loss with MoE-LLaVA's options.
    config = MoeOptions(
        num_experts=4, num_experts_per_tok=2, aux_loss_type="gshard_top1_sum", router_aux_loss_coef=0.01
    )
    router = TopKRouter(config, 4)
    records = [LayerRouting(logits, torch.topk(logits, 2, dim=-1).indices, router) for logits in layers]
    torch.testing.assert_close(router_aux_loss(records, config), moe_loss.float(), atol=1e-7, rtol=1e-6)


def test_gshard_loss_matches_independent_formula_with_mask():
    logits = _layer_logits(1, seed=40)[0]
    mask = _attention_mask().reshape(-1)
    got = gshard_load_balancing_loss(logits, mask)
    assert got.item() == pytest.approx(_gshard_reference(logits, mask.float().tolist()), rel=1e-5)
    assert got.item() != pytest.approx(_gshard_reference(logits), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Padding never counts
# ---------------------------------------------------------------------------------------------------------------


def _pad(logits: torch.Tensor, extra: int = 9, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    garbage = torch.randn(extra, logits.shape[1], generator=torch.Generator().manual_seed(seed)) * 20
    garbage[:, 0] += 30  # strongly favour one expert, so counting the rows would change every loss
    padded = torch.cat([logits, garbage])
    mask = torch.cat([torch.ones(logits.shape[0]), torch.zeros(extra)])
    return padded, mask


def test_padding_rows_never_change_any_loss():
    logits = _layer_logits(2, seed=50)
    padded, mask = zip(*(_pad(layer, seed=60 + i) for i, layer in enumerate(logits)), strict=True)
    mask = mask[0]
    losses = [
        lambda ls, m: switch_load_balancing_loss(ls, EXPERTS, 2, m),
        lambda ls, m: sum(gshard_load_balancing_loss(x, m) for x in ls),
        lambda ls, m: sum(router_z_loss(x, m) for x in ls),
        lambda ls, m: sum(router_entropy_loss(x, m) for x in ls),
    ]
    for loss in losses:
        clean = loss(logits, None)
        torch.testing.assert_close(loss(list(padded), mask), clean, atol=1e-6, rtol=1e-6)
        assert (loss(list(padded), None) - clean).abs() > 1e-3  # the garbage rows would change it
    config = MoeOptions(num_experts=EXPERTS, router_z_loss_coef=0.1, router_entropy_loss_coef=0.2)
    router = TopKRouter(config, 4)
    clean_records = [LayerRouting(x, torch.zeros(x.shape[0], 2, dtype=torch.long), router) for x in logits]
    padded_records = [LayerRouting(x, torch.zeros(x.shape[0], 2, dtype=torch.long), router) for x in padded]
    for aux_loss_type in AUX_LOSS_TYPES:
        config.aux_loss_type = aux_loss_type
        torch.testing.assert_close(
            router_aux_loss(padded_records, config, mask), router_aux_loss(clean_records, config), atol=1e-6, rtol=1e-6
        )


# ---------------------------------------------------------------------------------------------------------------
# z-loss, entropy, DynMoE
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_and_entropy_match_independent_formulas(masked):
    logits = _layer_logits(1, seed=70, scale=3.0)[0]
    mask = _attention_mask().reshape(-1) if masked else None
    mask_list = mask.float().tolist() if masked else None
    assert router_z_loss(logits, mask).item() == pytest.approx(_z_reference(logits, mask_list), rel=1e-5)
    assert router_entropy_loss(logits, mask).item() == pytest.approx(_entropy_reference(logits, mask_list), rel=1e-5)


def test_entropy_extremes():
    uniform = torch.zeros(5, EXPERTS)
    assert router_entropy_loss(uniform).item() == pytest.approx(math.log(EXPERTS), rel=1e-6)
    confident = torch.full((5, EXPERTS), -100.0)
    confident[:, 2] = 100.0
    assert router_entropy_loss(confident).item() == pytest.approx(0.0, abs=1e-6)


def test_dynmoe_loss_matches_independent_formula():
    sim_matrix = torch.randn(16, 6, generator=torch.Generator().manual_seed(80)) * 0.7
    experts_mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    got = dynmoe_diverse_simple_loss(sim_matrix, experts_mask)
    assert got.item() == pytest.approx(_dynmoe_reference(sim_matrix, experts_mask), rel=1e-5)


def test_dynmoe_loss_is_zero_diverse_for_orthonormal_active_columns():
    q, _ = torch.linalg.qr(torch.randn(16, 6, generator=torch.Generator().manual_seed(81)))
    sim_matrix = q * torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 0.5])  # scaling keeps the cosines
    sim_matrix[:, 4] = sim_matrix[:, 0] + sim_matrix[:, 1]  # an inactive slot, not orthogonal to the rest
    experts_mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    simple = sim_matrix.norm(dim=0).mean()
    torch.testing.assert_close(dynmoe_diverse_simple_loss(sim_matrix, experts_mask), simple, atol=1e-6, rtol=0)
    # Activating the non-orthogonal slot adds a diversity penalty.
    experts_mask[4] = 1.0
    assert dynmoe_diverse_simple_loss(sim_matrix, experts_mask) > simple + 0.5


# ---------------------------------------------------------------------------------------------------------------
# router_aux_loss: how a model combines the losses
# ---------------------------------------------------------------------------------------------------------------


def _top_any_record(seed: int) -> LayerRouting:
    torch.manual_seed(seed)
    router = TopAnyRouter(MoeOptions(num_experts=EXPERTS, router_type="top_any", top_any_init_experts=4), 16)
    with torch.no_grad():
        router.sim_matrix.add_(0.3 * torch.randn_like(router.sim_matrix))
    logits = torch.randn(BATCH * SEQ, EXPERTS).masked_fill(router.experts_mask == 0, float("-inf"))
    return LayerRouting(logits, torch.zeros(BATCH * SEQ, 1, dtype=torch.long), router)


@pytest.mark.parametrize("masked", [False, True])
def test_router_aux_loss_switch_combination(masked):
    config = MoeOptions(
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        router_z_loss_coef=0.001,
        router_entropy_loss_coef=0.003,
    )
    router = TopKRouter(config, 16)
    logits = _layer_logits(3, seed=90)
    records = [LayerRouting(x, torch.topk(x, 2, dim=-1).indices, router) for x in logits]
    top_any = [_top_any_record(91), _top_any_record(92)]
    attention_mask = _attention_mask() if masked else None
    token_mask = attention_mask.reshape(-1) if masked else None
    mask_list = token_mask.float().tolist() if masked else None
    balance = load_balancing_loss_func(tuple(logits), EXPERTS, 2, attention_mask).item()
    gate = sum(_dynmoe_reference(r.router.sim_matrix.detach(), r.router.experts_mask) for r in top_any)
    z = sum(_z_reference(x, mask_list) for x in logits) / 3
    entropy = sum(_entropy_reference(x, mask_list) for x in logits) / 3
    expected = 0.02 * balance + 0.02 * gate + 0.001 * z + 0.003 * entropy
    got = router_aux_loss(records[:2] + top_any[:1] + records[2:] + top_any[1:], config, token_mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Only ranked routers: no gate loss.
    expected_ranked = 0.02 * balance + 0.001 * z + 0.003 * entropy
    assert router_aux_loss(records, config, token_mask).item() == pytest.approx(expected_ranked, rel=1e-5)


def test_router_aux_loss_gshard_sums_layers_and_handles_empty_and_zero_coefficients():
    config = MoeOptions(num_experts=EXPERTS, aux_loss_type="gshard_top1_sum", router_aux_loss_coef=0.05)
    router = TopKRouter(config, 16)
    logits = _layer_logits(3, seed=95)
    records = [LayerRouting(x, torch.topk(x, 2, dim=-1).indices, router) for x in logits]
    expected = 0.05 * sum(_gshard_reference(x) for x in logits)
    assert router_aux_loss(records, config).item() == pytest.approx(expected, rel=1e-5)
    assert router_aux_loss([], config) is None
    config.router_aux_loss_coef = 0.0
    assert router_aux_loss(records, config).item() == 0.0


def _heterogeneous_reference(logits: list[torch.Tensor], top_k: int, eta: list[float]) -> float:
    """MoE++'s heterogeneous balance loss: E * sum_i eta_i f_i P_i, all layers' tokens pooled (float64 Python)."""
    rows = [row for layer in logits for row in layer.double().tolist()]
    slots = len(rows[0])
    f, p = [0.0] * slots, [0.0] * slots
    for row in rows:
        probs = _probs(row)
        for e in sorted(range(slots), key=lambda e: -probs[e])[:top_k]:
            f[e] += 1 / len(rows)
        for e in range(slots):
            p[e] += probs[e] / len(rows)
    return slots * sum(eta[e] * f[e] * p[e] for e in range(slots))


@pytest.mark.parametrize("aux_loss_type", AUX_LOSS_TYPES)
def test_moe_plus_plus_heterogeneous_loss_weighs_zero_computation_slots_by_tau(aux_loss_type):
    """Slots [4 FFN | 1 copy | 1 zero | 1 null]: copy and zero weigh tau, FFN and null experts 1."""
    options = dict(num_experts=4, num_copy_experts=1, num_zero_experts=1, num_null_experts=1, num_experts_per_tok=2)
    plain = MoeOptions(**options, aux_loss_type=aux_loss_type, router_aux_loss_coef=1.0)
    cheap = MoeOptions(
        **options, aux_loss_type=aux_loss_type, router_aux_loss_coef=1.0, zero_computation_loss_weight=0.3
    )
    router = TopKRouter(plain, 16)
    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(BATCH * SEQ, 7, generator=g) * 1.5 for _ in range(2)]
    records = [LayerRouting(x, torch.topk(x, 2, dim=-1).indices, router) for x in logits]
    eta = [1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 1.0]
    if aux_loss_type == "switch_topk_mean":
        expected = _heterogeneous_reference(logits, 2, eta)
        assert router_aux_loss(records, plain).item() == pytest.approx(_heterogeneous_reference(logits, 2, [1.0] * 7))
    else:  # GShard: per layer, first choices, E^2 * mean(eta * me * ce), summed over layers
        expected = sum(_gshard_weighted(x, eta) for x in logits)
        assert router_aux_loss(records, plain).item() == pytest.approx(sum(_gshard_reference(x) for x in logits))
    assert router_aux_loss(records, cheap).item() == pytest.approx(expected, rel=1e-5)
    assert router_aux_loss(records, cheap).item() < router_aux_loss(records, plain).item()


def _gshard_weighted(logits: torch.Tensor, eta: list[float]) -> float:
    rows = logits.double().tolist()
    slots = len(rows[0])
    me, ce = [0.0] * slots, [0.0] * slots
    for row in rows:
        probs = _probs(row)
        for e in range(slots):
            me[e] += probs[e] / len(rows)
        ce[max(range(slots), key=lambda e: row[e])] += 1 / len(rows)
    return slots * slots * sum(eta[e] * me[e] * ce[e] for e in range(slots)) / slots


# ---------------------------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------------------------


def _text_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def _names(values) -> str:
    return ".*".join(repr(v).replace("(", r"\(").replace(")", r"\)") for v in values)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"num_experts": 4, "num_experts_per_tok": 5}, r"`num_experts_per_tok` is 5.*\[1, 4\]"),
        ({"router_type": "expert_choice"}, r"`router_type` is 'expert_choice'.*" + _names(ROUTER_TYPES)),
        ({"capacity_factor": 0.0}, r"`capacity_factor` is 0\.0.*> 0"),
        ({"capacity_factor": -1.5}, r"`capacity_factor` is -1\.5.*> 0"),
        ({"moe_layers": [0, 4]}, r"`moe_layers` is \[0, 4\].*\[0, 3\]"),
        ({"moe_layers": [-1]}, r"`moe_layers` is \[-1\].*\[0, 3\]"),
        ({"aux_loss_type": "mixtral"}, r"`aux_loss_type` is 'mixtral'.*" + _names(AUX_LOSS_TYPES)),
        ({"moe_layers": "every_other"}, r"`moe_layers` is 'every_other'.*" + _names(MOE_LAYER_MODES)),
        ({"zero_computation_loss_weight": -0.5}, r"`zero_computation_loss_weight` is -0\.5.*>= 0"),
    ],
)
def test_config_validation_names_field_and_allowed_values(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        moe_zoo.UpcycledMoeConfig(text_config=_text_config(), **overrides)


def test_valid_config_is_accepted():
    config = moe_zoo.UpcycledMoeConfig(
        text_config=_text_config(), num_experts=4, num_experts_per_tok=4, moe_layers=[0, 3], capacity_factor=1.25
    )
    assert config.moe_layer_indices == [0, 3]
