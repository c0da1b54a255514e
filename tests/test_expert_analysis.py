"""Expert analysis and pruning (``moe_zoo.analysis``): the statistics are what their definitions say, EASY-EP keeps
the experts a domain uses and the pruned model keeps its outputs there, pruned checkpoints reload, plots are PNGs.

The domain test builds its own specialisation: a tiny upcycled Llama whose domain-A tokens carry a large component
along a direction ``u`` (domain B: along ``-u``) and whose routers score experts 0-3 along ``u`` and 4-7 along
``-u``, with distinct experts. Domain-A tokens then choose among experts 0-3 only, so pruning to those four must
leave domain A's logits unchanged (top-2 weights are renormalised: float rounding only, 1e-5) and change domain B's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig, PhiConfig

import moe_zoo
from moe_zoo.analysis import (
    block_statistics,
    collect_expert_statistics,
    easy_ep_prune,
    plot_expert_load,
    prune_experts,
    select_experts,
)

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
NUM_EXPERTS = 8
DOMAIN_A, DOMAIN_B = range(10, 50), range(50, 90)
SAME_LOGITS = dict(atol=1e-5, rtol=1e-5)


def _specialised_model():
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT, num_key_value_heads=2))
    moe = moe_zoo.upcycle(dense, num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_layers="all").eval()
    u = torch.nn.functional.normalize(torch.randn(TEXT["hidden_size"]), dim=0)
    with torch.no_grad():
        embeddings = moe.get_input_embeddings().weight
        embeddings[list(DOMAIN_A)] += u
        embeddings[list(DOMAIN_B)] -= u
        for block in moe.moe_blocks():
            block.gate.weight.copy_(0.3 * torch.randn_like(block.gate.weight))
            block.gate.weight[:4] += 8.0 * u
            block.gate.weight[4:] -= 8.0 * u
            for param in block.experts.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return moe


def _batches(domain: range, seed: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor(list(domain))
    return [
        {"input_ids": ids[torch.randint(len(ids), (2, 12), generator=generator)], "attention_mask": torch.ones(2, 12)}
        for _ in range(count)
    ]


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in batches])


def test_block_statistics_follow_their_definitions():
    """counts, gate mass and EASY-EP's importance, against a token-by-token computation of their definitions."""
    moe = _specialised_model()
    block = moe.moe_blocks()[1]
    x = torch.randn(20, TEXT["hidden_size"])
    keep = torch.ones(20, dtype=torch.bool)
    keep[[3, 7]] = False  # padding
    with torch.no_grad():
        output = block(x)
        counts, gate_mass, importance = block_statistics(block, x, output, keep, "contribution")
        _, weights, indices = block.route(x)
        expected = torch.zeros(3, NUM_EXPERTS, dtype=torch.float64)
        for t in keep.nonzero().flatten().tolist():
            contribution = 1 - torch.nn.functional.cosine_similarity(x[t], x[t] + output[t], dim=0)
            for slot in range(indices.shape[1]):
                e, g = int(indices[t, slot]), float(weights[t, slot])
                norm = block.experts.expert_forward(e, x[t : t + 1]).norm()
                expected[:, e] += torch.tensor([1.0, g, float(contribution) * g * float(norm)], dtype=torch.float64)
        uniform = block_statistics(block, x, output, keep, "uniform")[2]
    torch.testing.assert_close(counts, expected[0])
    torch.testing.assert_close(gate_mass, expected[1])
    torch.testing.assert_close(importance, expected[2], rtol=1e-5, atol=1e-7)
    assert counts.sum() == 2 * 18  # top-2 of the 18 real tokens
    assert not torch.allclose(uniform, importance)  # the token weights matter


def test_collected_statistics_count_every_real_token_and_skip_padding():
    moe = _specialised_model()
    batches = _batches(DOMAIN_A, seed=1)
    batches[0]["attention_mask"][:, 9:] = 0  # 6 padding tokens in the first batch
    stats = collect_expert_statistics(moe, batches, progress=False)
    assert stats.tokens == 3 * 24 - 6
    assert len(stats.layers) == TEXT["num_hidden_layers"]
    for layer in stats.layers:
        assert stats.counts[layer].sum() == 2 * stats.tokens
        assert stats.load_share(layer).sum() == pytest.approx(1.0)
        # Domain A reaches experts 0-3 only, by construction of the routers.
        assert stats.counts[layer][4:].sum() == 0
        assert torch.equal(stats.importance[layer] > 0, stats.counts[layer] > 0)
    assert moe.training is False


def test_easy_ep_keeps_the_domains_experts_and_its_outputs():
    moe = _specialised_model()
    held_out_a, held_out_b = _batches(DOMAIN_A, seed=7), _batches(DOMAIN_B, seed=8)
    before_a, before_b = _logits(moe, held_out_a), _logits(moe, held_out_b)
    pruned, stats, keep = easy_ep_prune(moe, _batches(DOMAIN_A, seed=1), num_keep=4, progress=False)
    assert all(kept == [0, 1, 2, 3] for kept in keep.values()), keep
    assert pruned.config.num_experts == 4
    for block in pruned.moe_blocks():
        assert block.experts.gate_up_proj.shape[0] == 4 and block.gate.weight.shape[0] == 4
    torch.testing.assert_close(_logits(pruned, held_out_a), before_a, **SAME_LOGITS)
    # The other domain lost the experts it used: its outputs change (the pruning was real).
    assert (_logits(pruned, held_out_b) - before_b).abs().max() > 1e-2


