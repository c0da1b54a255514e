"""Question-answer examples about scikit-learn's handwritten digits, for MoE-LLaVA training and evaluation.

Every example is built from one labelled digit image of :func:`moe_zoo.vision_tower.load_digit_images`, on the
split of :func:`moe_zoo.vision_tower.digits_split` (the same split the digits vision tower was trained on, so
``"heldout"`` images were never seen by the tower nor by anything trained on ``"train"`` examples). Three kinds of
questions, each with a few phrasings:

* ``"digit"``: "What digit is shown in the image?" -> ``"3"``
* ``"parity"``: "Is the digit in the image even or odd?" -> ``"odd"``
* ``"yes_no"``: "Is this the digit 5?" -> ``"yes"`` / ``"no"`` (the asked digit is the true one half of the time)

:func:`digit_conversations` puts the questions about one image into one multi-turn conversation, for training.
:func:`answer_is_correct` grades a generated answer leniently, for held-out accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..vision_tower import digit_image, digits_split, load_digit_images

QUESTION_KINDS = ("digit", "parity", "yes_no")
DIGIT_QUESTIONS = (
    "What digit is shown in the image?",
    "Which number is written here?",
    "What is the handwritten digit in this picture?",
    "Read the digit in the image.",
)
PARITY_QUESTIONS = (
    "Is the digit in the image even or odd?",
    "Is the number shown here odd or even?",
)
YES_NO_QUESTIONS = (
    "Is this the digit {digit}?",
    "Does the image show the number {digit}?",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_qa_examples(
    split: Literal["train", "heldout"],
    seed: int = 0,
    kinds: Sequence[str] = QUESTION_KINDS,
) -> list[dict]:
    """One example per (image of ``split``, question kind in ``kinds``), in a seeded shuffled order.

    Each example is a dict with ``image`` (an 8x8 RGB ``PIL.Image``; the digits ``CLIPImageProcessor`` upsamples
    it to 32x32), ``question``, ``answer`` (``"3"``, ``"odd"``, ``"yes"``...), ``label`` (the digit, int),
    ``kind`` and ``index`` (the image's index in ``load_digit_images()``). ``seed`` picks the split
    (``digits_split(seed)``, so keep the tower's seed, 0), the phrasings, the digit asked in yes/no questions and
    the order. The result is deterministic; slice it for a smaller mixed subset.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    unknown = set(kinds) - set(QUESTION_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {QUESTION_KINDS}, got {tuple(kinds)}")
    images, labels = load_digit_images()
    train_idx, heldout_idx = digits_split(seed)
    indices = train_idx if split == "train" else heldout_idx
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    examples = []
    for index in indices:
        label = int(labels[index])
        image = digit_image(images[index])
        for kind in kinds:
            question, answer = _question(kind, label, rng)
            examples.append(
                {
                    "image": image,
                    "question": question,
                    "answer": answer,
                    "label": label,
                    "kind": kind,
                    "index": int(index),
                }
            )
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


def digit_conversations(
    split: Literal["train", "heldout"],
    seed: int = 0,
    kinds: Sequence[str] = QUESTION_KINDS,
) -> list[dict]:
    """One multi-turn conversation per image of ``split``: a question of each kind in ``kinds``, in a random order,
    each answered (LLaVA's instruction data is multi-turn in the same way). Several answers per image make a
    training token go further than single questions do.

    Each example is a dict with ``image``, ``messages`` (user / assistant turns; the collator puts the image before
    the first question), ``label``, ``kind`` (``"conversation"``) and ``index``. The questions and answers are those
    of :func:`digit_qa_examples` with the same arguments; the order of the turns and of the examples is seeded.
    """
    single = digit_qa_examples(split, seed, kinds)
    by_image: dict[int, list[dict]] = {}
    for example in single:
        by_image.setdefault(example["index"], []).append(example)
    rng = np.random.default_rng([seed, 3 if split == "train" else 4])
    conversations = []
    for index in sorted(by_image):
        turns = [by_image[index][i] for i in rng.permutation(len(by_image[index]))]
        messages = []
        for turn in turns:
            messages.append({"role": "user", "content": [{"type": "text", "text": turn["question"]}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
        first = turns[0]
        conversations.append(
            {
                "image": first["image"],
                "messages": messages,
                "label": first["label"],
                "kind": "conversation",
                "index": index,
            }
        )
    order = rng.permutation(len(conversations))
    return [conversations[i] for i in order]


def _question(kind: str, label: int, rng: np.random.Generator) -> tuple[str, str]:
    if kind == "digit":
        return DIGIT_QUESTIONS[rng.integers(len(DIGIT_QUESTIONS))], str(label)
    if kind == "parity":
        return PARITY_QUESTIONS[rng.integers(len(PARITY_QUESTIONS))], "even" if label % 2 == 0 else "odd"
    asked = label if rng.random() < 0.5 else int((label + rng.integers(1, 10)) % 10)
    template = YES_NO_QUESTIONS[rng.integers(len(YES_NO_QUESTIONS))]
    return template.format(digit=asked), "yes" if asked == label else "no"


_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[a-z]+")


def answer_is_correct(prediction: str, example: dict) -> bool:
    """Whether a generated ``prediction`` answers ``example`` correctly, leniently.

    * ``"digit"``: the first number in the prediction (``"3"``, ``"The digit is 3."``) must equal the label; if
      it has no numerals, the first number word (``"three"``) counts. ``"13"`` is not ``"3"``.
    * ``"parity"``: the first of the words "even" / "odd" must be the right one.
    * ``"yes_no"``: the first of the words "yes" / "no" must be the right one.

    Case and punctuation are ignored; a prediction with no answer word is wrong.
    """
    text = prediction.lower()
    kind = example.get("kind", "digit")
    if kind == "digit":
        number = _NUMBER.search(text)
        if number is not None:
            return number.group() == str(example["label"])
        words = [word for word in _WORD.findall(text) if word in NUMBER_WORDS]
        return bool(words) and NUMBER_WORDS.index(words[0]) == example["label"]
    choices = {"parity": ("even", "odd"), "yes_no": ("yes", "no")}.get(kind)
    if choices is None:
        raise ValueError(f"unknown question kind {kind!r}")
    words = [word for word in _WORD.findall(text) if word in choices]
    return bool(words) and words[0] == example["answer"]


__all__ = [
    "DIGIT_QUESTIONS",
    "PARITY_QUESTIONS",
    "QUESTION_KINDS",
    "YES_NO_QUESTIONS",
    "answer_is_correct",
    "digit_conversations",
    "digit_qa_examples",
]
