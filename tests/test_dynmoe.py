"""DynMoE's adaptive process: experts that receive no token are switched off, a new expert is switched on for the
tokens that found none, on a Trainer schedule, and checkpoints keep the active-expert mask."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedConfig, Trainer, TrainingArguments

import moe_zoo
from moe_zoo.core import MoeOptions, TopAnyRouter
from moe_zoo.training import DynMoeCallback


class RouterConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_test_dynmoe"


def _router() -> TopAnyRouter:
    router = TopAnyRouter(RouterConfig(router_type="top_any", num_experts=4, top_any_init_experts=2), 4)
    with torch.no_grad():
        router.sim_matrix.copy_(torch.eye(4))  # expert e looks along axis e
    return router.train()


def test_adapt_removes_idle_experts_and_adds_one_for_unrouted_tokens():
    router = _router()
    tokens = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5 + [[0.0, 0.0, 0.0, 1.0]] * 3)  # expert 0's, and unroutable ones
    router.recording = True
    _, _, indices = router(tokens)
    assert (indices[5:] == 4).all()  # the last three tokens activate nothing (slots 2, 3 are off)
    assert router.routing_records.tolist() == [5.0, 0.0, 0.0, 0.0]
    removed, added = router.adapt_experts()
    assert removed == [1] and added == [1]  # expert 1 got nothing; the first free slot (1) now serves the others
    assert router.experts_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(router.sim_matrix[:, 1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert router.gates[1] == 0 and router.routing_records.sum() == 0 and router.unrouted_sum.sum() == 0
    _, _, indices = router(tokens)
    assert (indices[5:, 0] == 1).all()  # the new expert takes them


def test_nothing_is_recorded_unless_asked():
    router = _router()
    router(torch.randn(6, 4))
    assert router.routing_records.sum() == 0
    assert router.adapt_experts() == ([], [])


def test_callback_schedule_and_checkpointed_mask(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    model = moe_zoo.upcycle(
        AutoModelForCausalLM.from_config(config), num_experts=4, router_type="top_any", top_any_init_experts=2
    )
    ids = torch.randint(1, 64, (16, 10), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    callback = DynMoeCallback(period=4, record_start=1, adapt_at=3)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_steps=4,
        learning_rate=1e-3,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [entry["step"] for entry in callback.history] == [3, 3]  # both routers adapted once, at step 3
    assert all(not router.recording for router in callback._routers(model))
    masks = [block.gate.experts_mask.clone() for block in model.moe_blocks()]
    assert [m.sum().item() for m in masks] == [entry["active"] for entry in callback.history]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-4")
    for block, mask in zip(reloaded.moe_blocks(), masks, strict=True):
        assert torch.equal(block.gate.experts_mask, mask)


def test_callback_rejects_a_bad_schedule():
    with pytest.raises(ValueError, match="record_start < adapt_at <= period"):
        DynMoeCallback(period=10, record_start=6, adapt_at=3)
