"""Metis-HOME's answer format: ``<think>reasoning</think><answer>answer</answer>`` on the thinking branch and an
empty think block, ``<think></think><answer>answer</answer>``, on the non-thinking branch.

Training data is checked against it before any step runs, so a malformed sample fails with its index and what is
wrong instead of teaching the model broken tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .configuration_metis_home import THINKING

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_RESPONSE = re.compile(r"\s*<think>(?P<thinking>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


class MalformedThinkTagsError(ValueError):
    """A response does not follow ``<think>...</think><answer>...</answer>``, or its think block does not match its
    branch."""


@dataclass(frozen=True)
class ThinkResponse:
    thinking: str
    answer: str


def format_response(answer: str, thinking: str | None = None) -> str:
    """The target text of a sample: ``thinking`` in the think block (None or "" gives the empty, non-thinking one)."""
    return f"{THINK_OPEN}{(thinking or '').strip()}{THINK_CLOSE}{ANSWER_OPEN}{answer.strip()}{ANSWER_CLOSE}"


def parse_response(text: str) -> ThinkResponse:
    """Split a response into its think block and answer; :class:`MalformedThinkTagsError` says what is wrong."""
    counts = {tag: text.count(tag) for tag in _TAGS}
    wrong = {tag: n for tag, n in counts.items() if n != 1}
    if wrong:
        raise MalformedThinkTagsError(
            f"Expected each of {list(_TAGS)} exactly once, found {wrong} in {text[:80]!r}; the format is "
            f"'{THINK_OPEN}...{THINK_CLOSE}{ANSWER_OPEN}...{ANSWER_CLOSE}'."
        )
    match = _RESPONSE.fullmatch(text)
    if match is None:
        raise MalformedThinkTagsError(
            f"Tags out of order or text outside them in {text[:80]!r}; the format is "
            f"'{THINK_OPEN}...{THINK_CLOSE}{ANSWER_OPEN}...{ANSWER_CLOSE}'."
        )
    return ThinkResponse(match["thinking"].strip(), match["answer"].strip())


def follows_format(text: str) -> bool:
    """Whether ``text`` is a well-formed response (the format reward of the RL stage)."""
    try:
        parse_response(text)
    except MalformedThinkTagsError:
        return False
    return True


def validate_response(text: str, branch: str, where: str = "the response") -> ThinkResponse:
    """Parse ``text`` and check its think block against ``branch``: non-empty on the thinking branch, empty on any
    other. Raises :class:`MalformedThinkTagsError` naming ``where``."""
    try:
        parsed = parse_response(text)
    except MalformedThinkTagsError as error:
        raise MalformedThinkTagsError(f"{where}: {error}") from None
    if not parsed.answer:
        raise MalformedThinkTagsError(f"{where}: the {ANSWER_OPEN} block is empty.")
    if branch == THINKING and not parsed.thinking:
        raise MalformedThinkTagsError(
            f"{where}: a thinking sample needs reasoning inside {THINK_OPEN}...{THINK_CLOSE}."
        )
    if branch != THINKING and parsed.thinking:
        raise MalformedThinkTagsError(
            f"{where}: a {branch} sample must have an empty think block ({THINK_OPEN}{THINK_CLOSE}), got reasoning."
        )
    return parsed


__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "THINK_CLOSE",
    "THINK_OPEN",
    "MalformedThinkTagsError",
    "ThinkResponse",
    "follows_format",
    "format_response",
    "parse_response",
    "validate_response",
]
