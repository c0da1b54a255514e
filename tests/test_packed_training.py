"""Padding-free packed training (transformers' ``DataCollatorWithFlattening``) gives the same loss as padded training,
router loss included, also in a plain forward where ``config.use_cache`` is True (the cache pitfall: with a cache,
sdpa and eager attention ignore the packed positions and the sequences attend to each other)."""

import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

import moe_zoo

LENGTHS = (7, 12, 4)


def _sequences() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, 64, (length,), generator=generator).tolist() for length in LENGTHS]


def _padded(sequences: list[list[int]]) -> dict:
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _packed(sequences: list[list[int]]) -> dict:
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s} for s in sequences])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(map(len, sequences)))
    return batch


def _models():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    dense = LlamaForCausalLM(config)
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_layers="all")
    with torch.no_grad():  # experts that differ, and a router that routes the tokens differently
        for block in moe.moe_blocks():
            for param in (*block.experts.parameters(), block.gate.weight):
                param.add_(torch.randn_like(param) * 0.05)
    return dense, moe


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss_with_the_config_cache_default(attention):
    dense, moe = _models()
    moe.set_attn_implementation(attention)
    assert moe.config.get_text_config().use_cache  # the default that would build a cache
    moe.train()
    sequences = _sequences()
    padded = moe(**_padded(sequences), output_router_logits=True)
    packed = moe(**_packed(sequences), output_router_logits=True)
    assert packed.cache is None, "a packed batch builds no cache"
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.aux_loss, padded.aux_loss, atol=1e-6, rtol=1e-5)
    assert packed.aux_loss > 0
    packed.loss.backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    moe.zero_grad()
    padded.loss.backward()
    for name, param in moe.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_pitfall_is_real_without_the_guard():
    """transformers' dense Llama, given a cache on the same packed batch, attends across the sequences: its loss
    differs from the padded one. Our models refuse that combination instead."""
    dense, moe = _models()
    dense.train()
    sequences = _sequences()
    padded = dense(**_padded(sequences)).loss
    assert (dense(**_packed(sequences), use_cache=False).loss - padded).abs() < 1e-5
    assert (dense(**_packed(sequences), use_cache=True).loss - padded).abs() > 1e-4
    with pytest.raises(ValueError, match="packed sequences"):
        moe(**_packed(sequences), use_cache=True)


def test_generation_still_uses_the_cache():
    """The guard touches packed batches only: an ordinary prompt still decodes with a cache."""
    _, moe = _models()
    prompt = torch.tensor([_sequences()[1]])
    out = moe.eval()(prompt, use_cache=True)
    assert out.cache is not None
    cached = moe.generate(prompt, max_new_tokens=4, do_sample=False)
    uncached = moe.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_moe_llava_packed_image_conversations_equal_padded():
    """Two image conversations packed into one row (their images in order, positions restarting) train on the same
    loss as the padded batch: each sequence's image features land in its own image tokens."""
    from transformers import CLIPVisionConfig, PhiConfig

    image_token = 60
    config = moe_zoo.MoeLlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=PhiConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        moe_layers="all",
        image_token_id=image_token,
        image_seq_length=4,
    )
    torch.manual_seed(0)
    model = moe_zoo.MoeLlavaForConditionalGeneration(config).train()
    generator = torch.Generator().manual_seed(3)
    sequences = [
        [5, *[image_token] * 4, *torch.randint(1, 50, (length,), generator=generator).tolist()] for length in (3, 8)
    ]
    pixel_values = torch.randn(2, 3, 16, 16, generator=generator)
    padded = _padded(sequences)
    padded["labels"] = padded["labels"].masked_fill(padded["input_ids"] == image_token, -100)
    packed = _packed(sequences)
    packed["labels"] = packed["labels"].masked_fill(packed["input_ids"] == image_token, -100)
    padded_out = model(**padded, pixel_values=pixel_values, output_router_logits=True)
    packed_out = model(**packed, pixel_values=pixel_values, output_router_logits=True)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="packed sequences"):
        model(**packed, pixel_values=pixel_values, use_cache=True)
