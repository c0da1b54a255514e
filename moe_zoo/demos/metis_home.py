"""Metis-HOME end to end, offline on a CPU in minutes (``moe-zoo metis-home-demo``).

What it does (every step runs through the library's public functions):

1. **Data.** Thinking samples are the GSM8K and MMLU chain-of-thought few-shot pairs inside the ``lm_eval`` wheel
   (reasoning in ``<think>``, "The answer is X" as the answer); non-thinking samples are BIG-Bench-Hard's
   direct-answer pairs (an empty think block). The mix is 1:1, as in the paper, and every fifth sample of each task
   is held out (:mod:`moe_zoo.training.metis_home_data`).
2. **Expansion.** SmolLM2-135M-Instruct becomes Metis-HOME: every FFN is copied into a thinking and a non-thinking
   branch, and a router reads the prompt at the middle layer (:func:`~moe_zoo.expand_to_metis_home`).
3. **SFT.** The Trainer trains each sample's own branch and the router on the branch labels, ``loss = lm_loss +
   router_loss`` (:mod:`moe_zoo.training.metis_home`). The optional RL stage is off here (SmolLM2 never writes the
   think format unprompted, so both rewards would be 0 and GRPO would have nothing to learn from).
4. **Report.** The saved model is reloaded (identical logits and branch decisions), the router's held-out accuracy
   at choosing the branch and the thinking ratio per task type are printed, and one held-out query of each type is
   answered with ``generate``, on the branch the router chose.

Step counts are cut to fit a 2-core CPU (24 steps of 8 samples, about 5 minutes in all), with a constant schedule
and a router learning rate of 1e-2: a decaying schedule would stop the fresh router before it has learned.
What it shows, and what it does not: the router learns to send the reasoning tasks (GSM8K, MMLU) to the thinking
branch and the direct-answer task (BBH) to the non-thinking one; 24 steps do not teach SmolLM2 to reason, so the
answers it prints show the format and the branch, not good reasoning.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from ..atomic_io import atomic_write_text
from ..modeling.metis_home import MetisHomeForConditionalGeneration
from ..training.instruction_mix import split_heldout
from ..training.metis_home import MetisHomeArguments, evaluate_routing, run
from ..training.metis_home_data import MetisHomeCollator, demo_mix, prompt_batch
from . import check

DEFAULT_OUTPUT_DIR = "outputs/metis-home-demo"


@dataclass
class DemoSettings:
    """Everything the demo can vary; the defaults take about 5 minutes on 2 CPU cores."""

    output_dir: str = DEFAULT_OUTPUT_DIR
    steps: int = 24
    batch_size: int = 8
    learning_rate: float = 2e-5
    router_learning_rate: float = 1e-2
    router_layer: int | None = None
    max_length: int = 320
    max_new_tokens: int = 48
    seed: int = 0
    require_above_majority: bool = True
    """Fail unless the router's held-out accuracy beats always choosing the commoner branch (off only for smoke
    runs of a step or two)."""


@dataclass
class DemoResult:
    results: dict
    answers: list[dict]
    seconds: float


def _training_arguments(settings: DemoSettings) -> TrainingArguments:
    return TrainingArguments(
        output_dir=settings.output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, settings.steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=settings.seed,
        disable_tqdm=True,
    )


def _print_routing(title: str, routing: dict) -> None:
    print(
        f"  {title}: router accuracy {routing['router_accuracy']:.1%} over {routing['count']} held-out queries "
        f"(always the commoner branch: {routing['majority_baseline']:.1%})"
    )
    for family, stats in routing["by_family"].items():
        label = "/".join(stats["labelled_branch"])
        print(f"    {family:6s} ({label} data): thinking ratio {stats['thinking_ratio']:.1%} of {stats['count']}")


def run_metis_home_demo(settings: DemoSettings | None = None) -> DemoResult:
    """Expand SmolLM2 into Metis-HOME, SFT it on the offline mix, check reloading, report routing and answer one
    query per task type. Raises :class:`~moe_zoo.demos.DemoCheckError` when a check fails."""
    settings = settings or DemoSettings()
    start = time.perf_counter()
    root = Path(settings.output_dir)
    print("[1/4] Data: GSM8K + MMLU chain-of-thought (thinking) and BIG-Bench-Hard direct answers (non-thinking)")
    arguments = MetisHomeArguments(
        max_length=settings.max_length,
        router_layer=settings.router_layer,
        router_learning_rate=settings.router_learning_rate,
        router_seed=settings.seed,
    )
    print(f"[2/4] Expanding SmolLM2-135M-Instruct and training {settings.steps} steps of {settings.batch_size}")
    results, trained = run(arguments, _training_arguments(settings))
    print(f"  {results['train_samples']} training samples; router at layer {results['router_layer']}")
    _print_routing("at expansion", results["heldout_routing_at_expansion"])
    _print_routing("after SFT", results["heldout_routing"])

    print("[3/4] Reloading with AutoModelForCausalLM: identical logits and branch decisions")
    tokenizer = AutoTokenizer.from_pretrained(root / "metis_home")
    reloaded = AutoModelForCausalLM.from_pretrained(root / "metis_home").eval()
    check(isinstance(reloaded, MetisHomeForConditionalGeneration), f"reloaded a {type(reloaded).__name__}")
    _, heldout = split_heldout(demo_mix(MetisHomeCollator(tokenizer, reloaded.branch_names, settings.max_length).fits))
    probe = prompt_batch(tokenizer, heldout[:4])
    with torch.no_grad():
        before, after = trained.eval()(**probe), reloaded(**probe)
    check(torch.equal(before.logits, after.logits), "the reloaded model's logits differ from the trained model's")
    check(torch.equal(before.branch, after.branch), "the reloaded model picks other branches than the trained one")
    again = evaluate_routing(reloaded, tokenizer, heldout)
    check(again == results["heldout_routing"], "the reloaded model routes the held-out queries differently")
    if settings.require_above_majority:
        routing = results["heldout_routing"]
        check(
            routing["router_accuracy"] > routing["majority_baseline"],
            f"held-out router accuracy {routing['router_accuracy']:.1%} does not beat the majority baseline "
            f"{routing['majority_baseline']:.1%}",
        )

    print("[4/4] One held-out query per task type, answered on the branch the router picks")
    answers, thinking = [], reloaded.config.branch_index("thinking")
    for family in ("gsm8k", "mmlu", "bbh"):
        example = next(e for e in heldout if e.family == family)
        batch = prompt_batch(tokenizer, [example])
        decision = reloaded.route(**batch)
        generated = reloaded.generate(
            **batch, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        text = tokenizer.decode(generated[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        forced = reloaded.generate(**batch, branch=decision.names[0], max_new_tokens=settings.max_new_tokens,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        check(torch.equal(generated, forced), "generate did not stay on the branch the router chose")
        answers.append({"family": family, "question": example.question[:200], "branch": decision.names[0],
                        "thinking_probability": round(decision.probabilities[0, thinking].item(), 4), "answer": text})  # fmt: skip
        print(f"  {family} -> {decision.names[0]} (p={answers[-1]['thinking_probability']:.2f}): {text[:160]!r}")
    seconds = time.perf_counter() - start
    summary = {"settings": asdict(settings), "seconds": round(seconds, 1), "answers": answers, **results}
    atomic_write_text(root / "demo_results.json", json.dumps(summary, indent=2))
    print(f"Done in {seconds / 60:.1f} min; results in {root / 'demo_results.json'}")
    return DemoResult(results, answers, seconds)


__all__ = ["DEFAULT_OUTPUT_DIR", "DemoResult", "DemoSettings", "run_metis_home_demo"]
