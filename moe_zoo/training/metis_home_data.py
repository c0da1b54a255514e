"""Mixed thinking / non-thinking SFT data for Metis-HOME, and the collator that feeds it to the model.

A sample is a question, a response in Metis-HOME's format (``<think>reasoning</think><answer>...</answer>``, or an
empty think block on the non-thinking branch) and its branch label. Every sample is checked against its branch
before training (:func:`validate_examples`), so broken think tags fail with the sample's index.

:func:`demo_mix` builds the offline demo's data from the ``lm_eval`` wheel (``pip install --no-deps lm_eval``):
thinking samples are the GSM8K and MMLU chain-of-thought few-shot pairs (the reasoning goes in the think block, the
"The answer is ..." sentence becomes the answer), non-thinking samples are BIG-Bench-Hard's direct-answer few-shot
pairs (short answers with no reasoning).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..modeling.metis_home.configuration_metis_home import NON_THINKING, THINKING
from ..modeling.metis_home.think_format import MalformedThinkTagsError, format_response, validate_response
from .instruction_mix import bbh_examples, gsm8k_examples, lm_eval_tasks_dir, mmlu_examples
from .stage_utils import IGNORE_INDEX, chat_segments, pad_right

_FINAL_ANSWER = re.compile(r"^(?P<reasoning>.*?)\s*(?:So the|the|The) answer is:?\s*(?P<answer>.+?)\.?\s*$", re.DOTALL)


@dataclass(frozen=True)
class BranchedExample:
    """One SFT sample: ``question``, its formatted ``response``, its ``branch``, the bare ``answer`` (for rewards and
    grading), and ``family`` / ``task`` (the task type the demo reports the thinking ratio of)."""

    family: str
    task: str
    question: str
    response: str
    branch: str
    answer: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.response}]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:1]


def split_worked_answer(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a chain-of-thought answer ending "... The answer is X."; ``ValueError`` without
    such an ending."""
    match = _FINAL_ANSWER.match(text.strip())
    if match is None or not match["reasoning"].strip():
        raise ValueError(f"No reasoning followed by 'The answer is ...' in {text[:80]!r}.")
    return match["reasoning"].strip(), match["answer"].strip()


def thinking_examples() -> list[BranchedExample]:
    """GSM8K and MMLU chain-of-thought pairs as thinking samples."""
    tasks_dir = lm_eval_tasks_dir()
    examples = []
    for source in gsm8k_examples(tasks_dir) + mmlu_examples(tasks_dir):
        reasoning, answer = split_worked_answer(source.answer)
        response = format_response(answer, reasoning)
        examples.append(BranchedExample(source.family, source.task, source.question, response, THINKING, answer))
    return examples


def direct_examples() -> list[BranchedExample]:
    """BIG-Bench-Hard's direct-answer few-shot pairs as non-thinking samples."""
    return [
        BranchedExample("bbh", s.task, s.question, format_response(s.answer), NON_THINKING, s.answer)
        for s in bbh_examples(lm_eval_tasks_dir(), variant="fewshot")
    ]


def balanced(examples: Sequence[BranchedExample]) -> list[BranchedExample]:
    """As many samples of each branch as the rarest branch has (the paper's 1:1 mix), taken round-robin over each
    branch's task families and, within a family, over its tasks, so that every family and task keeps a share."""
    by_branch: dict[str, dict[str, list[BranchedExample]]] = defaultdict(lambda: defaultdict(list))
    for example in examples:
        by_branch[example.branch][example.family].append(example)
    size = min(sum(len(group) for group in families.values()) for families in by_branch.values())
    kept = []
    for families in by_branch.values():
        queues = [_round_robin(group, key=lambda e: e.task) for group in families.values()]
        kept += _round_robin_merge(queues, size)
    return kept


def _round_robin(examples: Sequence[BranchedExample], key) -> list[BranchedExample]:
    groups: dict[str, list[BranchedExample]] = defaultdict(list)
    for example in examples:
        groups[key(example)].append(example)
    return _round_robin_merge(list(groups.values()), len(examples))


def _round_robin_merge(queues: list[list], size: int) -> list:
    queues, picked = [list(q) for q in queues], []
    while len(picked) < size and any(queues):
        for queue in queues:
            if queue and len(picked) < size:
                picked.append(queue.pop(0))
    return picked


