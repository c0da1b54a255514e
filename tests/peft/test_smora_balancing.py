"""SMoRA's aux-loss-free selection bias: once per optimizer step from the loads of all micro-batches (a real
Trainer run with gradient accumulation), or, with ``bias_balancing="original"``, after every training forward with
the bias in the gate values, as the official code does."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from peft_test_models import VOCAB, smora, smora_layers, tiny_causal_lm
from smora_reference import IN, dense_reference, one_layer_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import moe_zoo  # noqa: F401  (registers SMORA)
from moe_zoo.core import update_selection_biases
from moe_zoo.peft.smora import SmoraRankRouter
from moe_zoo.training import SelectionBiasCallback

RATE = 1e-2


def _routers(model: torch.nn.Module) -> dict[str, SmoraRankRouter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SmoraRankRouter)}


def _expected_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    return bias + rate * torch.sign(load.mean() - load)


def test_default_rate_is_the_originals():
    config = smora()
    assert (config.bias_update_rate, config.bias_balancing) == (1e-5, "per_step")


def test_per_step_bias_moves_only_when_update_selection_biases_runs():
    model, layer = one_layer_model(bias_update_rate=RATE)
    router = layer.lora_router["default"]
    model.train()
    start = router.selection_bias.clone()
    loads = torch.zeros(router.num_experts)
    for seed in range(2):
        x = torch.randn(16, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            chosen = (torch.sigmoid(x @ router.weight.t()) + start).topk(router.top_k, dim=-1).indices
        loads += torch.bincount(chosen.flatten(), minlength=router.num_experts).float()
        model(x)
        assert torch.equal(router.selection_bias, start), "per_step must not move the bias inside a step"
    assert torch.equal(router.pending_load, loads)
    update_selection_biases(model)
    assert torch.equal(router.selection_bias, _expected_update(start, loads, RATE))
    assert router.pending_load.abs().sum() == 0
    model.eval()
    model(torch.randn(4, IN, dtype=torch.float64))
    assert router.pending_load.abs().sum() == 0, "eval forwards must not count loads"


class _StepRecorder(TrainerCallback):
    """Listed before SelectionBiasCallback: sees each router's loads and bias just before the update, and the bias
    after it."""

    def __init__(self, routers: dict[str, SmoraRankRouter]):
        self.routers = routers
        self.before: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.before.append({n: (r.pending_load.clone(), r.selection_bias.clone()) for n, r in self.routers.items()})

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append({n: r.selection_bias.clone() for n, r in self.routers.items()})


def test_trainer_updates_the_bias_once_per_optimizer_step_from_all_micro_batches(tmp_path):
    model = get_peft_model(tiny_causal_lm(), smora(target_modules=["q_proj", "up_proj"], bias_update_rate=RATE))
    routers = _routers(model)
    assert len(routers) == 4
    forwards: dict[str, list[tuple[bool, torch.Tensor, torch.Tensor]]] = {name: [] for name in routers}

    def record(name):
        def hook(module, inputs, output):
            load = torch.bincount(output[2].flatten(), minlength=module.num_experts).float()
            forwards[name].append((module.training, module.selection_bias.clone(), load))

        return hook

    for name, router in routers.items():
        router.register_forward_hook(record(name))
    recorder = _StepRecorder(routers)
    ids = torch.randint(0, VOCAB, (16, 10), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            learning_rate=1e-3,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
        callbacks=[recorder, SelectionBiasCallback()],
    )
    trainer.train()

    steps = 3
    assert len(recorder.before) == len(recorder.after) == steps
    moved = 0
    for name in routers:
        seen = forwards[name]
        assert len(seen) == 2 * steps and all(training for training, _, _ in seen)
        for step in range(steps):
            (_, bias_1, load_1), (_, bias_2, load_2) = seen[2 * step : 2 * step + 2]
            pending, bias_before = recorder.before[step][name]
            # Both micro-batches of a step route with the bias of the step's start...
            assert torch.equal(bias_1, bias_before) and torch.equal(bias_2, bias_before)
            # ... the update sees their summed loads, and moves the bias once by u * sign(mean load - load).
            assert torch.equal(pending, load_1 + load_2)
            expected = _expected_update(bias_before, load_1 + load_2, RATE)
            assert torch.equal(recorder.after[step][name], expected)
            if step + 1 < steps:
                assert torch.equal(seen[2 * step + 2][1], expected)
            moved += int((expected != bias_before).any())
    assert moved > 0, "some step should have had unbalanced loads"


def test_original_mode_updates_after_every_training_forward_with_the_bias_in_the_gates():
    """The official code's rule, per rank: loads are the bincount of the chosen ranks of *this* forward, the bias of
    every rank moves by u * sign(mean - load) right after it, and the gates are the chosen biased scores over their
    sum times activate_r. With rank_partition = 2 each expert's two ranks always share a load, so the per-expert
    bias we keep equals the official per-rank bias repeated."""
    model, layer = one_layer_model(
        r=8, activate_r=4, rank_partition=2, bias_balancing="original", bias_update_rate=RATE
    )
    router = layer.lora_router["default"]
    model.train()
    rank_bias = router.selection_bias.repeat_interleave(2).clone()
    for seed in range(3):
        x = torch.randn(20, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = dense_reference(layer, x, original=True)
            scores = torch.sigmoid(x @ router.weight.t()).repeat_interleave(2, dim=-1) + rank_bias
            rank_load = torch.bincount(scores.topk(4, dim=-1).indices.flatten(), minlength=8).float()
        got = model(x)
        assert (got - expected).abs().max() <= 1e-12
        rank_bias = _expected_update(rank_bias, rank_load, RATE)
        assert torch.equal(router.selection_bias.repeat_interleave(2), rank_bias)
        assert router.pending_load.abs().sum() == 0
    update_selection_biases(model)  # what SelectionBiasCallback would do: nothing is pending, nothing moves
    assert torch.equal(router.selection_bias.repeat_interleave(2), rank_bias)
    model.eval()
    model(torch.randn(5, IN, dtype=torch.float64))
    assert torch.equal(router.selection_bias.repeat_interleave(2), rank_bias), "eval forwards must not update"


def test_bias_update_rate_zero_switches_balancing_off():
    model = get_peft_model(tiny_causal_lm(), smora(target_modules=["q_proj"], bias_update_rate=0.0))
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids)
    update_selection_biases(model)
    for layer in smora_layers(model):
        assert layer.lora_router["default"].selection_bias.abs().sum() == 0
        assert layer.lora_router["default"].pending_load.abs().sum() == 0
