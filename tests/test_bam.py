"""BAM (``moe_zoo.bam_upcycle``): FFN experts and soft Mixture-of-Attention experts from several dense seeds.

Checked: with identical seeds the MoE computes the seed's function (both key-value variants, a parallel Phi block
and a sequential Llama one); with distinct seeds each attention layer equals ``sum_n w_n Attn_n(x)`` of the seeds'
own attention modules (their keys and values averaged in the shared variant), FFN expert ``n`` is seed ``n``'s FFN
and the rest is the seeds' mean; cached generation equals uncached; the checkpoint reloads with its logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig, Qwen3Config

import moe_zoo
from moe_zoo.core.mixture_of_attention import SoftMixtureOfAttention

TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IDS = torch.arange(3, 27).reshape(2, 12)
SAME = dict(atol=1e-5, rtol=1e-5)


def _seeds(config_class=PhiConfig, count: int = 3, distinct: bool = True) -> list:
    torch.manual_seed(0)
    seed = AutoModelForCausalLM.from_config(config_class(**TEXT)).eval()
    seeds = [copy.deepcopy(seed) for _ in range(count)]
    if distinct:  # "branched and trained further": each copy moved on its own
        for index, other in enumerate(seeds[1:], start=1):
            torch.manual_seed(index)
            with torch.no_grad():
                for param in other.parameters():
                    param.add_(0.05 * torch.randn_like(param))
    return seeds


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("config_class", [PhiConfig, LlamaConfig])
def test_identical_seeds_give_the_seed_function(config_class, share_kv):
    seeds = _seeds(config_class, distinct=False)
    torch.manual_seed(5)
    bam = moe_zoo.bam_upcycle(seeds, share_kv=share_kv, router_init_std=0.5).eval()
    assert bam.config.num_experts == bam.config.num_attention_experts == 3
    assert all(isinstance(layer.self_attn, SoftMixtureOfAttention) for layer in bam.model.layers)
    torch.testing.assert_close(_logits(bam), _logits(seeds[0]), **SAME)


@pytest.mark.parametrize("share_kv", [False, True])
def test_each_attention_layer_is_the_weighted_sum_of_the_seeds_attention(share_kv):
    seeds = _seeds()
    torch.manual_seed(5)
    bam = moe_zoo.bam_upcycle(seeds, share_kv=share_kv, router_init_std=0.5).eval()
    x = torch.randn(2, 12, TEXT["hidden_size"])
    positions = torch.arange(12)[None].expand(2, -1)
    embeddings = bam.model.rotary_emb(x, positions)
    for index, layer in enumerate(bam.model.layers):
        experts = [copy.deepcopy(seed.model.layers[index].self_attn) for seed in seeds]
        if share_kv:  # the shared variant uses the seeds' mean key and value projections
            for name in ("k_proj", "v_proj"):
                mean = {
                    k: torch.stack([getattr(e, name).state_dict()[k] for e in experts]).mean(0)
                    for k in ("weight", "bias")
                }
                for expert in experts:
                    getattr(expert, name).load_state_dict(mean)
        with torch.no_grad():
            weights = layer.self_attn.routing_weights(x)
            expected = sum(weights[..., n, None] * e(x, embeddings, None)[0] for n, e in enumerate(experts))
            got = layer.self_attn(x, position_embeddings=embeddings, attention_mask=None)[0]
        torch.testing.assert_close(got, expected, **SAME)
        assert weights.std(-1).mean() > 0.01  # the router really mixes the experts differently per token
        # FFN expert n is seed n's FFN; the norms are the seeds' mean.
        bank = layer.mlp.experts
        for n, seed in enumerate(seeds):
            torch.testing.assert_close(bank.up_proj[n], seed.model.layers[index].mlp.fc1.weight, atol=0, rtol=0)
        mean_norm = torch.stack([s.model.layers[index].input_layernorm.weight for s in seeds]).mean(0)
        torch.testing.assert_close(layer.input_layernorm.weight, mean_norm)


def test_cached_generation_and_the_checkpoint(tmp_path):
    torch.manual_seed(5)
    bam = moe_zoo.bam_upcycle(_seeds(), share_kv=False, router_init_std=0.5).eval()
    prompt = IDS[:, :5]
    cached = bam.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = bam.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    bam.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(_logits(reloaded.eval()), _logits(bam), atol=0, rtol=0)
    assert reloaded.config.attention_experts_share_kv is False


def test_bad_seeds_are_refused():
    with pytest.raises(ValueError, match="at least 2 seed models"):
        moe_zoo.bam_upcycle(_seeds(count=1))
    phi, llama = _seeds(PhiConfig, count=1)[0], _seeds(LlamaConfig, count=1)[0]
    with pytest.raises(ValueError, match="BAM needs copies"):
        moe_zoo.bam_upcycle([phi, llama])
    torch.manual_seed(0)
    wider = AutoModelForCausalLM.from_config(PhiConfig(**{**TEXT, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="parameters and shapes"):
        moe_zoo.bam_upcycle([phi, wider])
    torch.manual_seed(0)
    qwen3 = [AutoModelForCausalLM.from_config(Qwen3Config(**TEXT, head_dim=8)) for _ in range(2)]
    with pytest.raises(ValueError, match="per-head query/key norms"):
        moe_zoo.bam_upcycle(qwen3)
    with pytest.raises(ValueError, match="use moe_zoo.bam_upcycle"):
        moe_zoo.upcycle(phi, num_attention_experts=2)


def test_the_checkpoint_carries_its_attention_experts_code(tmp_path):
    """Loaded with ``trust_remote_code=True`` in a process where moe_zoo cannot be imported, with the same logits."""
    from tests.remote_loading import load_in_fresh_process, save_reference

    torch.manual_seed(5)
    bam = moe_zoo.bam_upcycle(_seeds(), share_kv=True, router_init_std=0.5).eval()
    bam.save_pretrained(tmp_path / "bam")
    assert (tmp_path / "bam" / "mixture_of_attention.py").is_file()
    save_reference(bam, {"input_ids": IDS}, tmp_path / "bam.pt")
    item = {"source": tmp_path / "bam", "auto": "AutoModelForCausalLM", "reference": tmp_path / "bam.pt"}
    results = load_in_fresh_process([item], tmp_path)
    assert results.pop("moe_zoo_imported") is False
    result = results[str(tmp_path / "bam")]
    assert result["module"].startswith("transformers_modules.") and result["equal"], result
