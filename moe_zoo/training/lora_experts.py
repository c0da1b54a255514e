"""Fine-tune a causal LM with LoRA experts (MixLoRA or SMoRA) and compare it with plain LoRA at the same budget
(``training_scripts/train_lora_experts.py``).

The recipe: build the instruction mix of :mod:`moe_zoo.training.instruction_mix` (chats whose loss counts only the
answer tokens), hold out a share of every sub-task, and train each contender with a :class:`RoutingStatsTrainer`
(the Trainer, plus the aux loss and expert load in its logs) on a fresh copy of the base model:

1. the chosen method (``mixlora`` or ``smora``; SMoRA's selection bias moves once per optimizer step through
   :class:`~moe_zoo.training.SelectionBiasCallback`);
2. with ``compare_with_lora``, plain PEFT LoRA on the same modules, its rank chosen so that its trainable-parameter
   count is the closest to the method's (:func:`matched_lora_rank`; ``lora_alpha / r`` kept equal).

Each run gets its own folder under ``output_dir`` (Trainer checkpoints, the final adapter, ``run_results.json``),
and ``results.json`` sums them up: trainable parameters, the held-out LM loss per task family (answer tokens only,
the router loss excluded) before and after training, the logged aux loss and expert load. With
``--resume_from_checkpoint true`` finished runs are kept, an interrupted one continues from its last checkpoint and
the rest start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from ..atomic_io import atomic_write_text
from ..peft import MixLoraConfig, SmoraConfig
from ..publishing import write_model_card
from .callbacks import SelectionBiasCallback
from .finetune import load_causal_lm
from .instruction_mix import TASK_FAMILIES, InstructionExample, instruction_mix, split_heldout
from .routing_stats import RoutingStatsTrainer, max_load_ratio

logger = logging.getLogger(__name__)

METHODS = ("mixlora", "smora", "lora")
IGNORE_INDEX = -100


@dataclass
class LoraExpertsArguments:
    """What to fine-tune and how (the Trainer's own options come from ``TrainingArguments``)."""

    method: str = field(default="mixlora", metadata={"help": f"One of {METHODS}."})
    model_path: str | None = field(
        default=None, metadata={"help": "Local causal LM folder; default: the shipped SmolLM2-135M-Instruct."}
    )
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names (MixLoRA's template targets all of these)."},
    )
    r: int = field(
        default=8,
        metadata={
            "help": "LoRA rank of each MixLoRA expert and attention LoRA (also --lora_r: torchrun's parser takes "
            "--r for an abbreviation of its own options).",
            "aliases": ["--lora_r"],
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "Plain LoRA keeps lora_alpha / r at the same ratio."})
    lora_dropout: float = 0.05
    num_experts: int = field(default=8, metadata={"help": "MixLoRA: LoRA experts per FFN."})
    top_k: int = field(default=2, metadata={"help": "MixLoRA: experts per token."})
    routing_strategy: str = field(default="mixlora", metadata={"help": "mixlora, mixlora-dynamic, mixlora-switch."})
    router_aux_loss_coef: float = 0.01
    smora_r: int = field(default=64, metadata={"help": "SMoRA: rank-one experts per targeted layer (its r)."})
    activate_r: int = field(default=8, metadata={"help": "SMoRA: ranks active per token."})
    rank_partition: int = field(default=1, metadata={"help": "SMoRA: ranks per expert."})
    bias_balancing: str = field(default="per_step", metadata={"help": "SMoRA: per_step or original."})
    bias_update_rate: float = field(default=1e-5, metadata={"help": "SMoRA: selection-bias step (the original's)."})
    compare_with_lora: bool = field(
        default=True, metadata={"help": "Also train plain LoRA with the same trainable-parameter budget."}
    )
    task_families: str = field(default=",".join(TASK_FAMILIES), metadata={"help": "Comma-separated."})
    heldout_every: int = field(default=5, metadata={"help": "Hold out every n-th example of each sub-task."})
    max_length: int = 384
    eval_batch_size: int = 4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")

    @property
    def targets(self) -> list[str]:
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


def encode_chat(example: InstructionExample, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """Token ids of the whole chat, with labels only on the answer (the prompt's labels are -100)."""
    prompt = tokenizer.apply_chat_template(example.messages[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(example.messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The tokenizer's chat template does not render the prompt as a prefix of the whole chat.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [IGNORE_INDEX] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}


def encode_examples(examples: list[InstructionExample], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    rows = [encode_chat(example, tokenizer, max_length) | {"family": example.family} for example in examples]
    kept = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]
    if len(kept) < len(rows):
        logger.warning("%d examples had no answer token within max_length and were dropped.", len(rows) - len(kept))
    return Dataset.from_list(kept)


@torch.no_grad()
def heldout_losses(
    model: nn.Module, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int = 4
) -> dict[str, float]:
    """Mean next-token cross-entropy over the answer tokens, per task family and ``"all"`` (token-weighted; the
    router loss is not included)."""
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            families = rows["family"]
            batch = collator([{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in rows])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            token_loss = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view_as(labels)
            for row, family in enumerate(families):
                counted = labels[row] != IGNORE_INDEX
                for key in (family, "all"):
                    sums[key] += token_loss[row][counted].sum().item()
                    counts[key] += int(counted.sum())
    finally:
        model.train(was_training)
    return {key: sums[key] / counts[key] for key in sorted(sums)}


def lora_parameters_per_rank(model: nn.Module, targets: list[str]) -> int:
    """Trainable parameters one LoRA rank adds on the targeted Linear layers: ``sum(in + out)``."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            total += module.in_features + module.out_features
    if total == 0:
        raise ValueError(f"None of the target modules {targets} is a Linear layer of {type(model).__name__}.")
    return total


def matched_lora_rank(trainable_parameters: int, parameters_per_rank: int) -> int:
    """The plain-LoRA rank whose trainable-parameter count (``rank * parameters_per_rank``, see
    :func:`lora_parameters_per_rank`) is closest to ``trainable_parameters``."""
    return max(1, round(trainable_parameters / parameters_per_rank))


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def method_config(args: LoraExpertsArguments, method: str, lora_rank: int | None = None) -> PeftConfig:
    """The PEFT config of one contender (``lora_rank`` sets plain LoRA's rank, keeping ``lora_alpha / r``)."""
    common = {"target_modules": args.targets, "lora_dropout": args.lora_dropout, "task_type": "CAUSAL_LM"}
    if method == "mixlora":
        return MixLoraConfig(
            r=args.r,
            lora_alpha=args.lora_alpha,
            num_experts=args.num_experts,
            top_k=args.top_k,
            routing_strategy=args.routing_strategy,
            router_aux_loss_coef=args.router_aux_loss_coef,
            **common,
        )
    if method == "smora":
        return SmoraConfig(
            r=args.smora_r,
            activate_r=args.activate_r,
            rank_partition=args.rank_partition,
            bias_balancing=args.bias_balancing,
            bias_update_rate=args.bias_update_rate,
            lora_alpha=args.lora_alpha,
            **common,
        )
    if method == "lora":
        rank = lora_rank or args.r
        return LoraConfig(r=rank, lora_alpha=args.lora_alpha * rank / args.r, **common)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def _checkpoint_to_resume(resume, output_dir: Path) -> str | None:
    if resume in ("true", "True", True):
        return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    return resume or None


def train_one(
    args: LoraExpertsArguments,
    training_args: TrainingArguments,
    method: str,
    data: tuple[Dataset, Dataset],
    lora_rank: int | None = None,
) -> dict:
    """Train one contender in ``output_dir/<method>`` and return its results (also saved as run_results.json)."""
    run_dir = Path(training_args.output_dir) / method
    results_file = run_dir / "run_results.json"
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", True) and results_file.is_file():
        logger.info("%s already finished in %s; keeping its results.", method, run_dir)
        return json.loads(results_file.read_text())
    base, tokenizer = load_causal_lm(args.model_path)
    # The adapter's fresh weights (routers, LoRA A) come from the global RNG: seeded, a run is reproducible and
    # every process of a distributed run builds the same model (FSDP shards each process's own copy; nothing
    # broadcasts rank 0's).
    set_seed(training_args.seed)
    model = get_peft_model(base, method_config(args, method, lora_rank))
    train_set, heldout_set = data
    run_args = dataclasses.replace(training_args, output_dir=str(run_dir), remove_unused_columns=False)
    trainer = RoutingStatsTrainer(
        model=model,
        args=run_args,
        train_dataset=train_set.remove_columns("family"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        processing_class=tokenizer,
        callbacks=[SelectionBiasCallback()],
    )
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=_checkpoint_to_resume(resume, run_dir))
    trainer.save_model()
    if method != "lora" and trainer.is_world_process_zero():  # PEFT writes a blank card; the adapter's own replaces it
        stage = (f"{method} fine-tuning", f"{trainer.state.global_step} steps on the multi-task instruction mix")
        write_model_card(run_dir, model, training_stages=[stage])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    results = {
        "method": method,
        "peft_config": json.loads(json.dumps(model.peft_config["default"].to_dict(), default=str)),
        "trainable_parameters": trainable_parameter_count(model),
        "train_loss": output.training_loss,
        "train_seconds": round(time.perf_counter() - started, 1),
        "heldout_loss": heldout_losses(model, heldout_set, tokenizer, args.eval_batch_size),
        "aux_loss": [entry["aux_loss"] for entry in logged if "aux_loss" in entry],
        "expert_load_max_ratio": [
            entry["expert_load_max_ratio"] for entry in logged if "expert_load_max_ratio" in entry
        ],
    }
    if trainer.expert_counts:
        results["expert_counts"] = {name: counts.tolist() for name, counts in trainer.expert_counts.items()}
        results["run_expert_load_max_ratio"] = max_load_ratio(list(trainer.expert_counts.values()))
    if training_args.process_index == 0:  # every process holds the same (global) results; one writes them
        atomic_write_text(results_file, json.dumps(results, indent=2))
    trainer.accelerator.wait_for_everyone()  # no process moves on (or resumes) before the files are there
    return results


def run(args: LoraExpertsArguments, training_args: TrainingArguments) -> dict:
    """Train the method (and plain LoRA at the same budget), write ``output_dir/results.json``, return it."""
    base, tokenizer = load_causal_lm(args.model_path)
    families = [family.strip() for family in args.task_families.split(",") if family.strip()]
    train_examples, heldout_examples = split_heldout(instruction_mix(families), args.heldout_every)
    data = (
        encode_examples(train_examples, tokenizer, args.max_length),
        encode_examples(heldout_examples, tokenizer, args.max_length),
    )
    lora_rank_cost = lora_parameters_per_rank(base, args.targets)
    summary = {
        "base_model": args.model_path or "SmolLM2-135M-Instruct (shipped)",
        "train_examples": len(data[0]),
        "heldout_examples": len(data[1]),
        "base_heldout_loss": heldout_losses(base, data[1], tokenizer, args.eval_batch_size),
        "runs": {},
    }
    del base
    method = train_one(args, training_args, args.method, data)
    summary["runs"][args.method] = method
    if args.compare_with_lora and args.method != "lora":
        rank = matched_lora_rank(method["trainable_parameters"], lora_rank_cost)
        summary["runs"]["lora"] = train_one(args, training_args, "lora", data, lora_rank=rank)
    if training_args.process_index == 0:
        atomic_write_text(Path(training_args.output_dir) / "results.json", json.dumps(summary, indent=2))
        _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(f"held-out answer loss before training: {summary['base_heldout_loss']['all']:.4f}")
    for name, run in summary["runs"].items():
        loss = run["heldout_loss"]
        per_family = ", ".join(f"{k} {v:.4f}" for k, v in loss.items() if k != "all")
        balance = run.get("run_expert_load_max_ratio")
        load = f", expert load max/mean {balance:.2f}" if balance is not None and not math.isnan(balance) else ""
        print(
            f"{name:8s} trainable {run['trainable_parameters']:>10,d}  held-out {loss['all']:.4f} ({per_family}){load}"
        )
