"""Metis-HOME training: the mixed thinking / non-thinking data and its checks, the collator, the rewards, the SFT
Trainer (router learning rate, logged losses, resume), the GRPO stage on the dense model, and the script."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import moe_zoo
from moe_zoo.modeling.metis_home import MalformedThinkTagsError, format_response
from moe_zoo.training.instruction_mix import split_heldout
from moe_zoo.training.metis_home import (
    MetisHomeArguments,
    accuracy_reward,
    evaluate_routing,
    format_reward,
    run,
    run_rl_stage,
    run_sft_stage,
)
from moe_zoo.training.metis_home_data import (
    BranchedExample,
    MetisHomeCollator,
    demo_mix,
    direct_examples,
    load_examples,
    save_examples,
    split_worked_answer,
    thinking_examples,
    validate_examples,
)

BRANCHES = ["non_thinking", "thinking"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_tiny_llm):
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _args(**overrides) -> TrainingArguments:
    values = dict(
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return TrainingArguments(**(values | overrides))


def test_the_demo_mix_is_balanced_and_every_response_follows_its_branch_format():
    thinking, direct = thinking_examples(), direct_examples()
    assert {e.family for e in thinking} == {"gsm8k", "mmlu"} and len(thinking) == 290
    assert {e.family for e in direct} == {"bbh"} and len(direct) == 81
    validate_examples(thinking + direct, BRANCHES)  # the thinking ones reason, the direct ones have an empty think
    gsm = next(e for e in thinking if e.family == "gsm8k")
    assert gsm.response.startswith("<think>There are 15 trees") and gsm.response.endswith("<answer>6</answer>")
    mix = demo_mix()
    counts = Counter(e.branch for e in mix)
    assert counts["thinking"] == counts["non_thinking"] == 81
    assert Counter(e.family for e in mix)["gsm8k"] == 8  # every family keeps its share in the 1:1 mix
    assert split_worked_answer("2 + 2 = 4. So the answer is 4.") == ("2 + 2 = 4.", "4")
    with pytest.raises(ValueError, match="No reasoning followed by 'The answer is"):
        split_worked_answer("Just 4.")


def test_malformed_think_tags_and_unknown_branches_in_data_are_refused(tmp_path):
    good = BranchedExample("x", "x", "q?", format_response("4", "2+2"), "thinking", "4")
    no_reasoning = BranchedExample("bbh", "dates", "q?", format_response("4"), "thinking", "4")
    with pytest.raises(MalformedThinkTagsError, match=r"sample 1 \(bbh/dates\): a thinking sample needs reasoning"):
        validate_examples([good, no_reasoning], BRANCHES)
    unknown = BranchedExample("x", "x", "q?", format_response("4"), "fast", "4")
    with pytest.raises(ValueError, match=r"Sample 0 has branch 'fast'; the model's branches are"):
        validate_examples([unknown], BRANCHES)
    path = tmp_path / "mix.jsonl"
    save_examples([good], path)
    assert load_examples(path) == [good]
    path.write_text(json.dumps({"question": "q", "response": "<think>x</think>4", "branch": "thinking"}) + "\n")
    with pytest.raises(MalformedThinkTagsError, match=r"mix.jsonl:1: Expected each of"):
        load_examples(path)
    path.write_text(json.dumps({"question": "q", "branch": "thinking"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks \['response'\]"):
        load_examples(path)


def test_the_collator_supervises_the_response_and_marks_the_generation_prompt(tokenizer):
    examples = [e for e in demo_mix() if e.family in ("gsm8k", "bbh")][:3]
    collator = MetisHomeCollator(tokenizer, BRANCHES, max_length=512)
    batch = collator(examples)
    assert batch["branch_labels"].tolist() == [BRANCHES.index(e.branch) for e in examples]
    for row, example in enumerate(examples):
        prompt = tokenizer.apply_chat_template(example.prompt_messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = batch["input_ids"][row][batch["prompt_mask"][row].bool()]
        assert tokenizer.decode(prompt_ids) == prompt  # what the router pools is exactly the generation prompt
        supervised = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(supervised).startswith(example.response)
        assert not (batch["prompt_mask"][row].bool() & (batch["labels"][row] != -100)).any()
    with pytest.raises(ValueError, match="leaves no room for its response; raise max_length"):
        MetisHomeCollator(tokenizer, BRANCHES, max_length=20)(examples)


def test_rewards_check_the_format_and_the_answer():
    completions = [
        [{"role": "assistant", "content": "<think>2+2</think><answer>4</answer>"}],
        [{"role": "assistant", "content": "<think></think><answer> 5.</answer>"}],
        [{"role": "assistant", "content": "4"}],
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0]
    assert accuracy_reward(completions, answer=["4", "5", "4"]) == [1.0, 1.0, 0.0]
    assert accuracy_reward(["<think>x</think><answer>(B)</answer>"], answer=["(b)"]) == [1.0]


def test_sft_trains_both_branches_and_the_router_at_its_own_rate_and_resumes(tiny, tokenizer, tmp_path):
    dense = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(0)
    metis = moe_zoo.expand_to_metis_home(dense, router_layer=1)
    before = {n: p.detach().clone() for n, p in metis.named_parameters()}
    examples = demo_mix(MetisHomeCollator(tokenizer, BRANCHES, 256).fits)[::10]
    args = MetisHomeArguments(max_length=256, router_learning_rate=5e-3)
    training_args = _args(output_dir=str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2)
    trainer = run_sft_stage(metis, tokenizer, examples, args, training_args)
    rates = sorted(group["initial_lr"] for group in trainer.optimizer.param_groups)
    assert rates == [2e-5, 5e-3]  # the recipe's 2e-5 for the LLM, the router's own rate
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"router_loss", "lm_loss", "router_accuracy"} <= set(logged[0])
    changed = {n for n, p in metis.named_parameters() if not torch.equal(p, before[n])}
    assert any(".branches.thinking." in n for n in changed) and any(".branches.non_thinking." in n for n in changed)
    assert {"router.fc1.weight", "router.fc2.weight"} <= changed
    # a resumed run continues from the last checkpoint instead of starting over
    resumed = run_sft_stage(
        moe_zoo.expand_to_metis_home(dense, router_layer=1),
        tokenizer,
        examples,
        args,
        _args(
            output_dir=str(tmp_path), max_steps=6, save_strategy="steps", save_steps=2, resume_from_checkpoint="true"
        ),
    )
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert resumed.state.global_step == 6 and steps[-2:] == [5, 6] and 1 not in steps[4:]
    routing = evaluate_routing(metis, tokenizer, examples)
    assert routing["count"] == len(examples) and set(routing["by_family"]) == {e.family for e in examples}
    shares = [routing["by_family"][f]["thinking_ratio"] for f in routing["by_family"]]
    assert all(0.0 <= s <= 1.0 for s in shares)


def test_grpo_stage_runs_on_the_dense_model_with_both_rewards(tiny, tokenizer, tmp_path):
    dense = AutoModelForCausalLM.from_pretrained(tiny)
    examples = [e for e in thinking_examples() if e.family == "gsm8k"][:2]
    args = MetisHomeArguments(rl_steps=1, rl_num_generations=2, rl_max_completion_length=6)
    trainer = run_rl_stage(dense, tokenizer, examples, args, _args(output_dir=str(tmp_path)))
    assert type(trainer.model).__name__ == "LlamaForCausalLM"  # RL runs on the dense model, before expansion
    assert trainer.args.loss_type == "dapo" and (trainer.args.epsilon, trainer.args.epsilon_high) == (0.2, 0.28)
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"rewards/format_reward/mean", "rewards/accuracy_reward/mean"} <= logged
    assert trainer.state.global_step == 1


def test_the_script_runs_the_pipeline_and_its_model_loads_back(tiny, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "training_scripts" / "train_metis_home.py"),
        "--model_path", str(tiny), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--max_length", "256", "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--router_layer", "1",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "held-out router accuracy" in completed.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["sft_steps"] == 2 and results["router_layer"] == 1
    assert set(results["heldout_routing"]["by_family"]) == {"bbh", "gsm8k", "mmlu"}
    model = AutoModelForCausalLM.from_pretrained(out / "metis_home")
    assert isinstance(model, moe_zoo.MetisHomeForConditionalGeneration)
    tokenizer = AutoTokenizer.from_pretrained(out / "metis_home")
    _, heldout = split_heldout(demo_mix(MetisHomeCollator(tokenizer, BRANCHES, 256).fits))
    assert evaluate_routing(model, tokenizer, heldout) == results["heldout_routing"]


def test_run_refuses_data_with_broken_think_tags_before_training(tiny, tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [
        {"question": "2+2?", "response": "<think>2+2=4</think><answer>4</answer>", "branch": "thinking"},
        {
            "question": "Capital of France?",
            "response": "<think>hmm</think><answer>Paris</answer>",
            "branch": "non_thinking",
        },
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MalformedThinkTagsError, match="sample 1 .*must have an empty think block"):
        run(MetisHomeArguments(model_path=str(tiny), data_path=str(data)), _args(output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o" / "sft").exists()


def test_a_resumed_run_skips_a_finished_rl_stage_and_continues_sft(tiny, tmp_path, monkeypatch):
    import moe_zoo.training.metis_home as pipeline

    args = MetisHomeArguments(
        model_path=str(tiny), max_length=256, router_layer=1, rl_steps=1, rl_num_generations=2,
        rl_max_completion_length=4,
    )  # fmt: skip
    first = _args(output_dir=str(tmp_path), max_steps=2, save_strategy="steps", save_steps=2)
    results, _ = run(args, first)
    assert results["sft_steps"] == 2 and (tmp_path / "rl" / "model" / "config.json").is_file()
    first_log = results["log_history"]

    def refuse(*_, **__):
        raise AssertionError("the finished RL stage ran again")

    monkeypatch.setattr(pipeline, "run_rl_stage", refuse)
    more = _args(
        output_dir=str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2, resume_from_checkpoint="true"
    )
    results, _ = run(args, more)
    assert results["sft_steps"] == 4
    # SFT went on from the step-2 checkpoint: its first two log entries are the first run's, restored
    assert [entry["step"] for entry in results["log_history"]] == [1, 2, 3, 4]
    assert results["log_history"][:2] == first_log
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "metis_home").config.model_type == "metis_home"
    card = ModelCard.load(tmp_path / "metis_home" / "README.md")  # the card lists the stages run and the router's score
    assert "RL" in card.text and "SFT" in card.text
    routing = card.data.eval_results[0]
    assert routing.metric_type == "accuracy" and routing.metric_value == results["heldout_routing"]["router_accuracy"]


def test_the_text_generation_pipeline_runs_on_the_routed_branch(tiny, tokenizer):
    from transformers import pipeline

    torch.manual_seed(0)
    metis = moe_zoo.expand_to_metis_home(AutoModelForCausalLM.from_pretrained(tiny), router_layer=1).eval()
    chat = [{"role": "user", "content": "What is 2+2?"}]
    generated = pipeline("text-generation", model=metis, tokenizer=tokenizer)(chat, max_new_tokens=5, do_sample=False)
    answer = generated[0]["generated_text"][-1]["content"]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = metis.generate(**inputs, max_new_tokens=5, do_sample=False)  # routed, as the pipeline's call
    assert answer == tokenizer.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
