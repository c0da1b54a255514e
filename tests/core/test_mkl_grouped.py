"""The CPU grouped GEMM through MKL's ``sgemm_batch`` (:mod:`moe_zoo.core.mkl_grouped`): it agrees with a loop of
``torch.mm`` for every operand layout the expert passes use, it is what the expert bank runs on an x86-64 torch
with MKL (and ``MOE_ZOO_MKL=0`` turns it off), and a wrong result from the library turns it off with a warning."""

import os
import platform
from unittest import mock

import pytest
import torch
from transformers import PreTrainedConfig

from moe_zoo.core import GatedExperts, MoeOptions, mkl_grouped
from moe_zoo.core.fused_experts import IMPLEMENTATION_NAME
from moe_zoo.core.routed_pairs import expert_linear, route_pairs

HAS_MKL_BATCH = mkl_grouped.works()


def test_the_mkl_path_exists_where_torch_carries_mkl():
    """On an x86-64 Linux torch built with MKL (CI's), the path must be found and pass its probe: a silent
    ``False`` here would leave every test below skipped and the CPU on the slower loop."""
    if not (platform.system() == "Linux" and platform.machine() == "x86_64" and torch.backends.mkl.is_available()):
        pytest.skip("not an x86-64 Linux torch with MKL: the per-expert loop runs here")
    assert HAS_MKL_BATCH


needs_mkl = pytest.mark.skipif(not HAS_MKL_BATCH, reason="this torch build has no MKL sgemm_batch")


@needs_mkl
def test_mkl_runs_with_torchs_thread_count():
    """The batched call splits its work over MKL's threads, which ``torch.set_num_threads`` sets (as the module
    docstring says)."""
    get_threads = mkl_grouped._library().mkl_get_max_threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert get_threads() == 1
        torch.set_num_threads(2)
        assert get_threads() == 2
    finally:
        torch.set_num_threads(before)


def loop(rows, weight, counts):
    return torch.cat([block @ weight[e].t() for e, block in enumerate(rows.split(counts))])


@needs_mkl
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("rows_layout", ["contiguous", "column_major", "slice"])
def test_grouped_linear_matches_the_loop(weight_layout, rows_layout):
    """Every expert's rows times its weight, empty experts (first, middle, last) skipped, for both weight layouts
    of a bank (``(E, out, in)``, and ``(E, in, out)`` storage seen through ``transpose(1, 2)``: transposed banks and
    the backward's ``W^T``) and rows that are contiguous, column-major or a column slice of a wider tensor."""
    generator = torch.Generator().manual_seed(0)
    counts = [0, 13, 1, 0, 40, 7, 0]
    num_rows, n_in, n_out = sum(counts), 24, 17
    weight = {
        "contiguous": torch.randn(len(counts), n_out, n_in, generator=generator),
        "transposed": torch.randn(len(counts), n_in, n_out, generator=generator).transpose(1, 2),
    }[weight_layout]
    rows = {
        "contiguous": torch.randn(num_rows, n_in, generator=generator),
        "column_major": torch.randn(n_in, num_rows, generator=generator).t(),
        "slice": torch.randn(num_rows, n_in + 9, generator=generator)[:, 4 : 4 + n_in],
    }[rows_layout]
    expected = loop(rows, weight, counts)
    out = mkl_grouped.grouped_linear(rows, weight, counts)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    again = mkl_grouped.grouped_linear(rows, weight, counts, out=out.clone())  # accumulates into out
    torch.testing.assert_close(again, 2 * expected, atol=1e-5, rtol=1e-5)


