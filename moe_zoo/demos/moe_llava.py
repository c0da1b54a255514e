"""The moe_zoo main job: MoE-LLaVA's three-stage MoE-tuning, end to end, offline on a CPU in minutes.

What it does (``moe-zoo demo``; every step runs through the library's public functions):

1. **Assets.** The digits vision tower (a CLIP tower the project trains itself on scikit-learn's digits, once, in
   about half a minute; :func:`moe_zoo.vision_tower.digits_vision_tower_path`) and SmolLM2-135M-Instruct (shipped
   as a pip package; :func:`moe_zoo.assets.smollm2_path`).
2. **Stage I** (:func:`moe_zoo.training.moe_tuning.run_stage`): tower + SmolLM2 + a fresh projector; only the
   projector trains, on digit "captions" in LLaVA's ``plain`` format (``<image>3\\n``).
3. **Stage II**: the LLM and the projector train on question-answer pairs about the digits in the original's
   conversation template: "What digit is shown in the image?" -> "3", "Is the digit even or odd?" -> "odd",
   "Is this the digit 5?" -> "no" (:func:`moe_zoo.training.image_qa.digit_qa_examples`).
4. **Stage III**: stage II's model is upcycled (4 experts, top-2, every other layer, as the paper) and shown to
   compute stage II's function, then its FFNs, routers and projector train on the same kind of data, with the
   router loss.
5. After each stage, greedy answers to held-out questions (images that neither the tower nor any stage saw) are
   graded (:func:`moe_zoo.training.image_qa.answer_is_correct`); chance is 10% for digits, 50% for the others.
6. The stage-III checkpoint is reloaded with ``AutoModelForImageTextToText`` / ``AutoProcessor`` (identical
   logits), and the routing of its image tokens over held-out images is plotted per MoE layer and digit class.

The learning rates are the original's (1e-3, 2e-5, 2e-5); the step counts of :class:`DemoSettings` are cut to fit a
2-core CPU (about 6 minutes there; MoE-tuning proper runs for an epoch over hundreds of thousands of examples), with
a constant rate after two warmup steps, since a decaying one would stop a run of a few dozen steps early.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from ..assets import smollm2_path
from ..atomic_io import atomic_write_text
from ..modeling.moe_llava import MoeLlavaForConditionalGeneration, MoeLlavaProcessor, upcycle_moe_llava
from ..modeling.upcycled_moe import max_logit_difference
from ..training.expert_load import expert_load_by_label, plot_expert_load
from ..training.image_qa import QUESTION_KINDS, answer_is_correct, digit_conversations, digit_qa_examples
from ..training.moe_tuning import MoeLlavaCollator, MoeTuningArguments, answer_questions, run_stage
from ..vision_tower import NUM_CLASSES, digits_vision_tower_path
from . import check
from .upcycling import FLOAT64_TOLERANCE

DEFAULT_OUTPUT_DIR = "outputs/moe-llava-demo"
CHANCE = {"digit": 0.1, "parity": 0.5, "yes_no": 0.5}
"""Accuracy of guessing, per question kind."""


@dataclass
class StageSettings:
    """How long and how fast one stage trains."""

    steps: int
    batch_size: int
    learning_rate: float


@dataclass
class DemoSettings:
    """Everything the demo can vary; the defaults take about 6 minutes on 2 CPU cores."""

    output_dir: str = DEFAULT_OUTPUT_DIR
    stage1: StageSettings = field(default_factory=lambda: StageSettings(steps=50, batch_size=16, learning_rate=1e-3))
    stage2: StageSettings = field(default_factory=lambda: StageSettings(steps=20, batch_size=4, learning_rate=2e-5))
    stage3: StageSettings = field(default_factory=lambda: StageSettings(steps=20, batch_size=4, learning_rate=2e-5))
    num_experts: int = 4
    top_k: int = 2
    moe_layers: str | list[int] = "sparse"
    eval_examples: int = 60
    """Held-out questions asked after each stage (the three kinds in equal shares)."""
    load_images: int = 100
    """Held-out images whose routing the expert-load plot shows."""
    seed: int = 0
    require_above_chance: bool = True
    """Fail unless stage III's held-out accuracy beats chance (off only for smoke runs of a few steps)."""

    def stage(self, number: int) -> StageSettings:
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}[number]


