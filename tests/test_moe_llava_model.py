"""MoE-LLaVA as a transformers model: stage-III upcycling preserves the function, saves/reloads, generates, and
works with every attention and experts implementation, gradient checkpointing and DynMoE's top-any gate."""

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    PhiConfig,
    Qwen2Config,
    StableLmConfig,
)

import moe_zoo

IMAGE_TOKEN = 300
# Every Linear is at least 64 wide: bitsandbytes' packed CPU 4-bit path (taken on CPUs with AVX512-BF16) quantizes
# in blocks of 64 input features and fails on a narrower layer.
VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
BACKBONES = {
    "phi": lambda: PhiConfig(**TEXT),
    "stablelm": lambda: StableLmConfig(**TEXT, num_key_value_heads=4),
    "qwen2": lambda: Qwen2Config(**TEXT, num_key_value_heads=2),
}


def _dense(backbone: str = "phi") -> moe_zoo.MoeLlavaForConditionalGeneration:
    config = moe_zoo.MoeLlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=BACKBONES[backbone](),
        moe_layers="none",
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
    )
    torch.manual_seed(0)
    return moe_zoo.MoeLlavaForConditionalGeneration(config).eval()


def _inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, 290, (batch, 6), generator=generator)
    ids = torch.cat([text[:, :2], torch.full((batch, 16), IMAGE_TOKEN), text[:, 2:]], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


def _moe(backbone: str = "phi", **options) -> moe_zoo.MoeLlavaForConditionalGeneration:
    moe = moe_zoo.upcycle_moe_llava(_dense(backbone), num_experts=4, num_experts_per_tok=2, **options).eval()
    with torch.no_grad():  # experts that differ, so that a wrong path shows
        for block in moe.moe_blocks():
            for p in block.experts.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return moe


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_stage3_upcycling_preserves_the_stage2_function(backbone):
    dense = _dense(backbone)
    moe = moe_zoo.upcycle_moe_llava(dense, num_experts=4, num_experts_per_tok=2, moe_layers="sparse")
    assert [i for i, layer in enumerate(moe.model.language_model.layers) if hasattr(layer.mlp, "gate")] == [0, 2]
    with torch.no_grad():
        reference = dense(**_inputs()).logits
        out = moe.eval()(**_inputs(), output_router_logits=True)
    assert (out.logits - reference).abs().max() <= 1e-5
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * 22, 4)
    assert out.aux_loss > 0
    with torch.no_grad():
        moe.moe_blocks()[0].experts.down_proj.mul_(1.5)
        assert (moe(**_inputs()).logits - reference).abs().max() > 1e-3


def test_save_reload_and_generate(tmp_path):
    moe = _moe()
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is moe_zoo.MoeLlavaForConditionalGeneration
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "MoeLlavaModel"
    with torch.no_grad():
        assert torch.equal(reloaded(**_inputs()).logits, moe(**_inputs()).logits)
    inputs = _inputs(1)
    # A random model may emit the image token, which the next step would count as a 17th image position.
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])
    with_cache = reloaded.generate(**inputs, **greedy)
    without_cache = reloaded.generate(**inputs, **greedy, use_cache=False)
    assert torch.equal(with_cache, without_cache) and with_cache.shape[1] == inputs["input_ids"].shape[1] + 6
    torch.manual_seed(0)
    sampled = reloaded.generate(
        **inputs, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN]
    )
    assert sampled.shape == with_cache.shape


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
def test_attention_and_experts_implementations_agree(attention, experts):
    moe = _moe("qwen2")
    with torch.no_grad():
        reference = moe(**_inputs()).logits
    moe.set_attn_implementation(attention)
    moe.set_experts_implementation(experts)
    with torch.no_grad():
        torch.testing.assert_close(moe(**_inputs()).logits, reference, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_and_training_loss():
    grads = []
    for checkpointing in (False, True):
        moe = _moe("stablelm").train()
        if checkpointing:
            moe.gradient_checkpointing_enable()
        inputs = _inputs()
        out = moe(**inputs, labels=inputs["input_ids"], output_router_logits=True)
        lm_only = moe(**inputs, labels=inputs["input_ids"], output_router_logits=False).loss
        torch.testing.assert_close(out.loss, lm_only + out.aux_loss)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None})
    assert any(".mlp.gate." in name for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gshard_aux_loss_is_the_originals_formula():
    moe = _moe(router_aux_loss_coef=0.01, aux_loss_type="gshard_top1_sum")
    with torch.no_grad():
        out = moe(**_inputs(), output_router_logits=True)
    expected = 0.0
    for logits in out.router_logits:  # DeepSpeed's l_aux = E^2 * mean(me * ce), first choices, summed over layers
        gates = torch.softmax(logits, dim=-1)
        first = torch.nn.functional.one_hot(gates.argmax(-1), 4).float()
        expected += 16 * torch.mean(gates.mean(0) * first.mean(0))
    torch.testing.assert_close(out.aux_loss, 0.01 * expected)


def test_dynmoe_variant_is_top_any_from_half_the_slots_and_preserves_the_function():
    dense = _dense("phi")
    moe = moe_zoo.upcycle_moe_llava(dense, num_experts=4, num_experts_per_tok=-1).eval()
    assert moe.config.router_type == "top_any" and moe.config.top_any_init_experts == 2
    assert moe.moe_blocks()[0].gate.experts_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    with torch.no_grad():  # identical experts, uniform weights over the active ones, argmax fallback at eval
        assert (moe(**_inputs()).logits - dense(**_inputs()).logits).abs().max() <= 1e-5


def test_bad_inputs_are_refused_clearly():
    moe = _moe()
    inputs = _inputs()
    too_few = {**inputs, "input_ids": inputs["input_ids"][:, 1:].clone()}
    too_few["input_ids"][:, 2] = 5  # one image token fewer than there are image features
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        moe(**too_few)
    with pytest.raises(ValueError, match=r"expects \(num_images, 3, 32, 32\)"):
        moe(**{**inputs, "pixel_values": torch.randn(2, 3, 48, 48)})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moe_zoo.upcycle_moe_llava(_dense(), num_experts=2, num_experts_per_tok=3)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_loading(tmp_path, bits):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    moe = _moe()
    moe.save_pretrained(tmp_path)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized = AutoModelForImageTextToText.from_pretrained(tmp_path, quantization_config=quantization).eval()
    expected = bitsandbytes.nn.Linear4bit if bits == 4 else bitsandbytes.nn.Linear8bitLt
    assert isinstance(quantized.model.language_model.layers[0].self_attn.q_proj, expected)
    assert quantized.get_memory_footprint() < moe.get_memory_footprint()
    with torch.no_grad():
        reference = moe(**_inputs()).logits.flatten()
        logits = quantized(**_inputs()).logits.flatten().float()
    assert torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack([logits, reference]))[0, 1] > 0.9


def test_device_map_auto(tmp_path):
    moe = _moe()
    moe.save_pretrained(tmp_path)
    placed = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto").eval()
    with torch.no_grad():
        assert torch.equal(placed(**_inputs()).logits, moe(**_inputs()).logits)