def demo_mix(keep=None) -> list[BranchedExample]:
    """The demo's balanced mix: GSM8K + MMLU thinking samples and as many BBH direct-answer samples, of those that
    ``keep`` accepts (e.g. :meth:`MetisHomeCollator.fits`; all by default)."""
    examples = [e for e in thinking_examples() + direct_examples() if keep is None or keep(e)]
    return balanced(examples)


def validate_examples(examples: Sequence[BranchedExample], branch_names: Sequence[str]) -> None:
    """Check every sample's branch and think tags; the error names the first bad sample by index."""
    for index, example in enumerate(examples):
        if example.branch not in branch_names:
            raise ValueError(
                f"Sample {index} has branch {example.branch!r}; the model's branches are {list(branch_names)}."
            )
        validate_response(example.response, example.branch, where=f"sample {index} ({example.family}/{example.task})")


def load_examples(path: str | Path) -> list[BranchedExample]:
    """Samples from a JSON-lines file, one object per line with ``question``, ``response`` and ``branch`` (and
    optionally ``answer``, ``family``, ``task``); the answer defaults to the response's answer block."""
    from ..modeling.metis_home.think_format import parse_response

    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"question", "response", "branch"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number} lacks {sorted(missing)}; each line needs question, response, branch.")
        try:
            answer = row.get("answer") or parse_response(row["response"]).answer
        except MalformedThinkTagsError as error:
            raise MalformedThinkTagsError(f"{path}:{number}: {error}") from None
        family = row.get("family", row["branch"])
        examples.append(
            BranchedExample(family, row.get("task", family), row["question"], row["response"], row["branch"], answer)
        )
    return examples


def save_examples(examples: Sequence[BranchedExample], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))


class MetisHomeCollator:
    """Batches of :class:`BranchedExample` for Metis-HOME's SFT: chat-template ids, labels on the response only,
    ``prompt_mask`` (the query up to and including the generation prompt, what the router pools) and
    ``branch_labels``. Sequences are cut at ``max_length``; a prompt that does not fit raises ``ValueError``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, branch_names: Sequence[str], max_length: int = 512):
        self.tokenizer = tokenizer
        self.branch_names = list(branch_names)
        self.max_length = max_length

    def encode(self, example: BranchedExample) -> tuple[list[int], list[int], int]:
        """``(input_ids, labels, prompt_length)`` of one sample."""
        ids, labels, prompt_length = [], [], None
        for text, supervised in chat_segments(self.tokenizer.apply_chat_template, example.messages):
            if supervised and prompt_length is None:
                prompt_length = len(ids)
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        if prompt_length >= self.max_length:
            raise ValueError(
                f"A {example.family}/{example.task} prompt has {prompt_length} tokens, max_length={self.max_length} "
                "leaves no room for its response; raise max_length."
            )
        return ids[: self.max_length], labels[: self.max_length], prompt_length

    def fits(self, example: BranchedExample) -> bool:
        """Whether the whole sample (prompt and response) fits in ``max_length`` tokens, uncut."""
        return (
            sum(
                len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                for text, _ in chat_segments(self.tokenizer.apply_chat_template, example.messages)
            )
            <= self.max_length
        )

    def __call__(self, examples: Sequence[BranchedExample]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(example) for example in examples]
        batch = pad_right([(ids, labels) for ids, labels, _ in encoded], self.tokenizer.pad_token_id)
        prompt_mask = torch.zeros_like(batch["attention_mask"])
        for row, (_, _, prompt_length) in enumerate(encoded):
            prompt_mask[row, :prompt_length] = 1
        batch["prompt_mask"] = prompt_mask
        batch["branch_labels"] = torch.tensor([self.branch_names.index(e.branch) for e in examples], dtype=torch.long)
        return batch


def prompt_batch(tokenizer: PreTrainedTokenizerBase, examples: Sequence[BranchedExample]) -> dict[str, torch.Tensor]:
    """Left-padded generation prompts (``input_ids``, ``attention_mask``) of ``examples``, as ``generate`` and
    :meth:`~moe_zoo.MetisHomeForConditionalGeneration.route` take them."""
    prompts = [
        tokenizer.apply_chat_template(e.prompt_messages, add_generation_prompt=True, tokenize=False) for e in examples
    ]
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = torch.tensor(r)
        attention_mask[i, length - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = [
    "BranchedExample",
    "MetisHomeCollator",
    "balanced",
    "demo_mix",
    "direct_examples",
    "load_examples",
    "prompt_batch",
    "save_examples",
    "split_worked_answer",
    "thinking_examples",
    "validate_examples",
]
