"""The routed-pair layout's weight-gradient product: exact, and in the parameter's own layout."""

import pytest
import torch

from moe_zoo.core import route_pairs
from moe_zoo.core.routed_pairs import expert_outer

EXPERTS = 5


@pytest.mark.parametrize("widths", [(12, 7), (7, 12), (16, 3)], ids=["a>b", "a<b", "lora-rank"])
def test_expert_outer_is_exact_contiguous_and_zero_for_experts_without_pairs(widths):
    """Each expert's sum of outer products, returned contiguous as ``(E, a, b)`` in both orientations (autograd
    would copy a gradient whose strides differ from its parameter's), an expert with no pairs exactly 0."""
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, EXPERTS - 1, (20, 2), generator=generator)  # expert EXPERTS - 1 gets no pairs
    indices[3, 1] = EXPERTS  # an empty slot
    routed = route_pairs(indices, EXPERTS)
    left = torch.randn(routed.num_pairs, widths[0], generator=generator)
    right = torch.randn(routed.num_pairs, widths[1], generator=generator)
    out = expert_outer(left, right, routed)
    experts = indices.reshape(-1)[routed.pairs]
    expected = torch.stack([left[experts == e].t() @ right[experts == e] for e in range(EXPERTS)])
    assert out.shape == (EXPERTS, *widths) and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[EXPERTS - 1], torch.zeros(widths))
