"""The upcycle-and-fine-tune recipe behind training_scripts/finetune_upcycled.py: trains, saves, and a resumed run
continues where it stopped (same weights as an uninterrupted run)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, TrainingArguments

import moe_zoo
from moe_zoo.assets import smollm2_path
from moe_zoo.core.options import parse_moe_layers
from moe_zoo.training.finetune import UpcycleFinetuneArguments, load_examples, run


@pytest.fixture(scope="module")
def tiny_dense_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("dense")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    facts = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]
    rows = [
        {"messages": [{"role": "user", "content": f"Capital of {c}?"}, {"role": "assistant", "content": city}]}
        for c, city in facts * 4
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def _train(tiny_dense_dir, chat_file, output_dir, max_steps, resume=None):
    args = UpcycleFinetuneArguments(data_file=str(chat_file), model_path=str(tiny_dense_dir), moe_layers="all")
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        resume_from_checkpoint=resume,
    )
    return run(args, training_args)


def test_recipe_trains_saves_and_resumes_exactly(tiny_dense_dir, chat_file, tmp_path):
    full = _train(tiny_dense_dir, chat_file, tmp_path / "full", max_steps=4)
    losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert isinstance(saved, moe_zoo.UpcycledMoeForCausalLM) and len(saved.moe_blocks()) == 2

    # A run stopped after step 2 (its checkpoint-4 and final save lost) resumes and ends identical.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "stopped" / "checkpoint-2")
    resumed = _train(tiny_dense_dir, chat_file, tmp_path / "stopped", max_steps=4, resume="true")
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_without_checkpoint_is_refused(tiny_dense_dir, chat_file, tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        _train(tiny_dense_dir, chat_file, tmp_path / "empty", max_steps=2, resume="true")


def test_bad_data_is_refused_clearly(tmp_path, tiny_dense_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dense_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="'messages' or 'text'"):
        load_examples(bad, tokenizer, 32)
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.jsonl", tokenizer, 32)
    assert parse_moe_layers("0,3") == [0, 3] and parse_moe_layers("sparse") == "sparse"
