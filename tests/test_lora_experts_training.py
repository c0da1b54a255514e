"""training_scripts/train_lora_experts.py and what it is made of: the lm_eval instruction mix, answer-only labels,
budget-matched plain LoRA, the routing-stats Trainer, result files, adapters that reload, and resuming."""

import json
import runpy
import sys
from collections import Counter

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from moe_zoo.training import instruction_mix as mix
from moe_zoo.training.lora_experts import (
    IGNORE_INDEX,
    LoraExpertsArguments,
    encode_chat,
    encode_examples,
    heldout_losses,
    lora_parameters_per_rank,
    matched_lora_rank,
    method_config,
    trainable_parameter_count,
)
from moe_zoo.training.routing_stats import RoutingStatsTrainer, max_load_ratio

SCRIPT = "training_scripts/train_lora_experts.py"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, save_tiny_llm):
    return save_tiny_llm(tmp_path_factory.mktemp("tiny") / "llm")


def test_instruction_mix_reads_the_three_task_families_from_lm_eval():
    examples = mix.instruction_mix()
    families = Counter(example.family for example in examples)
    assert families["gsm8k"] == 8
    assert families["bbh"] == 27 * 3
    assert len({e.task for e in examples if e.family == "mmlu"}) == 57 and families["mmlu"] > 250
    for example in examples:
        assert example.question and example.answer and "\nA: " not in example.question
    assert all("answer is" in e.answer.lower() for e in examples if e.family != "bbh")


def test_heldout_split_covers_every_task_and_never_overlaps():
    examples = mix.instruction_mix()
    train, heldout = mix.split_heldout(examples, every=5)
    assert len(train) + len(heldout) == len(examples)
    assert not set(map(id, train)) & set(map(id, heldout))
    tasks = {(e.family, e.task) for e in examples}
    assert {(e.family, e.task) for e in heldout} == tasks == {(e.family, e.task) for e in train}
    with pytest.raises(ValueError, match="every"):
        mix.split_heldout(examples, every=1)
    with pytest.raises(ValueError, match="Unknown task families"):
        mix.instruction_mix(["mmlu", "squad"])


def test_missing_lm_eval_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mix.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps lm_eval==0.4.13"):
        mix.instruction_mix()


def test_labels_cover_exactly_the_answer(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    example = mix.InstructionExample("gsm8k", "gsm8k", "What is 2 + 3?", "2 + 3 = 5. The answer is 5.")
    encoded = encode_chat(example, tokenizer, max_length=512)
    answer_ids = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids).strip() == "2 + 3 = 5. The answer is 5.<|im_end|>"
    first = encoded["labels"].index(answer_ids[0])
    assert all(label == IGNORE_INDEX for label in encoded["labels"][:first])
    assert encoded["labels"][first:] == encoded["input_ids"][first:]
    truncated = encode_chat(example, tokenizer, max_length=first + 2)
    assert len(truncated["input_ids"]) == len(truncated["labels"]) == first + 2


def test_plain_lora_rank_matches_the_method_budget(tiny_llm):
    args = LoraExpertsArguments(model_path=str(tiny_llm), r=4, lora_alpha=8, num_experts=4)
    mixlora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm), method_config(args, "mixlora"))
    budget = trainable_parameter_count(mixlora)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    per_rank = lora_parameters_per_rank(base, args.targets)
    rank = matched_lora_rank(budget, per_rank)
    lora = get_peft_model(base, method_config(args, "lora", lora_rank=rank))
    assert trainable_parameter_count(lora) == rank * per_rank
    assert abs(trainable_parameter_count(lora) - budget) <= per_rank / 2
    config = lora.peft_config["default"]
    assert config.lora_alpha / config.r == pytest.approx(args.lora_alpha / args.r)
    with pytest.raises(ValueError, match="method must be one of"):
        LoraExpertsArguments(method="molora")
    with pytest.raises(ValueError, match="None of the target modules"):
        lora_parameters_per_rank(base, ["fc1"])


def test_routing_stats_trainer_counts_every_real_token_and_logs_aux_loss(tiny_llm, tmp_path):
    args = LoraExpertsArguments(model_path=str(tiny_llm), r=4, lora_alpha=8, num_experts=4, top_k=2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm), method_config(args, "mixlora"))
    torch.manual_seed(0)
    lengths = [5, 9, 7, 12]
    rows = [{"input_ids": torch.randint(0, 100, (n,)).tolist()} for n in lengths]
    rows = [row | {"attention_mask": [1] * len(row["input_ids"]), "labels": row["input_ids"]} for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    from transformers import DataCollatorForSeq2Seq

    trainer = RoutingStatsTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
        ),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(entry["aux_loss"] > 0 and entry["expert_load_max_ratio"] >= 1 for entry in logged)
    assert len(trainer.expert_counts) == model.config.num_hidden_layers
    # Every non-padding token is counted top_k times per router, padding never (the batches are padded).
    for counts in trainer.expert_counts.values():
        assert counts.shape == (4,) and counts.sum().item() == sum(lengths) * 2
    assert max_load_ratio([torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])]) == pytest.approx((1.0 + 1.5) / 2)


