"""GPU checks (skipped without CUDA): the experts implementations and upcycling on a CUDA device."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedConfig

import moe_zoo
from moe_zoo.core import MoeOptions, SparseMoeBlock

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class BlockConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_gpu_block"


def _eager_block(**options) -> tuple[BlockConfig, SparseMoeBlock]:
    config = BlockConfig(num_experts=8, num_experts_per_tok=2, **options)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = SparseMoeBlock(config, 64, 128, "silu")
    block.experts.reset_parameters(0.05)
    block.reset_routing(0.5)
    return config, block


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm", "moe_zoo"])
@pytest.mark.parametrize("router_type", ["softmax_topk", "top_p"])
def test_cuda_implementations_match_cpu_eager(implementation, router_type):
    config, block = _eager_block(router_type=router_type, top_p_threshold=0.6)
    x = torch.randn(4, 33, 64)
    with torch.no_grad():
        reference = block(x)
        config._experts_implementation = implementation
        cuda_block = block.cuda()
        out = cuda_block(x.cuda())
        out_bf16 = cuda_block.to(torch.bfloat16)(x.cuda().bfloat16())
    torch.testing.assert_close(out.cpu(), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_bf16.float().cpu(), reference, atol=5e-2, rtol=5e-2)


def test_upcycling_is_function_preserving_on_cuda():
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).cuda().eval()
    moe = moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2)
    assert next(moe.parameters()).is_cuda
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    assert moe_zoo.max_logit_difference(dense, moe, ids) <= 1e-4


def test_moe_zoo_experts_train_on_cuda_like_cpu_eager():
    """moe_zoo's experts (torch._grouped_mm on CUDA where it runs for the dtype) in fp32 and bf16: forward and
    backward against the CPU eager loop."""
    config, block = _eager_block()
    x = torch.randn(4, 33, 64)
    grad = torch.randn(4, 33, 64)
    inputs = x.clone().requires_grad_()
    block(inputs).backward(grad)
    expected = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    config._experts_implementation = "moe_zoo"
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        cuda_block = block.cuda().to(dtype)
        cuda_inputs = x.cuda().to(dtype).requires_grad_()
        cuda_block(cuda_inputs).backward(grad.cuda().to(dtype))
        torch.testing.assert_close(cuda_inputs.grad.float().cpu(), inputs.grad, atol=tol, rtol=tol)
        for name, param in cuda_block.named_parameters():
            torch.testing.assert_close(param.grad.float().cpu(), expected[name], atol=tol, rtol=tol, msg=name)
        block.zero_grad()
        block = block.cpu().float()
