"""flash_attention_2 through transformers' attention interface (skipped without CUDA and the flash-attn package):
MoE-LLaVA and an upcycled LM give the sdpa logits in bf16, and generate; packed training with its cu_seq_lens kwargs
gives the padded loss."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import moe_zoo

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_moe_llava_model import _inputs, _moe  # noqa: E402
from test_packed_training import _padded  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn (pip install .[flash])"
    ),
]


def _compare(model, inputs):
    model = model.cuda().to(torch.bfloat16).eval()
    inputs = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        reference = model(**inputs).logits.float()
        model.set_attn_implementation("flash_attention_2")
        flash = model(**inputs).logits.float()
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert (flash - reference).abs().max() <= 5e-2 * reference.abs().max()
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_moe_llava_with_flash_attention_2():
    _compare(_moe("qwen2"), _inputs(2))


def test_upcycled_lm_with_flash_attention_2():
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    moe = moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4, num_experts_per_tok=2)
    _compare(moe, {"input_ids": torch.randint(0, 128, (2, 16))})


def test_packed_training_with_flash_attention_equals_padded():
    """flash_attention_2 with DataCollatorWithFlattening's cu_seq_lens kwargs: the packed loss equals the padded
    sdpa loss (bf16 tolerance)."""
    from transformers import DataCollatorWithFlattening

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    moe = moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4, num_experts_per_tok=2)
    moe = moe.cuda().to(torch.bfloat16).train()
    sequences = [torch.randint(1, 128, (n,)).tolist() for n in (9, 17, 5)]
    packed = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(
        [{"input_ids": s} for s in sequences]
    )
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    padded = {key: value.cuda() for key, value in _padded(sequences).items()}
    moe.set_attn_implementation("sdpa")
    reference = moe(**padded).loss.float()
    moe.set_attn_implementation("flash_attention_2")
    flash = moe(**packed).loss.float()
    assert (flash - reference).abs() <= 2e-2 * reference.abs()
