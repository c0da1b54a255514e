"""GPU checks (skipped without CUDA or Triton): moe_zoo's compiled Triton grouped GEMMs in bf16 and fp32 against
torch, and moe_zoo's experts implementation through them against the ``torch._grouped_mm`` path."""

import pytest
import torch

from moe_zoo.core import GatedExperts, fused_experts
from moe_zoo.core.routed_pairs import TRITON_SWITCH, fuses_gather, route_pairs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
triton_grouped = pytest.importorskip("moe_zoo.core.triton_grouped", exc_type=ImportError)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_match_torch(dtype):
    assert triton_grouped.works("cuda", dtype)
    generator = torch.Generator().manual_seed(0)
    routed = triton_grouped.sorted_pairs([0, 300, 5, 64, 0, 1000, 1, 130], "cuda")
    experts, num_experts = routed.experts, routed.num_experts
    x = torch.randn(900, 256, generator=generator).cuda()
    index = torch.randint(0, 900, (routed.num_pairs,), generator=generator).cuda()
    weight = (torch.randn(num_experts, 384, 256, generator=generator) / 16).cuda()
    rows = x[index]
    expected = torch.einsum("pi,poi->po", rows, weight[experts])
    out = triton_grouped.grouped_linear(x.to(dtype), weight.to(dtype), routed, index).float()
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype])
    left = torch.randn(routed.num_pairs, 384, generator=generator).cuda() / 16
    expected_outer = torch.stack([left[experts == e].t() @ rows[experts == e] for e in range(num_experts)])
    outer = triton_grouped.grouped_outer(left.to(dtype), x.to(dtype), routed, right_index=index).float()
    torch.testing.assert_close(outer, expected_outer, atol=TOLERANCE[dtype] * 100, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_through_triton_match_grouped_mm_path(dtype, monkeypatch):
    from transformers import PreTrainedConfig

    from moe_zoo.core import MoeOptions

    class BankConfig(PreTrainedConfig, MoeOptions):
        model_type = "moe_zoo_test_gpu_triton_bank"

    config = BankConfig(num_experts=8)
    config._experts_implementation = fused_experts.IMPLEMENTATION_NAME
    torch.manual_seed(0)
    bank = GatedExperts(config, 8, 128, 256, "silu").cuda().to(dtype)
    with torch.no_grad():
        for param in bank.parameters():
            param.normal_(0, 0.05)
    indices = torch.stack([torch.randperm(8)[:2] for _ in range(333)]).cuda()
    indices[5, 1] = 8  # an empty slot
    x, weights = torch.randn(333, 128).cuda().to(dtype), torch.rand(333, 2).cuda().to(dtype)
    grad = torch.randn(333, 128).cuda().to(dtype)
    assert route_pairs(indices, 8).triton
    assert fuses_gather(route_pairs(indices, 8), x, bank.gate_up_proj)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(TRITON_SWITCH, switch)
        inputs, routing = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = bank(inputs, indices, routing)
        out.backward(grad)
        results.append([out, inputs.grad, routing.grad, *(p.grad.clone() for p in bank.parameters())])
        bank.zero_grad()
    for triton_value, reference in zip(*results, strict=True):
        torch.testing.assert_close(
            triton_value.float(), reference.float(), atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10
        )
