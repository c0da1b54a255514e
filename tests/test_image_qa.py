"""Question-answer examples about the digit images: right split, right answers, lenient grading."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from moe_zoo.training.image_qa import QUESTION_KINDS, answer_is_correct, digit_conversations, digit_qa_examples
from moe_zoo.vision_tower import digit_pixel_values, digits_image_processor, digits_split, load_digit_images


@pytest.fixture(scope="module")
def train_examples():
    return digit_qa_examples("train")


@pytest.fixture(scope="module")
def heldout_examples():
    return digit_qa_examples("heldout")


def test_examples_use_exactly_their_split(train_examples, heldout_examples):
    train_idx, heldout_idx = digits_split()
    assert {example["index"] for example in train_examples} == set(train_idx.tolist())
    assert {example["index"] for example in heldout_examples} == set(heldout_idx.tolist())
    assert len(train_examples) == len(train_idx) * len(QUESTION_KINDS)
    assert len(heldout_examples) == len(heldout_idx) * len(QUESTION_KINDS)


def test_answers_match_labels_and_images_match_the_data(train_examples, heldout_examples):
    images, labels = load_digit_images()
    for example in train_examples + heldout_examples:
        label = example["label"]
        assert label == labels[example["index"]]
        if example["kind"] == "digit":
            assert example["answer"] == str(label)
        elif example["kind"] == "parity":
            assert example["answer"] == ("even" if label % 2 == 0 else "odd")
        else:
            asked = int(example["question"].rstrip("?").split()[-1])
            assert example["answer"] == ("yes" if asked == label else "no")
        assert answer_is_correct(example["answer"], example)
    for example in heldout_examples[:20]:
        assert example["image"].mode == "RGB" and example["image"].size == (8, 8)
        np.testing.assert_array_equal(np.asarray(example["image"])[..., 0], images[example["index"]])


def test_examples_are_deterministic_and_varied(heldout_examples):
    again = digit_qa_examples("heldout")
    assert [(e["index"], e["question"], e["answer"]) for e in again] == [
        (e["index"], e["question"], e["answer"]) for e in heldout_examples
    ]
    assert len({example["question"] for example in heldout_examples if example["kind"] != "yes_no"}) >= 4
    yes_no = Counter(example["answer"] for example in heldout_examples if example["kind"] == "yes_no")
    assert 0.35 < yes_no["yes"] / sum(yes_no.values()) < 0.65
    assert len({example["kind"] for example in heldout_examples[:10]}) > 1  # shuffled, so a slice is mixed


def test_kinds_can_be_chosen_and_bad_arguments_fail():
    examples = digit_qa_examples("heldout", kinds=("digit",))
    assert {example["kind"] for example in examples} == {"digit"}
    assert len(examples) == len(digits_split()[1])
    with pytest.raises(ValueError, match="split"):
        digit_qa_examples("test")
    with pytest.raises(ValueError, match="kinds"):
        digit_qa_examples("train", kinds=("colour",))


def test_conversations_hold_every_question_about_one_image(train_examples):
    conversations = digit_conversations("train")
    assert sorted(c["index"] for c in conversations) == sorted(digits_split()[0].tolist())
    singles = {(e["index"], e["question"], e["answer"]) for e in train_examples}
    first_kinds = Counter()
    for conversation in conversations:
        messages = conversation["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(QUESTION_KINDS)
        turns = {
            (conversation["index"], q["content"][0]["text"], a["content"][0]["text"])
            for q, a in zip(messages[::2], messages[1::2], strict=True)
        }
        assert turns <= singles and len(turns) == len(QUESTION_KINDS)
        first_kinds[messages[1]["content"][0]["text"].isdigit()] += 1
    assert (
        0.2 < first_kinds[True] / len(conversations) < 0.5
    )  # the digit question comes first about a third of the time
    assert [c["index"] for c in conversations] == [c["index"] for c in digit_conversations("train")]


def test_images_go_through_the_digits_image_processor(heldout_examples):
    batch = [example["image"] for example in heldout_examples[:4]]
    pixels = digits_image_processor()(images=batch, return_tensors="pt")["pixel_values"]
    images, _ = load_digit_images()
    expected = digit_pixel_values(images[[example["index"] for example in heldout_examples[:4]]])
    assert torch.equal(pixels, expected)


DIGIT_3 = {"kind": "digit", "label": 3, "answer": "3"}
ODD = {"kind": "parity", "label": 3, "answer": "odd"}
YES = {"kind": "yes_no", "label": 3, "answer": "yes"}
NO = {"kind": "yes_no", "label": 3, "answer": "no"}


@pytest.mark.parametrize(
    ("prediction", "example", "correct"),
    [
        ("3", DIGIT_3, True),
        ("The digit is 3.", DIGIT_3, True),
        (" 3</s>", DIGIT_3, True),
        ("three", DIGIT_3, True),
        ("It is a Three.", DIGIT_3, True),
        ("5", DIGIT_3, False),
        ("The digit is 8, not 3.", DIGIT_3, False),
        ("13", DIGIT_3, False),
        ("", DIGIT_3, False),
        ("I don't know", DIGIT_3, False),
        ("odd", ODD, True),
        ("The digit is Odd.", ODD, True),
        ("even", ODD, False),
        ("It is even, not odd", ODD, False),
        ("3", ODD, False),
        ("Yes.", YES, True),
        ("yes, it is", YES, True),
        ("No", YES, False),
        ("no", NO, True),
        ("Nope", NO, False),
        ("yes", NO, False),
    ],
)
def test_answer_is_correct(prediction, example, correct):
    assert answer_is_correct(prediction, example) is correct
