"""Spoken digits: labelled speech synthesised offline with espeak-ng, for Uni-MoE's speech stages and its demo.

No labelled speech corpus ships in a package, but espeak-ng (a Debian package) speaks any text in many accents and
voices. Each clip is one number word ("seven") spoken by one voice at one speed and pitch. The split is by accent:
``"heldout"`` clips come from accents that no ``"train"`` clip uses, so answering them measures generalisation to
unheard speakers, not memorisation of waveforms.

The question kinds and grading are those of :mod:`moe_zoo.training.image_qa` with speech in place of the image
("What number is spoken?" -> ``"7"``, "Is the spoken number even or odd?" -> ``"odd"``, "Is the number 5
spoken?" -> ``"no"``), so :func:`~moe_zoo.training.image_qa.answer_is_correct` grades both.

Synthesis takes about 0.1 s a clip; the clips are cached as one ``.npz`` under :func:`moe_zoo.assets.cache_dir`,
written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np

from ..assets import cache_dir
from ..atomic_io import atomic_directory, remove_stale_temp_dirs
from ..speech_assets import synthesize_speech
from .image_qa import NUMBER_WORDS, QUESTION_KINDS

TRAIN_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan")
HELDOUT_ACCENTS = ("en-029", "en-gb-x-gbcwmd")
VOICE_VARIANTS = {"": (160, 50), "+f2": (140, 60), "+m3": (185, 40), "+f4": (170, 70)}
"""espeak-ng voice variant -> (speed in words per minute, pitch); every accent is spoken in each."""
RECIPE_VERSION = 1

SPEECH_QUESTIONS = {
    "digit": ("What number is spoken?", "Which number do you hear?", "Transcribe the spoken number as a digit."),
    "parity": ("Is the spoken number even or odd?", "Is the number you hear odd or even?"),
    "yes_no": ("Is the number {digit} spoken?", "Do you hear the number {digit}?"),
}


def _voices(split: str) -> list[tuple[str, int, int]]:
    accents = TRAIN_ACCENTS if split == "train" else HELDOUT_ACCENTS
    return [
        (accent + variant, speed, pitch) for accent in accents for variant, (speed, pitch) in VOICE_VARIANTS.items()
    ]


@lru_cache(maxsize=2)
def spoken_digit_clips(split: Literal["train", "heldout"]) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """``(waveforms, digits, voices)`` of ``split``: every number word in every voice of the split, as float32 mono
    16-kHz waveforms (cached on disk after the first call)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    folder = cache_dir() / f"spoken-digits-v{RECIPE_VERSION}-{split}"
    if not (folder / "clips.npz").is_file():
        remove_stale_temp_dirs(folder)
        with atomic_directory(folder) as tmp:
            waves, digits, names = [], [], []
            for voice, speed, pitch in _voices(split):
                for digit, word in enumerate(NUMBER_WORDS):
                    waves.append(synthesize_speech(word, voice=voice, speed=speed, pitch=pitch))
                    digits.append(digit)
                    names.append(f"{voice}@{speed}")
            lengths = np.array([len(w) for w in waves])
            np.savez(tmp / "clips.npz", audio=np.concatenate(waves), lengths=lengths, digits=np.array(digits))
            (tmp / "voices.json").write_text(json.dumps(names))
    with np.load(folder / "clips.npz") as data:  # each NpzFile item access reads the array again: read once
        audio, lengths, digits = data["audio"], data["lengths"], data["digits"]
    waves = np.split(audio, np.cumsum(lengths)[:-1])
    voices = json.loads((folder / "voices.json").read_text())
    return waves, digits, voices


def spoken_digit_examples(
    split: Literal["train", "heldout"], seed: int = 0, kinds: Sequence[str] = QUESTION_KINDS
) -> list[dict]:
    """One single-turn example per (clip of ``split``, kind in ``kinds``), seeded and shuffled.

    Each example is a dict in the Uni-MoE collator's format: ``messages`` (a user turn with a ``{"type":
    "speech"}`` item and the question, and the assistant's answer), ``audios`` (the one waveform), plus
    ``question``, ``answer``, ``label`` (the digit), ``kind`` and ``voice``.
    """
    unknown = set(kinds) - set(QUESTION_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {QUESTION_KINDS}, got {tuple(kinds)}")
    waves, digits, voices = spoken_digit_clips(split)
    rng = np.random.default_rng([seed, 5 if split == "train" else 6])
    examples = []
    for wave, digit, voice in zip(waves, digits, voices, strict=True):
        for kind in kinds:
            question, answer = _question(kind, int(digit), rng)
            messages = [
                {"role": "user", "content": [{"type": "speech"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            examples.append(
                {
                    "messages": messages,
                    "audios": [wave],
                    "question": question,
                    "answer": answer,
                    "label": int(digit),
                    "kind": kind,
                    "voice": voice,
                }
            )
    return [examples[i] for i in rng.permutation(len(examples))]


def _question(kind: str, label: int, rng: np.random.Generator) -> tuple[str, str]:
    phrasings = SPEECH_QUESTIONS[kind]
    template = phrasings[rng.integers(len(phrasings))]
    if kind == "digit":
        return template, str(label)
    if kind == "parity":
        return template, "even" if label % 2 == 0 else "odd"
    asked = label if rng.random() < 0.5 else int((label + rng.integers(1, 10)) % 10)
    return template.format(digit=asked), "yes" if asked == label else "no"


__all__ = ["HELDOUT_ACCENTS", "TRAIN_ACCENTS", "spoken_digit_clips", "spoken_digit_examples"]