def _run_script(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    runpy.run_path(SCRIPT, run_name="__main__")


def test_script_trains_mixlora_and_budget_matched_lora_and_adapters_reload(tiny_llm, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [
        "--model_path", str(tiny_llm), "--output_dir", str(out), "--r", "4", "--lora_alpha", "8",
        "--num_experts", "4", "--max_length", "256", "--max_steps", "3", "--save_steps", "2",
        "--task_families", "bbh,gsm8k",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
    ]  # fmt: skip
    _run_script(monkeypatch, argv)
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"mixlora", "lora"} and results["heldout_examples"] > 0
    mixlora, lora = runs["mixlora"], runs["lora"]
    assert mixlora["peft_config"]["peft_type"] == "MIXLORA" and lora["peft_config"]["peft_type"] == "LORA"
    assert abs(lora["trainable_parameters"] - mixlora["trainable_parameters"]) < 0.1 * mixlora["trainable_parameters"]
    assert len(mixlora["aux_loss"]) == 3 and not lora["aux_loss"]
    for run in runs.values():  # a learning rate of 1e-2 on a random model must lower the held-out loss
        assert set(run["heldout_loss"]) == {"all", "bbh", "gsm8k"}
        assert run["heldout_loss"]["all"] < results["base_heldout_loss"]["all"]
    assert "held-out" in capsys.readouterr().out

    # The saved adapters reload into models that give the held-out losses measured after training.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    _, heldout = mix.split_heldout(mix.instruction_mix(["bbh", "gsm8k"]), every=5)
    heldout_set = encode_examples(heldout, tokenizer, max_length=256)
    for name in ("mixlora", "lora"):
        reloaded = AutoPeftModelForCausalLM.from_pretrained(out / name)
        reloaded_loss = heldout_losses(reloaded, heldout_set, tokenizer)
        for family, loss in runs[name]["heldout_loss"].items():
            assert reloaded_loss[family] == pytest.approx(loss, rel=1e-5), (name, family)

    card = ModelCard.load(out / "mixlora" / "README.md")  # the adapter's own card, not PEFT's blank one
    assert card.data.library_name == "peft" and "mixlora fine-tuning" in card.text and "moe-zoo" in card.data.tags
    # Resuming a finished comparison keeps both runs as they were.
    _run_script(monkeypatch, [*argv, "--resume_from_checkpoint", "true"])
    assert json.loads((out / "results.json").read_text())["runs"] == runs


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_llm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "--model_path", str(tiny_llm), "--output_dir", str(out), "--r", "2", "--num_experts", "2",
        "--max_length", "256", "--save_steps", "2", "--per_device_train_batch_size", "2", "--task_families", "gsm8k",
        "--compare_with_lora", "false", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
        "--logging_steps", "1",
    ]  # fmt: skip
    _run_script(monkeypatch, [*argv, "--max_steps", "2"])
    (out / "mixlora" / "run_results.json").unlink()  # as if it had stopped after checkpoint-2
    _run_script(monkeypatch, [*argv, "--max_steps", "4", "--resume_from_checkpoint", "true"])
    state = json.loads((out / "mixlora" / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come from the restored checkpoint, 3-4 from the resumed run
    assert json.loads((out / "results.json").read_text())["runs"]["mixlora"]["train_loss"] > 0


def test_script_trains_smora_with_per_step_bias_balancing(tiny_llm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "--method", "smora", "--model_path", str(tiny_llm), "--output_dir", str(out), "--smora_r", "8",
        "--activate_r", "2", "--max_length", "256", "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--task_families", "gsm8k", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
        "--logging_steps", "1", "--save_strategy", "no",
    ]  # fmt: skip
    _run_script(monkeypatch, argv)
    runs = json.loads((out / "results.json").read_text())["runs"]
    smora, lora = runs["smora"], runs["lora"]
    assert smora["peft_config"]["peft_type"] == "SMORA" and smora["peft_config"]["activate_r"] == 2
    assert not smora["aux_loss"] and len(smora["expert_load_max_ratio"]) == 3
    rank_counts = list(smora["expert_counts"].values())
    assert len(rank_counts) == 7 * 2 and all(len(c) == 8 for c in rank_counts)  # 7 targeted Linears x 2 layers
    assert abs(lora["trainable_parameters"] - smora["trainable_parameters"]) < 0.1 * smora["trainable_parameters"]
    # The selection bias moved once per optimizer step: 3 steps of 1e-5 at most, and not all zero.
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out / "smora")
    biases = torch.cat([b.flatten() for n, b in reloaded.named_buffers() if n.endswith("selection_bias")])
    assert biases.abs().max().item() == pytest.approx(3e-5, rel=1e-3) and biases.abs().min() <= 1e-5 + 1e-9