@needs_mkl
def test_expert_linear_runs_one_batch_call_where_the_switch_asks_for_it():
    """One ``sgemm_batch`` call for all experts. ``MOE_ZOO_MKL`` is read when the pairs are routed (so a backward runs
    what its forward ran): by default for passes without a backward, ``always`` in training too, ``never`` or
    ``mkl=False`` nowhere; the loop gives the same result."""
    generator = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 6, (50, 2), generator=generator)
    rows = torch.randn(100, 16, generator=generator)
    weight = torch.randn(6, 20, 16, generator=generator)

    def routed_with(value: str | None, backward: bool):
        environment = {} if value is None else {mkl_grouped.SWITCH: value}
        with mock.patch.dict("os.environ", environment):
            if value is None:
                os.environ.pop(mkl_grouped.SWITCH, None)
            return route_pairs(indices, 6, backward=backward).mkl

    assert routed_with(None, backward=False) and not routed_with(None, backward=True)
    assert routed_with("always", backward=True) and routed_with("1", backward=True)
    assert not routed_with("never", backward=False) and not routed_with("0", backward=False)
    assert not route_pairs(indices, 6, mkl=False, backward=False).mkl
    with mock.patch.dict("os.environ", {mkl_grouped.SWITCH: "sometimes"}):
        with pytest.raises(ValueError, match="MOE_ZOO_MKL='sometimes' is not one of inference, always, never"):
            route_pairs(indices, 6)
    batched_pairs, looped_pairs = route_pairs(indices, 6, mkl=True), route_pairs(indices, 6, mkl=False)
    with mock.patch.object(mkl_grouped, "_sgemm_batch", wraps=mkl_grouped._sgemm_batch) as entry:
        batched = expert_linear(rows, weight, batched_pairs)
        assert entry.call_count == 1
        looped = expert_linear(rows, weight, looped_pairs)
        assert entry.call_count == 1  # nothing more went through MKL
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)


def test_it_does_not_take_what_it_cannot_compute():
    rows, weight = torch.randn(6, 4), torch.randn(3, 5, 4)
    counts = [2, 0, 4]
    assert not mkl_grouped.applies(rows.bfloat16(), weight.bfloat16(), counts)  # fp32 only
    assert not mkl_grouped.applies(rows, weight, [0, 0, 6])  # one expert: a plain mm
    strided = torch.randn(6, 8)[:, ::2]  # no unit stride in either dimension
    assert not mkl_grouped.applies(strided, weight, counts)
    assert not mkl_grouped.applies(rows, weight, counts, out=torch.randn(5, 6).t())  # out must be row-major
    with pytest.raises(ValueError, match="do not fit together"):
        mkl_grouped.grouped_linear(rows, weight, [2, 0, 3])


class BankConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_mkl_bank"


def bank_outputs(inference: bool = False) -> dict[str, torch.Tensor]:
    """Output and gradients of a gated fp32 bank (8 experts, top-2, one empty slot) on fixed inputs (with
    ``inference``, the output of a forward under ``no_grad``)."""
    config = BankConfig(num_experts=8)
    config._experts_implementation = IMPLEMENTATION_NAME
    bank = GatedExperts(config, 8, 24, 40, "silu")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in bank.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    x = torch.randn(60, 24, generator=generator, requires_grad=True)
    indices = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(60)])
    indices[5, 1] = 8  # an empty slot
    weights = torch.rand(60, 2, generator=generator, requires_grad=True)
    if inference:
        with torch.no_grad():
            return {"output": bank(x, indices, weights)}
    out = bank(x, indices, weights)
    out.backward(torch.randn(out.shape, generator=generator))
    grads = {f"grad_{name}": param.grad for name, param in bank.named_parameters()}
    return {"output": out.detach(), "grad_input": x.grad, "grad_routing_weights": weights.grad, **grads}


@needs_mkl
def test_the_expert_bank_gives_the_same_output_and_gradients_with_and_without_mkl():
    """The whole bank's forward and backward (input, routing weights and both weight banks) with the batched GEMMs
    (``MOE_ZOO_MKL=always``) against the loop (a training pass under the default): the backward's ``W^T g`` products
    take the transposed views."""
    with mock.patch.object(mkl_grouped, "_sgemm_batch", wraps=mkl_grouped._sgemm_batch) as entry:
        with mock.patch.dict("os.environ", {mkl_grouped.SWITCH: "always"}):
            with_mkl = bank_outputs()
        assert entry.call_count == 4  # forward: up, down; backward: W_d^T g, W_u^T g
        with mock.patch.dict("os.environ", {mkl_grouped.SWITCH: "inference"}):
            without = bank_outputs()  # a training pass: the default keeps the loop
            assert entry.call_count == 4
            bank_outputs(inference=True)  # no backward: the default takes the batched call (up, down)
            assert entry.call_count == 6
    for name, value in with_mkl.items():
        torch.testing.assert_close(value, without[name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_library_that_gives_wrong_results_is_turned_off_with_a_warning():
    def wrong(*arguments):  # writes nothing: the outputs stay as allocated
        return None

    mkl_grouped.works.cache_clear()
    try:
        with mock.patch.object(mkl_grouped, "_sgemm_batch", return_value=wrong):
            with pytest.warns(RuntimeWarning, match="sgemm_batch"):
                assert not mkl_grouped.works()
    finally:
        mkl_grouped.works.cache_clear()
    assert mkl_grouped.works() == HAS_MKL_BATCH