@dataclass
class StageReport:
    """One stage's training and held-out evaluation."""

    stage: int
    output_dir: str
    steps: int
    train_seconds: float
    final_train_loss: float
    accuracy: float
    """Held-out question answering, all kinds (stage I: digit captions in the ``plain`` format it trained on)."""
    accuracy_by_kind: dict[str, float]
    eval_examples: int


@dataclass
class DemoResult:
    """What :func:`run_moe_llava_demo` measured; also written to ``output_dir/results.json``."""

    output_dir: str
    stages: list[StageReport]
    upcycling_max_logit_difference: float
    """Stage II vs. the freshly upcycled model, float32."""
    upcycling_float64_max_logit_difference: float
    reload_max_logit_difference: float
    plot: str
    total_seconds: float
    chance_accuracy: float = sum(CHANCE.values()) / len(CHANCE)


# --- evaluation ------------------------------------------------------------------------------------------------------


def heldout_questions(count: int, seed: int, kinds: tuple[str, ...] = QUESTION_KINDS) -> list[dict]:
    """``count`` held-out questions, the ``kinds`` in equal shares (each a seeded shuffle of the held-out images)."""
    per_kind = -(-count // len(kinds))
    chosen = [e for kind in kinds for e in digit_qa_examples("heldout", seed, kinds=(kind,))[:per_kind]]
    return chosen[:count]


def grade(
    model: MoeLlavaForConditionalGeneration, processor: MoeLlavaProcessor, examples: list[dict], conversation: str
) -> tuple[float, dict[str, float]]:
    """Held-out accuracy of ``model``'s greedy answers, overall and per question kind."""
    start = time.perf_counter()
    answers = answer_questions(model, processor, examples, max_new_tokens=4, batch_size=16, conversation=conversation)
    right = [answer_is_correct(answer, example) for answer, example in zip(answers, examples, strict=True)]
    by_kind = {}
    for kind in dict.fromkeys(e["kind"] for e in examples):
        marks = [r for r, e in zip(right, examples, strict=True) if e["kind"] == kind]
        by_kind[kind] = sum(marks) / len(marks)
    print(f"  graded {len(examples)} held-out answers in {time.perf_counter() - start:.0f} s")
    return sum(right) / len(right), by_kind


def _batch(processor: MoeLlavaProcessor, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Prompts of ``examples`` (chat template) with their images, left-padded, ready for the model."""
    collator = MoeLlavaCollator(processor)
    padding_side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    try:
        prompts = [collator.prompt(example) for example in examples]
        return dict(processor(images=[e["image"] for e in examples], text=prompts, return_tensors="pt", padding=True))
    finally:
        processor.tokenizer.padding_side = padding_side


@torch.no_grad()
def _logits(model: MoeLlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch, output_router_logits=False).logits.float()


def upcycling_differences(
    dense: MoeLlavaForConditionalGeneration, inputs: dict[str, torch.Tensor], moe_options: dict, seed: int
) -> tuple[float, float]:
    """Max |logit difference| between ``dense`` and its upcycled MoE on ``inputs``, in float32 and with both models
    in float64. Upcycling is function-preserving, so the float64 difference is rounding-free (~1e-12); the float32
    one is SmolLM2's float32 noise (see :data:`moe_zoo.demos.upcycling.FUNCTION_PRESERVING_RTOL`)."""
    differences = []
    for dtype in (torch.float32, torch.float64):
        reference = copy.deepcopy(dense).to(dtype)
        torch.manual_seed(seed)
        upcycled = upcycle_moe_llava(reference, **moe_options)
        upcycled.set_experts_implementation("eager")  # transformers' grouped kernels take no float64
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        differences.append(max_logit_difference(reference, upcycled, cast))
        del reference, upcycled
    return differences[0], differences[1]


# --- the demo --------------------------------------------------------------------------------------------------------


def _training_arguments(settings: DemoSettings, stage: int, output_dir: Path) -> TrainingArguments:
    own = settings.stage(stage)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=own.steps,
        per_device_train_batch_size=own.batch_size,
        learning_rate=own.learning_rate,
        lr_scheduler_type="constant_with_warmup",  # a few dozen steps: a decaying rate would stop learning early
        warmup_steps=2,
        logging_steps=max(1, own.steps // 4),
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        dataloader_num_workers=0,
    )


def _train(settings: DemoSettings, tuning: MoeTuningArguments, data: list[dict], output_dir: Path):
    start = time.perf_counter()
    trainer = run_stage(tuning, _training_arguments(settings, tuning.stage, output_dir), data)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model, trainer.processing_class, time.perf_counter() - start, losses[-1] if losses else float("nan")


def _report(stage, output_dir, settings, seconds, loss, accuracy, by_kind, count) -> StageReport:
    report = StageReport(stage, str(output_dir), settings.stage(stage).steps, seconds, loss, accuracy, by_kind, count)
    kinds = ", ".join(f"{k} {v:.0%} (chance {CHANCE[k]:.0%})" for k, v in by_kind.items())
    print(f"  stage {stage}: {seconds:.0f} s, last logged loss {loss:.3f}; held-out accuracy {accuracy:.1%}: {kinds}")
    return report


def run_moe_llava_demo(settings: DemoSettings | None = None) -> DemoResult:
    """Run the three MoE-tuning stages on digit QA, grade each, check upcycling and reloading, plot expert load.

    Prints each step and returns the measurements (also saved as ``results.json`` in the output folder); raises
    :class:`~moe_zoo.demos.DemoCheckError` if the upcycled model does not compute stage II's function, the reloaded
    checkpoint differs from the trained model, or the final held-out accuracy is not above chance.
    """
    settings = settings or DemoSettings()
    start = time.perf_counter()
    root = Path(settings.output_dir)
    torch.manual_seed(settings.seed)
    print("[1/6] Assets: the digits vision tower (trained once, cached) and SmolLM2-135M-Instruct")
    tower, language_model = digits_vision_tower_path(), smollm2_path()
    print(f"  vision tower: {tower}\n  language model: {language_model}")
    train_qa = digit_conversations("train", settings.seed)
    questions = heldout_questions(settings.eval_examples, settings.seed)
    captions = heldout_questions(settings.eval_examples, settings.seed, kinds=("digit",))
    moe_options = {"num_experts": settings.num_experts, "top_k": settings.top_k, "moe_layers": settings.moe_layers}
    reports = []

    print("[2/6] Stage I: the projector learns to align the tower with SmolLM2 (digit captions, plain format)")
    stage1 = MoeTuningArguments(stage=1, vision_tower=str(tower), language_model=str(language_model), max_length=64)
    captions_train = digit_qa_examples("train", settings.seed, kinds=("digit",))
    model, processor, seconds, loss = _train(settings, stage1, captions_train, root / "stage1")
    accuracy, by_kind = grade(model, processor, captions, conversation="plain")
    reports.append(_report(1, root / "stage1", settings, seconds, loss, accuracy, by_kind, len(captions)))
    del model

    print("[3/6] Stage II: SmolLM2 and the projector learn to answer questions about the images (chat template)")
    stage2 = MoeTuningArguments(stage=2, init_model=str(root / "stage1"), max_length=128, **moe_options)
    model, processor, seconds, loss = _train(settings, stage2, train_qa, root / "stage2")
    accuracy, by_kind = grade(model, processor, questions, conversation="chat")
    reports.append(_report(2, root / "stage2", settings, seconds, loss, accuracy, by_kind, len(questions)))

    print(
        f"[4/6] Stage III: upcycle to {settings.num_experts} experts (top-{settings.top_k}, moe_layers="
        f"{settings.moe_layers!r}), then train FFNs, routers and projector"
    )
    stage3 = MoeTuningArguments(stage=3, init_model=str(root / "stage2"), max_length=128, **moe_options)
    probe = _batch(processor, questions[:4])
    difference, exact_difference = upcycling_differences(model, probe, stage3.moe_options(), settings.seed)
    print(
        f"  right after upcycling, max |logit difference| to stage II: {difference:.2e} in float32, "
        f"{exact_difference:.1e} when done in float64 (tolerance {FLOAT64_TOLERANCE:.0e})"
    )
    check(
        exact_difference <= FLOAT64_TOLERANCE,
        f"The upcycled model does not compute stage II's function: {exact_difference:.3e} in float64.",
    )
    del model
    trained, processor, seconds, loss = _train(settings, stage3, train_qa, root / "stage3")

    print("[5/6] Reloading stage III with AutoModelForImageTextToText and grading it")
    reloaded = AutoModelForImageTextToText.from_pretrained(root / "stage3")
    reloaded_processor = AutoProcessor.from_pretrained(root / "stage3")
    reload_difference = (_logits(reloaded, probe) - _logits(trained, probe)).abs().max().item()
    check(reload_difference == 0.0, f"The reloaded stage-III model's logits differ by {reload_difference:.3e}.")
    del trained
    accuracy, by_kind = grade(reloaded, reloaded_processor, questions, conversation="chat")
    reports.append(_report(3, root / "stage3", settings, seconds, loss, accuracy, by_kind, len(questions)))
    chance = sum(CHANCE[k] for k in by_kind) / len(by_kind)
    if settings.require_above_chance:
        check(accuracy > chance, f"Stage III's held-out accuracy {accuracy:.1%} is not above chance ({chance:.1%}).")

    print("[6/6] Expert load of the image tokens of held-out images, per MoE layer and digit class")
    images = heldout_questions(settings.load_images, settings.seed, kinds=("digit",))
    load = expert_load_by_label(
        reloaded,
        (_batch(reloaded_processor, [example]) for example in images),
        [example["label"] for example in images],
        NUM_CLASSES,
        token_id=reloaded.config.image_token_id,
    )
    plot = plot_expert_load(
        load,
        [f"digit {d}" for d in range(NUM_CLASSES)],
        root / "expert_load.png",
        layer_names=[f"layer {i}" for i in reloaded.config.moe_layer_indices],
        title=f"MoE-LLaVA on digits: share of image-token assignments per expert ({len(images)} held-out images)",
    )
    result = DemoResult(
        output_dir=str(root),
        stages=reports,
        upcycling_max_logit_difference=difference,
        upcycling_float64_max_logit_difference=exact_difference,
        reload_max_logit_difference=reload_difference,
        plot=str(plot),
        total_seconds=time.perf_counter() - start,
    )
    atomic_write_text(root / "results.json", json.dumps({"settings": asdict(settings), **asdict(result)}, indent=2))
    _print_summary(result)
    return result


def _print_summary(result: DemoResult) -> None:
    print(f"\nDone in {result.total_seconds / 60:.1f} min. Held-out accuracy after each stage:")
    for report in result.stages:
        print(f"  stage {report.stage}: {report.accuracy:.1%}  ({report.output_dir})")
    print(f"Expert-load plot: {result.plot}")
    print(f"Measurements:     {Path(result.output_dir) / 'results.json'}")
    stage3 = result.stages[-1].output_dir
    print(
        "Load the MoE-LLaVA model:\n"
        "  import moe_zoo  # registers MoE-LLaVA with the Auto classes\n"
        "  from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"  model = AutoModelForImageTextToText.from_pretrained({stage3!r})\n"
        f"  processor = AutoProcessor.from_pretrained({stage3!r})"
    )


if __name__ == "__main__":
    from ..cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
