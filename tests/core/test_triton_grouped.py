"""moe_zoo's Triton grouped GEMMs (:mod:`moe_zoo.core.triton_grouped`) on a CPU: the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``, in a subprocess, see ``triton_interpreted_checks.py``) against torch, a whole
expert bank through them against the per-expert loop, and the fallback when they cannot run. The compiled kernels
on a GPU (bf16 and fp32) are in ``tests/gpu/test_triton_experts.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_zoo.core.routed_pairs import expert_linear, expert_outer, fuses_gather, route_pairs

triton_grouped = pytest.importorskip("moe_zoo.core.triton_grouped", exc_type=ImportError)

CHECKS = Path(__file__).with_name("triton_interpreted_checks.py")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(CHECKS)], env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_interpreted_kernels_match_torch(interpreted):
    assert interpreted["works"]
    for key in ("linear_gathered", "linear_transposed_weight", "outer_gathered", "outer_into_strided_out"):
        assert interpreted[key] < 1e-4, key
    assert interpreted["outer_empty_experts_zero"] == 0.0
    assert interpreted["no_pairs_shape"] == [0, 33]


def test_expert_bank_through_triton_matches_the_loop(interpreted):
    """Outputs and every gradient (input, routing weights, both weight banks) agree with the per-expert loop, and the
    fused gather keeps the ``(T, H)`` input for the backward instead of the ``(T * k, H)`` gathered rows (37 tokens,
    one slot empty and one token routed nowhere: 71 pairs)."""
    assert interpreted["fuses_gather"]
    assert interpreted["saved_rows_shapes"] == [[71, 24], [37, 24]]
    for key in ("output", "grad_input", "grad_routing_weights", "grad_parameters"):
        assert interpreted[key] < 1e-5, key
    calls = interpreted["bank_differences_kernel_calls"]  # forward: up, down; backward: W_d^T g, W_u^T g
    assert calls == {"grouped_linear": 4, "grouped_outer": 2}  # one weight gradient per projection


def test_lora_experts_through_triton_match_the_loop(interpreted):
    """MixLoRA's LoRA-expert kernel runs its matmuls through the same functions: output and gradients agree."""
    assert interpreted["lora_experts"] < 1e-5
    calls = interpreted["lora_experts_differences_kernel_calls"]
    assert calls["grouped_linear"] >= 3 and calls["grouped_outer"] >= 6  # every projection's LoRA A and B


def test_probe_turns_off_kernels_that_give_wrong_results(interpreted):
    assert not interpreted["probe_accepts_wrong_kernel"]
    assert "results differ from torch's" in interpreted["probe_warning"]


def test_cpu_defaults_leave_triton_off():
    routed = route_pairs(torch.tensor([[0, 1], [1, 2]]), 3)
    assert not routed.triton
    assert not fuses_gather(routed, torch.zeros(2, 4), torch.zeros(3, 5, 4))


def test_kernels_that_cannot_run_fall_back_with_a_warning():
    """Asked for on CPU tensors without the interpreter, the kernels cannot compile: the probe warns once and the
    matmuls run per expert, with the same results (and the gather done by the caller's index)."""
    triton_grouped.works.cache_clear()  # the probe runs once per process
    generator = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(3, generator=generator)[:2] for _ in range(6)])
    routed, plain = route_pairs(indices, 3, triton=True), route_pairs(indices, 3)
    x = torch.randn(6, 8, generator=generator, dtype=torch.float32)
    weight = torch.randn(3, 5, 8, generator=generator, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="Triton grouped GEMMs do not run"):
        out = expert_linear(x, weight, routed, index=routed.tokens)
    torch.testing.assert_close(out, expert_linear(x.index_select(0, plain.tokens), weight, plain))
    left = torch.randn(plain.num_pairs, 5, generator=generator, dtype=torch.float32)
    torch.testing.assert_close(
        expert_outer(left, x, routed, right_index=routed.tokens),
        expert_outer(left, x.index_select(0, plain.tokens), plain),
    )
