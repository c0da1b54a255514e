"""Fine-tuning an upcycled model with the Trainer: the router loss trains, checkpoints reload, biases update."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import moe_zoo
from moe_zoo.training import SelectionBiasCallback


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
