"""Upcycle a dense causal LM and fine-tune the MoE with the Trainer (``training_scripts/finetune_upcycled.py``).

The recipe: load the dense model, :func:`moe_zoo.upcycle` it (fixed seed, so a resumed run rebuilds the same
architecture before the Trainer restores the checkpoint's weights), tokenize a local text / chat file, and train with
the router loss added to the LM loss. A run stopped half-way continues where it stopped: pass
``--resume_from_checkpoint true`` (the last checkpoint in ``output_dir``) or a checkpoint path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from ..atomic_io import atomic_write_text
from ..core.options import parse_moe_layers
from ..modeling.upcycled_moe import UpcycledMoeForCausalLM, upcycle
from .callbacks import SelectionBiasCallback
from .routing_stats import RoutingStatsTrainer, max_load_ratio


@dataclass
class UpcycleFinetuneArguments:
    """What to upcycle and what to train it on (the Trainer's own options come from ``TrainingArguments``)."""

    data_file: str = field(
        metadata={
            "help": "A .jsonl file with a 'messages' (chat) or 'text' field per line, or a .txt file (one example per line)."
        }
    )
    model_path: str | None = field(
        default=None, metadata={"help": "Local dense causal LM folder; default: the shipped SmolLM2-135M-Instruct."}
    )
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str = field(
        default="sparse", metadata={"help": "all, sparse, first_half, second_half, or comma-separated layer indices."}
    )
    router_type: str = "softmax_topk"
    router_aux_loss_coef: float = 0.01
    upcycle_seed: int = 0
    max_length: int = 256


def load_examples(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Tokenize a local file: chat ``messages`` through the tokenizer's chat template, plain ``text`` as is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data_file {path} does not exist (expected a .jsonl or .txt file).")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = [{"text": line} for line in path.read_text().splitlines() if line.strip()]
    texts = []
    for number, row in enumerate(rows, start=1):
        if "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "text" in row:
            texts.append(row["text"])
        else:
            raise ValueError(f"{path}, example {number}: expected a 'messages' or 'text' field, got {sorted(row)}.")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})


def load_causal_lm(model_path: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local causal LM in fp32 (default: the shipped SmolLM2-135M-Instruct) and its tokenizer, with a pad token."""
    if model_path is None:
        from ..assets import smollm2_path

        model_path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), tokenizer


def build_model(args: UpcycleFinetuneArguments) -> tuple[UpcycledMoeForCausalLM, PreTrainedTokenizerBase]:
    """The upcycled model (router loss on) and the dense model's tokenizer (with a pad token)."""
    dense, tokenizer = load_causal_lm(args.model_path)
    torch.manual_seed(args.upcycle_seed)
    model = upcycle(
        dense,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_layers=parse_moe_layers(args.moe_layers),
        router_type=args.router_type,
        router_aux_loss_coef=args.router_aux_loss_coef,
        output_router_logits=True,
    )
    return model, tokenizer


ROUTING_STATS_FILE = "routing_stats.json"


def routing_summary(trainer: RoutingStatsTrainer) -> dict:
    """What the routers did over the run: ``global_step``, each router's ``expert_counts`` (summed over processes,
    so the global batches' counts in any number of processes; a resumed run counts from where it resumed) and
    their ``expert_load_max_ratio``."""
    counts = trainer.expert_counts
    return {
        "global_step": trainer.state.global_step,
        "expert_counts": {name: values.tolist() for name, values in counts.items()},
        "expert_load_max_ratio": max_load_ratio(list(counts.values())) if counts else None,
    }


def run(args: UpcycleFinetuneArguments, training_args: TrainingArguments) -> RoutingStatsTrainer:
    """Upcycle, train (resuming when asked), save the final model and tokenizer into ``output_dir``, and the run's
    expert counts into ``output_dir/routing_stats.json`` (:func:`routing_summary`). The trainer is a
    :class:`RoutingStatsTrainer`: ``aux_loss`` and the expert load in its logs, reduced over processes and the
    router loss weighted once under ``torchrun`` / ``accelerate launch``; the file is written by the main process
    and holds the global counts."""
    model, tokenizer = build_model(args)
    dataset = load_examples(args.data_file, tokenizer, args.max_length)
    trainer = RoutingStatsTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[SelectionBiasCallback()],
    )
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", True):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"resume_from_checkpoint=true, but {training_args.output_dir} holds no checkpoint.")
    trainer.train(resume_from_checkpoint=resume)
    model.card_details = {
        "training_stages": [
            ("upcycling", "every FFN copied into the experts, routers initialised fresh (function-preserving)"),
            ("fine-tuning", f"causal-LM loss + router loss on {Path(args.data_file).name}"),
        ]
    }
    trainer.save_model()
    if trainer.is_world_process_zero():
        atomic_write_text(Path(training_args.output_dir) / ROUTING_STATS_FILE, json.dumps(routing_summary(trainer)))
    return trainer