def test_importance_weighs_what_an_expert_outputs_not_only_how_often_it_is_chosen():
    """An expert chosen as often as the others but whose output is ~0 ranks last by importance, not by counts."""
    moe = _specialised_model()
    with torch.no_grad():
        for block in moe.moe_blocks():
            block.experts.down_proj[0] *= 1e-4
    stats = collect_expert_statistics(moe, _batches(DOMAIN_A, seed=1), progress=False)
    chosen = [layer for layer in stats.layers if stats.counts[layer][0] > 0]
    assert chosen
    for layer in chosen:
        counts, importance = stats.counts[layer], stats.importance[layer]
        others = [e for e in range(1, NUM_EXPERTS) if counts[e] > 0]
        assert importance[0] < 1e-3 * min(importance[e] for e in others)
    # Where expert 0 is chosen as often as the busiest expert, counts keep it first; importance never does.
    busiest = [layer for layer in chosen if stats.counts[layer][0] == stats.counts[layer].max()]
    assert busiest
    by_counts, by_importance = select_experts(stats, 1, "counts"), select_experts(stats, 1, "importance")
    assert all(by_counts[layer] == [0] for layer in busiest)
    assert all(by_importance[layer] != [0] for layer in stats.layers)


def test_a_pruned_checkpoint_reloads_smaller_with_the_same_logits(tmp_path):
    moe = _specialised_model()
    batches = _batches(DOMAIN_A, seed=7)
    moe.save_pretrained(tmp_path / "full")
    prune_experts(moe, {name: [0, 2, 5] for name, m in moe.named_modules() if m in moe.moe_blocks()})
    moe.save_pretrained(tmp_path / "pruned")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.num_experts == 3
    torch.testing.assert_close(_logits(reloaded.eval(), batches), _logits(moe, batches), atol=0, rtol=0)
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("full", "pruned")}
    assert size["pruned"] < size["full"]


def test_pruning_a_moe_llava_keeps_its_vision_path_and_reloads(tmp_path):
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = moe_zoo.MoeLlavaConfig(
        vision_config=vision, text_config=PhiConfig(**TEXT), moe_layers="none", image_token_id=90
    )
    torch.manual_seed(0)
    moe = moe_zoo.upcycle_moe_llava(moe_zoo.MoeLlavaForConditionalGeneration(config), num_experts=4).eval()
    ids = torch.cat([torch.full((1, 4), 90), torch.randint(3, 80, (1, 6))], dim=1)
    pixels = torch.randn(1, 3, 16, 16)
    stats = collect_expert_statistics(moe, [{"input_ids": ids, "pixel_values": pixels}], progress=False)
    assert stats.tokens == ids.numel() and len(stats.layers) == len(moe.moe_blocks())
    prune_experts(moe, select_experts(stats, 2, "gate_mass"))
    moe.save_pretrained(tmp_path / "pruned")
    reloaded = type(moe).from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_experts == 2 and reloaded.config.num_experts_per_tok == 2
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixels).logits, moe(input_ids=ids, pixel_values=pixels).logits
        )


def test_expert_load_plot_is_a_png(tmp_path):
    moe = _specialised_model()
    stats = collect_expert_statistics(moe, _batches(DOMAIN_A, seed=1), progress=False)
    path = plot_expert_load(stats, tmp_path / "load.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    stats.save_json(tmp_path / "stats.json")
    assert (tmp_path / "stats.json").read_text().count('"importance"') == TEXT["num_hidden_layers"]


def test_bad_pruning_requests_are_refused_clearly():
    moe = _specialised_model()
    names = [name for name, m in moe.named_modules() if m in moe.moe_blocks()]
    with pytest.raises(ValueError, match="same number of experts"):
        prune_experts(moe, {name: [0, 1] if i else [0, 1, 2] for i, name in enumerate(names)})
    with pytest.raises(ValueError, match="missing"):
        prune_experts(moe, {names[0]: [0, 1]})
    with pytest.raises(ValueError, match="distinct indices in 0..7"):
        prune_experts(moe, {name: [0, 8] for name in names})
    stats = collect_expert_statistics(moe, _batches(DOMAIN_A, seed=1), progress=False)
    with pytest.raises(ValueError, match="num_keep must be between 1 and the 8"):
        select_experts(stats, 9)
    with pytest.raises(ValueError, match="criterion must be one of"):
        select_experts(stats, 2, "popularity")
    with pytest.raises(ValueError, match="token_weighting"):
        collect_expert_statistics(moe, [], token_weighting="entropy")
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**TEXT, num_key_value_heads=2))
    dynmoe = moe_zoo.upcycle(dense, num_experts=4, router_type="top_any")
    with pytest.raises(ValueError, match="linear router"):
        prune_experts(dynmoe, {name: [0, 1] for name, m in dynmoe.named_modules() if m in dynmoe.moe_blocks()})
    with pytest.raises(ValueError, match="no moe_zoo MoE block"):
        collect_expert_statistics(dense, [])
