"""The expert bank's kept weight-gradient memory (:mod:`moe_zoo.core.gradient_buffers`): reused from step to step
when the previous gradient is gone, never while anything still holds it, and the gradients always equal those of
transformers' eager experts."""

import torch
from transformers import PreTrainedConfig

from moe_zoo.core import GatedExperts, MoeOptions, release_gradient_buffers
from moe_zoo.core.fused_experts import IMPLEMENTATION_NAME
from moe_zoo.core.gradient_buffers import UNSHARED_USE_COUNT, GradientBuffers, gradient_buffers

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, TOKENS = 8, 12, 4, 2, 16


class BankConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_gradient_buffers"


def _bank(implementation: str) -> GatedExperts:
    config = BankConfig(num_experts=EXPERTS)
    config._experts_implementation = implementation
    bank = GatedExperts(config, EXPERTS, HIDDEN, INTERMEDIATE, "silu")
    torch.manual_seed(0)
    bank.reset_parameters(0.5)
    return bank


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    indices = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    return x, indices, torch.rand(TOKENS, TOP_K, generator=generator)


def _backward(bank: GatedExperts, seed: int) -> None:
    bank(*_batch(seed)).square().sum().backward()


def _reference_grads(*seeds: int) -> dict[str, torch.Tensor]:
    """The gradients transformers' eager experts accumulate over ``seeds``' batches."""
    eager = _bank("eager")
    for seed in seeds:
        _backward(eager, seed)
    return {name: param.grad for name, param in eager.named_parameters()}


def _assert_grads(bank: GatedExperts, expected: dict[str, torch.Tensor]) -> None:
    for name, param in bank.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_this_torch_can_tell_whether_a_storage_is_shared():
    assert UNSHARED_USE_COUNT is not None  # else reuse is off and the tests below would test nothing


def test_the_next_step_reuses_the_freed_gradient_memory():
    bank = _bank(IMPLEMENTATION_NAME)
    _backward(bank, 1)
    _assert_grads(bank, _reference_grads(1))
    first = {name: param.grad.data_ptr() for name, param in bank.named_parameters()}
    bank.zero_grad(set_to_none=True)
    _backward(bank, 2)
    _assert_grads(bank, _reference_grads(2))
    assert {name: param.grad.data_ptr() for name, param in bank.named_parameters()} == first
    assert gradient_buffers(bank).nbytes == sum(p.numel() * p.element_size() for p in bank.parameters())


def test_accumulated_gradients_are_never_overwritten():
    """Micro-batches accumulating into ``.grad`` (no zero_grad in between): the live gradient holds the memory."""
    bank = _bank(IMPLEMENTATION_NAME)
    _backward(bank, 1)
    _backward(bank, 2)
    _backward(bank, 3)
    _assert_grads(bank, _reference_grads(1, 2, 3))


def test_a_gradient_kept_by_the_caller_or_a_view_of_it_stays_intact():
    bank = _bank(IMPLEMENTATION_NAME)
    _backward(bank, 1)
    kept = bank.gate_up_proj.grad
    view = bank.down_proj.grad[1:]
    expected_kept, expected_view = kept.clone(), view.clone()
    bank.zero_grad(set_to_none=True)
    _backward(bank, 2)
    torch.testing.assert_close(kept, expected_kept, rtol=0, atol=0)
    torch.testing.assert_close(view, expected_view, rtol=0, atol=0)
    assert bank.gate_up_proj.grad.data_ptr() != kept.data_ptr()
    assert bank.down_proj.grad.data_ptr() != view.data_ptr() - view.storage_offset() * view.element_size()
    _assert_grads(bank, _reference_grads(2))


def test_release_gives_the_memory_back_and_training_goes_on():
    bank = _bank(IMPLEMENTATION_NAME)
    _backward(bank, 1)
    size = gradient_buffers(bank).nbytes
    assert size > 0
    assert release_gradient_buffers(torch.nn.Sequential(bank)) == size
    assert gradient_buffers(bank).nbytes == 0
    bank.zero_grad(set_to_none=True)
    _backward(bank, 2)
    _assert_grads(bank, _reference_grads(2))


def test_autograd_grad_results_are_not_overwritten_by_the_next_call():
    bank = _bank(IMPLEMENTATION_NAME)
    x, indices, weights = _batch(1)
    (first,) = torch.autograd.grad(bank(x, indices, weights).sum(), [bank.down_proj])
    expected = first.clone()
    (second,) = torch.autograd.grad(bank(*_batch(2)).sum(), [bank.down_proj])
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    assert not torch.equal(first, second)


def test_nothing_is_kept_off_cpu():
    """Off CPU (here the meta device, as a stand-in for CUDA, whose caching allocator already reuses memory) every
    request gets a fresh tensor and the bank keeps nothing."""
    buffers = GradientBuffers()
    like = torch.empty(1, device="meta")
    first, second = buffers.take("up", (3, 4, 5), like), buffers.take("up", (3, 4, 5), like)
    assert first.device.type == "meta" and first is not second
    assert buffers.buffers == {} and buffers.nbytes == 0
