"""Fine-tuning an upcycled model with the Trainer: the router loss trains, checkpoints reload, biases update."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

import moe_zoo
from moe_zoo.training import AuxLossScheduleCallback, SelectionBiasCallback


def _tiny_moe(**options):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
    )
    return moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4, **options)


def _dataset(rows: int = 32, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_steps=6,
        logging_steps=1,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def test_trainer_fine_tunes_and_checkpoint_reloads(tmp_path):
    model = _tiny_moe(output_router_logits=True, router_aux_loss_coef=0.02)
    router_before = model.moe_blocks()[0].gate.weight.detach().clone()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert not torch.equal(model.moe_blocks()[0].gate.weight, router_before)  # the router trained
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-6").eval()
    ids = torch.tensor(_dataset(2)["input_ids"])
    assert moe_zoo.max_logit_difference(model.eval(), reloaded, ids) == 0.0


def test_selection_bias_callback_updates_biases_once_per_step(tmp_path):
    model = _tiny_moe(router_type="bias_balanced", router_bias_update_rate=1e-3)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3, learning_rate=0.0, save_strategy="no"),
        train_dataset=_dataset(),
        callbacks=[SelectionBiasCallback()],
    )
    trainer.train()
    bias = model.moe_blocks()[0].gate.selection_bias
    # Each step moves every expert's bias by exactly +-u (or 0 for an expert at the mean load).
    steps = (bias / 1e-3).round()
    assert bias.abs().sum() > 0
    assert torch.allclose(bias, steps * 1e-3, atol=1e-6) and steps.abs().max() <= 3


class _Spy(TrainerCallback):
    """Records the reported log lines and the aux-loss coefficient each optimizer step's forwards used."""

    def __init__(self):
        self.logs, self.coefficients = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.coefficients.append(model.config.router_aux_loss_coef)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_selection_bias_callback_drives_a_skewed_load_toward_uniform_and_logs_it(tmp_path):
    """Every token first goes to expert 0 (its selection bias starts at +1 over sigmoid scores in (0, 1)); with the
    model frozen (lr 0), the bias updates alone spread the load, and the callback reports it."""
    model = _tiny_moe(
        router_type="bias_balanced", router_bias_update_rate=0.02, num_experts_per_tok=1, router_init_std=0.5
    )
    for block in model.moe_blocks():
        block.gate.selection_bias[0] = 1.0
    spy = _Spy()
    callback = SelectionBiasCallback()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=40, learning_rate=0.0, save_strategy="no", logging_steps=10),
        train_dataset=_dataset(),
        callbacks=[callback, spy],
    )
    trainer.train()
    ratios = [ratio for _, ratio in callback.history]
    assert len(ratios) == 40
    assert ratios[0] == 4.0  # one expert of four takes every token
    # The bias drove the load toward uniform (1.0; measured 1.30 over the last 10 steps, 96 tokens a step).
    assert sum(ratios[-10:]) / 10 < 1.6
    lines = [line for line in spy.logs if "loss" in line]
    assert len(lines) == 4 and all("bias_load_max_ratio" in line and "selection_bias_spread" in line for line in lines)
    assert lines[0]["bias_load_max_ratio"] > lines[-1]["bias_load_max_ratio"]


def test_aux_loss_schedule_anneals_the_coefficient_the_loss_reads(tmp_path):
    schedule = AuxLossScheduleCallback(start=0.1, end=0.01, steps=3)
    assert [round(schedule.coefficient(s), 6) for s in (0, 1, 3, 10)] == [0.1, 0.07, 0.01, 0.01]
    cosine = AuxLossScheduleCallback(start=1.0, end=0.0, steps=4, schedule="cosine")
    assert cosine.coefficient(2) == pytest.approx(0.5) and cosine.coefficient(1) > 0.75
    model = _tiny_moe(output_router_logits=True)
    spy = _Spy()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=5, save_strategy="no"),
        train_dataset=_dataset(),
        callbacks=[schedule, spy],
    )
    trainer.train()
    assert spy.coefficients == pytest.approx([0.1, 0.07, 0.04, 0.01, 0.01])
    assert [line["router_aux_loss_coef"] for line in spy.logs if "loss" in line] == pytest.approx(spy.coefficients)
    # The loss reads the coefficient live: the model's loss moves with it by exactly coef * aux.
    batch = {k: torch.tensor(v[:4]) for k, v in _dataset()[:4].items()}
    model.eval()
    with torch.no_grad():
        first = model(**batch)
        model.config.router_aux_loss_coef = 0.5
        second = model(**batch)
    aux_part = (first.loss - _lm_loss(model, batch)).item()  # 0.01 * aux
    assert (second.loss - first.loss).item() == pytest.approx((0.5 / 0.01 - 1) * aux_part, rel=1e-4)


def _lm_loss(model, batch) -> torch.Tensor:
    coefficient = model.config.router_aux_loss_coef
    model.config.router_aux_loss_coef = 0.0
    try:
        with torch.no_grad():
            return model(**batch).loss
    finally:
        model.config.router_aux_loss_coef = coefficient


def test_aux_loss_schedule_reaches_mixlora_adapter_configs_and_refuses_bad_settings(tmp_path):
    from peft import get_peft_model

    from moe_zoo.peft import MixLoraConfig

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    )
    peft_model = get_peft_model(dense, MixLoraConfig(r=4, num_experts=4, target_modules=["gate_proj", "up_proj"]))
    schedule = AuxLossScheduleCallback(start=0.2, end=0.0, steps=2)
    trainer = Trainer(
        model=peft_model,
        args=_args(tmp_path, max_steps=2, save_strategy="no"),
        train_dataset=_dataset(),
        callbacks=[schedule],
    )
    trainer.train()
    assert peft_model.peft_config["default"].router_aux_loss_coef == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        AuxLossScheduleCallback(0.1, 0.0, 10, schedule="step")
    with pytest.raises(ValueError, match="steps >= 1"):
        AuxLossScheduleCallback(0.1, 0.0, 0)
