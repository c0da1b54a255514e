"""What the multi-stage recipes (MoE-LLaVA's MoE-tuning, Uni-MoE's progressive training) share: freezing a model
down to a stage's trainable set, a stage's copy of the ``TrainingArguments``, where a resumed run continues, and the
chat-to-labels rule (only the assistant answers are supervised) with right padding.

Kept in one place so that both recipes resume, freeze and mask labels the same way.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..core.quantized_experts import quantized_tensor_names
from .qlora import add_qlora_adapters

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""The label of a position the loss skips (transformers' and PyTorch's convention)."""

_TRAINING_ARGUMENT_DEFAULTS = {name: f.default for name, f in TrainingArguments.__dataclass_fields__.items()}


def set_trainable_by_patterns(
    model: nn.Module,
    patterns: Iterable[str],
    what: str = "this stage",
    qlora_rank: int | None = None,
    qlora_alpha: float | None = None,
) -> list[str]:
    """Freeze every parameter of ``model`` except those whose name a pattern matches at its start (``re.match``);
    return the trainable names in the model's order. Raises ``ValueError`` when nothing matches (a silent run that
    trains nothing would be worse), naming ``what`` asked for it, and when the set covers quantized weights
    (a 4-/8-bit model's packed ``nn.Linear`` weights or expert banks), which cannot train.

    With ``qlora_rank`` (QLoRA, the model quantized) the set is realised on the quantized model instead
    (:func:`~moe_zoo.training.qlora.add_qlora_adapters`): its full-precision parameters train directly and each
    quantized weight it covers gets LoRA of that rank (``qlora_alpha``, default ``2 * qlora_rank``), whose factors
    train. Asking for QLoRA on a model without quantized weights raises ``ValueError``."""
    patterns = list(patterns)
    compiled = [re.compile(p) for p in patterns]
    if qlora_rank is not None:
        add_qlora_adapters(model, compiled, qlora_rank, qlora_alpha if qlora_alpha is not None else 2 * qlora_rank)
    elif frozen_by_quantization := [n for n in quantized_tensor_names(model) if any(p.match(n) for p in compiled)]:
        raise ValueError(
            f"{what} trains {frozen_by_quantization[:4]} (and {max(len(frozen_by_quantization) - 4, 0)} more), which "
            "are quantized (bitsandbytes 4-/8-bit) and cannot train. Load the model in full precision for this stage, "
            "or keep the base quantized and train adapters on it (QLoRA: MoE-tuning's qlora_rank, MixLoRA, SMoRA or "
            "PEFT LoRA, routers included; see docs/quantization.md)."
        )
    trainable = []
    for name, parameter in model.named_parameters():
        # QLoRA: the packed weights the set covers stay frozen, their LoRA factors (matched by name) train instead
        on = any(p.match(name) for p in compiled) and parameter.is_floating_point()
        parameter.requires_grad_(on)
        if on:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"No parameter of {type(model).__name__} matches {what}'s trainable set {patterns}.")
    return trainable


def with_stage_defaults(
    training_args: TrainingArguments,
    defaults: Mapping[str, Any],
    label: str,
    output_dir: str | Path | None = None,
) -> TrainingArguments:
    """A copy of ``training_args`` for one stage: every field of ``defaults`` that the caller left at the Trainer's
    own default takes the stage's value (logged as a warning, so that nobody trains at 5e-5 by accident), and
    ``remove_unused_columns=False`` (the collators need the raw examples). ``output_dir`` replaces the folder when
    given."""
    stage_args = copy.deepcopy(training_args)
    for name, value in defaults.items():
        trainer_default = _TRAINING_ARGUMENT_DEFAULTS[name]
        if getattr(stage_args, name) == trainer_default and value != trainer_default:
            setattr(stage_args, name, value)
            logger.warning(
                "%s: %s is the Trainer's default (%s), so the recipe's %s is used; pass another value to override it.",
                label,
                name,
                trainer_default,
                value,
            )
    stage_args.remove_unused_columns = False
    if output_dir is not None:
        stage_args.output_dir = str(output_dir)
    return stage_args


def wants_resume(resume: Any) -> bool | None:
    """``True`` for "continue from the last checkpoint", ``False`` for "start over", ``None`` for a checkpoint path
    (``resume_from_checkpoint`` arrives as a bool, a string from the command line, or a path)."""
    if resume in ("true", "True", True):
        return True
    if resume in (None, False, "false", "False", ""):
        return False
    return None


def resume_point(resume: Any, output_dir: str | Path, required: bool) -> str | None:
    """The checkpoint a run continues from: the last one in ``output_dir`` for ``resume`` true (``ValueError`` if
    there is none and ``required``), ``None`` for false, else ``resume`` itself (a checkpoint path)."""
    wanted = wants_resume(resume)
    if wanted is True:
        last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if last is None and required:
            raise ValueError(f"resume_from_checkpoint=true, but {output_dir} holds no checkpoint.")
        return last
    if wanted is False:
        return None
    return str(resume)


def chat_segments(render: Callable[..., str], messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """A chat as ``(text, supervised)`` pieces in order: the prompt up to each assistant turn (with the generation
    prompt) unsupervised, that turn's answer (and whatever the template ends it with, e.g. EOS) supervised.

    ``render(messages, add_generation_prompt=..., tokenize=False)`` is a chat-template renderer. Pieces are found as
    differences of renderings of growing prefixes, so they hold whatever the template writes; a template that does
    not render a conversation as a prefix of its continuation raises ``ValueError``.
    """
    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(list(messages[:index]), add_generation_prompt=True, tokenize=False)
        full = render(list(messages[: index + 1]), tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("The chat template does not render a conversation as a prefix of its continuation.")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    if not pieces:
        raise ValueError("An example has no assistant answer to supervise.")
    return pieces


def pad_right(encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` of ``(input_ids, labels)`` rows, padded on the right (pad
    id, mask 0, label -100)."""
    length = max(len(ids) for ids, _ in encoded)
    pad = pad_token_id if pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


__all__ = [
    "IGNORE_INDEX",
    "chat_segments",
    "pad_right",
    "resume_point",
    "set_trainable_by_patterns",
    "wants_resume",
    "with_stage_defaults",
]
