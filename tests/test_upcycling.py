"""Upcycling dense HF decoders into UpcycledMoeForCausalLM: function-preserving, saves, reloads, trains."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
)

import moe_zoo
from moe_zoo.core import SparseMoeBlock

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
BACKBONES = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2),
    "phi": lambda: PhiConfig(**COMMON),
    "phi3": lambda: Phi3Config(**COMMON),
    "stablelm": lambda: StableLmConfig(**COMMON, num_key_value_heads=4),
}


def _dense(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(BACKBONES[name]()).eval()


def _ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("moe_layers", ["all", "sparse"])
def test_upcycling_is_function_preserving(backbone, moe_layers):
    dense = _dense(backbone)
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_layers=moe_layers)
    blocks = moe.moe_blocks()
    assert len(blocks) == (4 if moe_layers == "all" else 2)
    assert moe_zoo.max_logit_difference(dense, moe, _ids()) <= 1e-5
    # Changing one expert afterwards changes the function: the comparison above can fail.
    with torch.no_grad():
        weight = blocks[0].experts.down_proj
        weight[: blocks[0].num_experts].add_(torch.randn_like(weight) * 0.5)
    assert moe_zoo.max_logit_difference(dense, moe, _ids()) > 1e-3


@pytest.mark.parametrize("backbone", ["llama", "phi", "qwen2"])
def test_save_and_reload_with_auto_class(tmp_path, backbone):
    moe = moe_zoo.upcycle(_dense(backbone), num_experts=3, num_experts_per_tok=2, moe_layers=[1, 3]).eval()
    with torch.no_grad():  # make the experts differ, so a wrong reload would show
        for block in moe.moe_blocks():
            for p in block.experts.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is moe_zoo.UpcycledMoeForCausalLM
    assert reloaded.config.moe_layer_indices == [1, 3]
    assert moe_zoo.max_logit_difference(moe, reloaded, _ids()) == 0.0
    if moe.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_experts_implementation_selectable_on_load(tmp_path, implementation):
    moe = moe_zoo.upcycle(_dense("llama"), num_experts=4, num_experts_per_tok=2)
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).eval()
    assert reloaded.config._experts_implementation == implementation
    assert moe_zoo.max_logit_difference(moe, reloaded, _ids()) <= 1e-5


def test_router_logits_aux_loss_and_training_step():
    moe = moe_zoo.upcycle(_dense("llama"), num_experts=4, num_experts_per_tok=2, moe_layers="sparse")
    moe.train()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    out = moe(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (ids.numel(), 4)
    lm_only = moe(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=False)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, lm_only.loss + out.aux_loss)
    expected = moe.config.router_aux_loss_coef * moe_zoo.core.switch_load_balancing_loss(
        out.router_logits, 4, 2, mask.reshape(-1)
    )
    torch.testing.assert_close(out.aux_loss, expected)
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    router_before = moe.moe_blocks()[0].gate.weight.detach().clone()
    losses = []
    for _ in range(5):
        loss = moe(input_ids=ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(moe.moe_blocks()[0].gate.weight, router_before)  # the router trained


def test_generation_matches_dense_model():
    dense = _dense("qwen3")
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2).eval()
    prompt = _ids(1, 6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(moe.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


def test_options_reach_every_block():
    moe = moe_zoo.upcycle(
        _dense("llama"), num_experts=6, num_experts_per_tok=1, router_type="top_p", top_p_threshold=0.5
    )
    assert all(block.gate.threshold == 0.5 and block.num_experts == 6 for block in moe.moe_blocks())


def test_unsupported_backbone_is_refused_clearly():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match="supported FFN layouts"):
        moe_zoo.upcycle(gpt2)


def test_bad_moe_options_are_refused_clearly():
    dense = _dense("llama")
    with pytest.raises(ValueError, match="moe_layers"):
        moe_zoo.upcycle(dense, moe_layers=[0, 7])
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moe_zoo.upcycle(dense, num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="router_type"):
        moe_zoo.upcycle(dense, router_type="top_k_please")


def test_moe_blocks_replace_only_the_chosen_ffns():
    moe = moe_zoo.upcycle(_dense("phi"), moe_layers="second_half")
    kinds = [isinstance(layer.mlp, SparseMoeBlock) for layer in moe.model.layers]
    assert kinds == [False, False, True, True]


def test_bf16_load_keeps_routers_in_fp32(tmp_path):
    moe_zoo.upcycle(_dense("llama"), num_experts=4, router_type="bias_balanced").save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    block = reloaded.moe_blocks()[0]
    assert block.gate.weight.dtype == torch.float32
    assert block.gate.selection_bias.dtype == torch.float32
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = reloaded(input_ids=_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = _ids()
    grads = []
    for checkpointing in (False, True):
        moe = moe_zoo.upcycle(_dense("llama"), num_experts=4, num_experts_per_tok=2)
        moe.train()
        if checkpointing:
            moe.gradient_checkpointing_enable()
        out = moe(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("mlp.gate.weight" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_routing_state_survives_reload_and_fresh_state_is_initialised(tmp_path):
    moe = moe_zoo.upcycle(_dense("llama"), num_experts=4, router_type="bias_balanced")
    gate = moe.moe_blocks()[0].gate
    assert torch.equal(gate.selection_bias, torch.zeros(4)) and torch.equal(gate.pending_load, torch.zeros(4))
    gate.selection_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).moe_blocks()[0].gate
    assert torch.equal(reloaded.selection_bias, gate.selection_bias)
    assert torch.equal(reloaded.weight, gate.weight)
    assert torch.equal(reloaded.pending_load, torch.zeros(4))  # not saved, so freshly zeroed


@pytest.mark.parametrize("router_type", ["top_any", "dense_to_sparse", "top_p"])
def test_upcycling_with_dynamic_routers_gives_fresh_routers(router_type):
    moe = moe_zoo.upcycle(_dense("qwen3"), num_experts=4, router_type=router_type, top_any_init_experts=2)
    gate = moe.moe_blocks()[0].gate
    if router_type == "top_any":
        torch.testing.assert_close(gate.sim_matrix.t() @ gate.sim_matrix, torch.eye(4), atol=1e-5, rtol=0)
        assert torch.equal(gate.gates, torch.zeros(4)) and gate.experts_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    elif router_type == "dense_to_sparse":
        assert gate.step.item() == 0 and gate.temperature == moe.config.gumbel_tau_max
    with torch.no_grad():
        logits = moe.eval()(input_ids=_ids()).logits
    assert torch.isfinite(logits).all()


def test_upcycled_shared_expert_is_a_copy_of_the_ffn():
    dense = _dense("llama")
    moe = moe_zoo.upcycle(dense, num_experts=4, num_shared_experts=1)
    x = torch.randn(5, COMMON["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(moe.moe_blocks()[1](x), 2 * dense.model.layers[1].mlp(x), atol=1e-5, rtol=1e-5)


def test_model_built_from_config_has_initialised_experts_and_routers():
    config = moe_zoo.UpcycledMoeConfig(text_config=BACKBONES["llama"](), num_experts=4, router_type="bias_balanced")
    torch.manual_seed(0)
    model = moe_zoo.UpcycledMoeForCausalLM(config)
    block = model.moe_blocks()[0]
    std = config.initializer_range
    for tensor in (block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight):
        assert abs(tensor.std().item() - std) < 0.25 * std  # normal(0, initializer_range), not leftover memory
    assert torch.equal(block.gate.selection_bias, torch.zeros(4)) and torch.equal(
        block.gate.pending_load, torch.zeros(4)
    )


def test_capacity_options_changed_on_a_loaded_model_take_effect():
    dense = _dense("llama")
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2).eval()
    assert moe_zoo.max_logit_difference(dense, moe, _ids()) <= 1e-5
    moe.config.eval_capacity_factor = 0.25  # capacity 3 of 22 tokens' 44 assignments per expert: tokens drop
    assert moe_zoo.max_logit_difference(dense, moe, _ids()) > 1e-3
    moe.config.eval_capacity_factor = None
    assert moe_zoo.max_logit_difference(dense, moe, _ids()) <= 1e-5
