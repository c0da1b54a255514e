"""Expert load per MoE layer and label, and its plot."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_moe_llava_model import _inputs, _moe  # noqa: E402

from moe_zoo.training.expert_load import expert_load_by_label, plot_expert_load  # noqa: E402


def test_expert_load_counts_every_routed_assignment(tmp_path):
    moe = _moe()
    batches = [{k: v[i : i + 1] for k, v in _inputs(4).items()} for i in range(4)]
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batches[3]["attention_mask"][0, -2:] = 0  # two padded positions do not count
    load = expert_load_by_label(moe, batches, labels=[0, 1, 1, 2], num_labels=4)
    assert load.shape == (2, 4, 4)
    torch.testing.assert_close(load[:, :3].sum(-1), torch.ones(2, 3))
    assert load[:, 3].sum() == 0  # label 3 never occurs
    # Independent count for label 0 in layer 0: top-2 over the 22 tokens of the first example.
    with torch.no_grad():
        logits = moe(**batches[0], output_router_logits=True).router_logits[0]
    counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4).float()
    torch.testing.assert_close(load[0, 0], counts / counts.sum())
    path = plot_expert_load(load, ["zero", "one", "two", "three"], tmp_path / "load.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    grid = plot_expert_load(load.repeat(5, 1, 1), ["a", "b", "c", "d"], tmp_path / "grid.png", columns=4)
    assert grid.stat().st_size > 2000
    with pytest.raises(ValueError, match="layer_names"):
        plot_expert_load(load, ["a", "b", "c", "d"], tmp_path / "bad.png", layer_names=["layer 1"])


def test_expert_load_can_count_one_token_only():
    moe = _moe()
    batch = {k: v[:1] for k, v in _inputs(1).items()}
    image_token_id = moe.config.image_token_id
    load = expert_load_by_label(moe, [batch], labels=[0], num_labels=1, token_id=image_token_id)
    with torch.no_grad():
        logits = moe(**batch, output_router_logits=True).router_logits[0]
    image_positions = batch["input_ids"].reshape(-1) == image_token_id
    assert 0 < image_positions.sum() < image_positions.numel()
    counts = torch.bincount(logits[image_positions].topk(2, dim=-1).indices.reshape(-1), minlength=4).float()
    torch.testing.assert_close(load[0, 0], counts / counts.sum())


def test_expert_load_sees_the_routing_of_a_model_that_collects_its_own():
    """A model whose config asks for router logits (MoE-tuning's stage III) collects its routing itself; the
    expert-load probe around it must still see every layer."""
    moe = _moe()
    batch = {k: v[:1] for k, v in _inputs(1).items()}
    quiet = expert_load_by_label(moe, [batch], labels=[0], num_labels=1)
    moe.config.output_router_logits = True
    loud = expert_load_by_label(moe, [batch], labels=[0], num_labels=1)
    assert loud.shape == quiet.shape == (2, 1, 4)
    torch.testing.assert_close(loud, quiet)
