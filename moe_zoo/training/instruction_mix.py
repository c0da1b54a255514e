"""A multi-task instruction mix built from data that ships inside the ``lm_eval`` wheel (no network).

``pip install --no-deps lm_eval==0.4.13`` (9 MB; only its task files are read, never its code) gives three task
families with worked, chain-of-thought answers:

- ``mmlu``: ``tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``, 57 subjects, about 280 multiple-choice questions;
- ``bbh``: ``tasks/bbh/cot_fewshot/*.yaml`` (``fewshot_config.samples``), 27 BIG-Bench-Hard tasks, 3 each;
- ``gsm8k``: ``tasks/gsm8k/gsm8k-cot.yaml`` (``fewshot_config.samples``), 8 grade-school maths problems.

Every example becomes a two-turn chat (the question, then the worked answer). :func:`split_heldout` holds out a
fixed share of every sub-task, so the held-out loss covers all of them.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

LM_EVAL_REQUIREMENT = "lm_eval==0.4.13"
TASK_FAMILIES = ("mmlu", "bbh", "gsm8k")


@dataclass(frozen=True)
class InstructionExample:
    """One question with its worked answer; ``family`` is mmlu / bbh / gsm8k, ``task`` the sub-task."""

    family: str
    task: str
    question: str
    answer: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def lm_eval_tasks_dir() -> Path:
    """The ``tasks`` folder of the installed ``lm_eval`` wheel, or an ``ImportError`` saying how to get it."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The instruction mix reads task files shipped in the lm_eval wheel, which is not installed: "
            f"`pip install --no-deps {LM_EVAL_REQUIREMENT}` (no dependencies needed)."
        )
    return Path(spec.origin).parent / "tasks"


class _TagTolerantLoader(yaml.SafeLoader):
    """lm_eval's YAML uses ``!function`` tags for Python hooks; we only read data, so tags load as plain values."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _fewshot_samples(path: Path) -> list[dict]:
    config = yaml.load(path.read_text(), Loader=_TagTolerantLoader) or {}
    return list((config.get("fewshot_config") or {}).get("samples") or [])


_MMLU_QUESTION = re.compile(r"(?:^|\n\n)Q: ")


def mmlu_examples(tasks_dir: Path) -> list[InstructionExample]:
    """MMLU's chain-of-thought few-shot pairs: each subject's prompt is a header then ``Q: ...\\nA: ...`` blocks."""
    prompts = json.loads((tasks_dir / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json").read_text())
    examples = []
    for subject, prompt in sorted(prompts.items()):
        for block in _MMLU_QUESTION.split(prompt)[1:]:
            question, separator, answer = block.partition("\nA: ")
            if separator and question.strip() and answer.strip():
                examples.append(InstructionExample("mmlu", subject, question.strip(), answer.strip()))
    return examples


def bbh_examples(tasks_dir: Path, variant: str = "cot_fewshot") -> list[InstructionExample]:
    """BIG-Bench-Hard's few-shot samples, with each task's description as the instruction: worked
    (``variant="cot_fewshot"``) or direct, answer-only (``"fewshot"``) answers."""
    examples = []
    for path in sorted((tasks_dir / "bbh" / variant).glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=_TagTolerantLoader) or {}
        description = str(config.get("description", "")).strip()
        for sample in _fewshot_samples(path):
            question = f"{description}\n\n{sample['input']}".strip()
            examples.append(InstructionExample("bbh", path.stem, question, str(sample["target"]).strip()))
    return examples


def gsm8k_examples(tasks_dir: Path) -> list[InstructionExample]:
    """GSM8K's eight chain-of-thought samples."""
    samples = _fewshot_samples(tasks_dir / "gsm8k" / "gsm8k-cot.yaml")
    return [InstructionExample("gsm8k", "gsm8k", s["question"].strip(), str(s["target"]).strip()) for s in samples]


def instruction_mix(families: Sequence[str] = TASK_FAMILIES) -> list[InstructionExample]:
    """All examples of the chosen task families, in a fixed order."""
    unknown = sorted(set(families) - set(TASK_FAMILIES))
    if unknown:
        raise ValueError(f"Unknown task families {unknown}; choose from {TASK_FAMILIES}.")
    tasks_dir = lm_eval_tasks_dir()
    builders = {"mmlu": mmlu_examples, "bbh": bbh_examples, "gsm8k": gsm8k_examples}
    examples = [example for family in families for example in builders[family](tasks_dir)]
    if not examples:
        raise ValueError(f"No examples found under {tasks_dir}; is {LM_EVAL_REQUIREMENT} installed?")
    return examples


def split_heldout(
    examples: Sequence[InstructionExample], every: int = 5
) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """``(train, heldout)``: every ``every``-th example of each sub-task is held out (a sub-task with fewer than
    ``every`` examples gives its last one), so every sub-task is seen in training and measured after it."""
    if every < 2:
        raise ValueError(f"every must be >= 2 (one held-out example per `every`), got {every}.")
    by_task: dict[tuple[str, str], list[InstructionExample]] = defaultdict(list)
    for example in examples:
        by_task[(example.family, example.task)].append(example)
    train, heldout = [], []
    for group in by_task.values():
        held = {i for i in range(len(group)) if i % every == every - 1} or {len(group) - 1}
        if len(group) == 1:
            held = set()
        for i, example in enumerate(group):
            (heldout if i in held else train).append(example)
    return train, heldout
