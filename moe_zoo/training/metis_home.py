"""Metis-HOME's training pipeline: an optional RL stage on the dense model, expansion, then SFT on mixed thinking and
non-thinking data with branch labels.

- **Stage-RL** (``rl_steps > 0``): TRL's ``GRPOTrainer`` on the dense model with the paper's two verifiable rewards,
  format (``<think>...</think><answer>...</answer>``) and binary accuracy (the answer block equals the reference),
  and its DAPO-style tricks: asymmetric clipping (``epsilon`` / ``epsilon_high``) and token-level normalisation
  (``loss_type="dapo"``). The paper runs it on about 40K multimodal reasoning samples; here it runs on the thinking
  samples' prompts.
- **Expansion**: :func:`~moe_zoo.expand_to_metis_home`, both branches from the (RL-trained) dense model.
- **Stage-SFT**: a ``Trainer`` on the mix; each sample trains its own branch (teacher forcing) and the router learns
  the branch labels; ``loss = lm_loss + router_loss_coef * router_loss``. The router has its own learning rate
  (``router_learning_rate``): it is a fresh, tiny MLP next to pretrained weights. The MoE is not trained with RL
  after expansion, as in the paper.

:func:`evaluate_routing` measures what the demo reports: the router's accuracy at picking the labelled branch and the
thinking ratio per task type.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..atomic_io import atomic_directory, atomic_write_text
from ..modeling.metis_home import MetisHomeForConditionalGeneration, expand_to_metis_home
from ..modeling.metis_home.configuration_metis_home import THINKING
from ..modeling.metis_home.think_format import MalformedThinkTagsError, follows_format, parse_response
from .distributed import DistributedTrainer, WindowStats, broadcast_from_main, save_pretrained_once, unsharded_copy
from .finetune import load_causal_lm
from .instruction_mix import split_heldout
from .metis_home_data import (
    BranchedExample,
    MetisHomeCollator,
    demo_mix,
    load_examples,
    prompt_batch,
    validate_examples,
)
from .stage_utils import resume_point, wants_resume, with_stage_defaults

logger = logging.getLogger(__name__)

SFT_DEFAULTS = {"learning_rate": 2e-5, "lr_scheduler_type": "cosine"}


@dataclass
class MetisHomeArguments:
    """What the Metis-HOME pipeline needs besides ``TrainingArguments`` (which drive the SFT stage)."""

    model_path: str | None = field(default=None, metadata={"help": "Dense causal LM folder (default: SmolLM2-135M)."})
    data_path: str | None = field(
        default=None,
        metadata={"help": "JSON lines with question/response/branch (default: the lm_eval GSM8K+MMLU / BBH mix)."},
    )
    heldout_every: int = field(default=5, metadata={"help": "Hold out every n-th sample of each task."})
    max_length: int = field(
        default=320, metadata={"help": "Token budget per sample; longer demo samples are left out."}
    )
    router_layer: int | None = field(default=None, metadata={"help": "Router input layer (default: the middle one)."})
    router_pooling: str = field(default="mean", metadata={"help": "mean or last (prompt-token pooling)."})
    router_loss_coef: float = field(default=1.0, metadata={"help": "Weight of the router loss (1:1 in the paper)."})
    router_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the router MLP."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the routing evaluation."})
    router_seed: int = field(default=0, metadata={"help": "Seed of the router's initialisation."})
    rl_steps: int = field(default=0, metadata={"help": "GRPO steps on the dense model before expansion (0 = none)."})
    rl_num_generations: int = field(default=4, metadata={"help": "GRPO group size."})
    rl_max_completion_length: int = field(default=128, metadata={"help": "GRPO completion budget (tokens)."})
    rl_learning_rate: float = field(default=1e-6, metadata={"help": "GRPO learning rate."})
    rl_epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range (epsilon_low)."})
    rl_epsilon_high: float = field(default=0.28, metadata={"help": "Upper clipping range (DAPO's clip-higher)."})


# ----- Stage-RL -----


def _completion_text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def format_reward(completions, **_) -> list[float]:
    """1 for a well-formed ``<think>...</think><answer>...</answer>`` completion, else 0."""
    return [float(follows_format(_completion_text(c))) for c in completions]


def normalized_answer(text: str) -> str:
    return " ".join(text.strip().strip(".").lower().split())


def accuracy_reward(completions, answer: Sequence[str], **_) -> list[float]:
    """1 when the completion's answer block equals the reference answer (case and spacing aside), else 0."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        try:
            predicted = parse_response(_completion_text(completion)).answer
        except MalformedThinkTagsError:
            rewards.append(0.0)
            continue
        rewards.append(float(normalized_answer(predicted) == normalized_answer(reference)))
    return rewards


def run_rl_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[BranchedExample],
    args: MetisHomeArguments,
    training_args: TrainingArguments,
) -> Trainer:
    """GRPO on the dense ``model`` (trained in place; the returned trainer's ``model``) over ``examples``'
    prompts, with :func:`format_reward` and :func:`accuracy_reward`, logging into ``output_dir/rl``."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    output_dir = Path(training_args.output_dir) / "rl"
    dataset = Dataset.from_list([{"prompt": e.prompt_messages, "answer": e.answer} for e in examples])
    config = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=args.rl_steps,
        learning_rate=args.rl_learning_rate,
        per_device_train_batch_size=args.rl_num_generations,
        num_generations=args.rl_num_generations,
        max_completion_length=args.rl_max_completion_length,
        epsilon=args.rl_epsilon,
        epsilon_high=args.rl_epsilon_high,
        loss_type="dapo",
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=training_args.seed,
        use_cpu=training_args.use_cpu,
        bf16=training_args.bf16,
        disable_tqdm=training_args.disable_tqdm,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[format_reward, accuracy_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


# ----- Stage-SFT -----


class MetisHomeTrainer(DistributedTrainer):
    """``Trainer`` for Metis-HOME: the router gets its own learning rate, and ``lm_loss`` / ``router_loss`` /
    ``router_accuracy`` (on the training batches since the last log) are logged next to ``loss``.

    Under ``torchrun`` / ``accelerate launch`` each process sees its own shard of the batch, so the three figures
    are reduced over processes before they are logged (only when ``torch.distributed`` is initialised): ``lm_loss``
    weighted by label tokens, ``router_loss`` and ``router_accuracy`` by queries, so each is the value one process
    with the whole batch would log (``lm_loss`` up to the accumulation-step normalisation, which is also undone
    here). As a :class:`~moe_zoo.training.distributed.DistributedTrainer` it weighs the router's cross-entropy (a
    mean over the batch's queries) once whatever the number of processes and accumulation steps."""

    WINDOW_NAMES = ("lm_loss", "router_loss", "router_accuracy")

    def __init__(self, *args, router_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self._window = WindowStats()

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.router_learning_rate is None:
            return super().create_optimizer(model)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        router = [p for n, p in named if n.startswith("router.")]
        rest = [p for n, p in named if not n.startswith("router.")]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        groups = [
            {"params": rest, "weight_decay": self.args.weight_decay},
            {"params": router, "weight_decay": 0.0, "lr": self.router_learning_rate},
        ]
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def batch_mean_loss_term(self, model, inputs, outputs) -> torch.Tensor | None:
        """``router_loss_coef * branch_loss``: the router's cross-entropy, a mean over this batch's queries."""
        if getattr(outputs, "branch_loss", None) is None or outputs.get("loss") is None:
            return None
        return self.accelerator.unwrap_model(model).config.router_loss_coef * outputs.branch_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and outputs.branch_loss is not None:
            queries = inputs["branch_labels"].numel()
            self._window.add("router_loss", float(outputs.branch_loss.detach()) * queries, queries)
            if outputs.lm_loss is not None and inputs.get("labels") is not None:
                tokens = int((inputs["labels"][..., 1:] != -100).sum())
                # With num_items_in_batch the LM loss is this batch's token sum over the whole step's token count;
                # without it, the mean over this batch's tokens. Either way, recover the sum.
                normaliser = float(num_items_in_batch) if num_items_in_batch is not None else tokens
                self._window.add("lm_loss", float(outputs.lm_loss.detach()) * normaliser, tokens)
            hits = outputs.branch_logits.argmax(-1).cpu() == inputs["branch_labels"].cpu()
            self._window.add("router_accuracy", hits.float().sum().item(), queries)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the window's global means to a training log line (every process logs each line, so the reduction
        is a collective every process joins)."""
        if "loss" in logs:
            for name, value in self._window.global_means(self.WINDOW_NAMES).items():
                logs[name] = round(value, 4)
        super().log(logs, *args, **kwargs)


def run_sft_stage(
    metis: MetisHomeForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[BranchedExample],
    args: MetisHomeArguments,
    training_args: TrainingArguments,
) -> MetisHomeTrainer:
    """Train ``metis`` on ``examples`` (resuming from ``output_dir/sft`` when ``resume_from_checkpoint`` says so)."""
    validate_examples(examples, metis.branch_names)
    stage_args = with_stage_defaults(
        training_args, SFT_DEFAULTS, "Metis-HOME SFT", Path(training_args.output_dir) / "sft"
    )
    trainer = MetisHomeTrainer(
        model=metis,
        args=stage_args,
        train_dataset=list(examples),
        data_collator=MetisHomeCollator(tokenizer, metis.branch_names, args.max_length),
        processing_class=tokenizer,
        router_learning_rate=args.router_learning_rate,
    )
    trainer.train(
        resume_from_checkpoint=resume_point(training_args.resume_from_checkpoint, stage_args.output_dir, False)
    )
    return trainer


# ----- Evaluation -----


@torch.no_grad()
def evaluate_routing(
    metis: MetisHomeForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[BranchedExample],
    batch_size: int = 16,
) -> dict:
    """The router on ``examples``' prompts: ``router_accuracy`` (share routed to the labelled branch), and per task
    family the ``thinking_ratio`` (share routed to the thinking branch), accuracy and count."""
    if not examples:
        raise ValueError("evaluate_routing needs at least one example.")
    was_training = metis.training
    metis.eval()
    chosen = []
    for start in range(0, len(examples), batch_size):
        batch = prompt_batch(tokenizer, examples[start : start + batch_size])
        batch = {k: v.to(metis.device) for k, v in batch.items()}
        chosen += metis.route(**batch).names
    metis.train(was_training)
    by_family: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for example, branch in zip(examples, chosen, strict=True):
        by_family[example.family].append((example.branch, branch))
    families = {
        family: {
            "count": len(pairs),
            "labelled_branch": sorted({label for label, _ in pairs}),
            "thinking_ratio": round(sum(b == THINKING for _, b in pairs) / len(pairs), 4),
            "router_accuracy": round(sum(label == b for label, b in pairs) / len(pairs), 4),
        }
        for family, pairs in sorted(by_family.items())
    }
    hits = sum(example.branch == branch for example, branch in zip(examples, chosen, strict=True))
    majority = max(sum(e.branch == b for e in examples) for b in {e.branch for e in examples}) / len(examples)
    return {
        "router_accuracy": round(hits / len(examples), 4),
        "majority_baseline": round(majority, 4),
        "count": len(examples),
        "by_family": families,
    }


# ----- The whole pipeline -----


def load_data(
    args: MetisHomeArguments, collator: MetisHomeCollator
) -> tuple[list[BranchedExample], list[BranchedExample]]:
    """``(train, heldout)``: the file's samples, or the demo mix of those that fit ``max_length``."""
    examples = load_examples(args.data_path) if args.data_path else demo_mix(collator.fits)
    validate_examples(examples, collator.branch_names)
    return split_heldout(examples, every=args.heldout_every)


def _rl_trained(
    dense: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[BranchedExample],
    args: MetisHomeArguments,
    training_args: TrainingArguments,
) -> PreTrainedModel:
    """The dense model after Stage-RL, saved to ``output_dir/rl/model``; a resumed run whose RL stage finished
    reloads that model instead of running the stage again."""
    saved = Path(training_args.output_dir) / "rl" / "model"
    if wants_resume(training_args.resume_from_checkpoint) is not False and (saved / "config.json").is_file():
        logger.warning("Stage-RL already finished in %s; resuming from its model.", saved)
        return type(dense).from_pretrained(saved, dtype=torch.float32)
    trainer = run_rl_stage(dense, tokenizer, examples, args, training_args)
    save_pretrained_once(trainer, saved, trainer.model)
    return trainer.model


def _card_details(args: MetisHomeArguments, routing: dict) -> dict:
    """What the model card lists: the stages run and the router's held-out accuracy."""
    stages = (
        [("RL", f"GRPO on the dense model, {args.rl_steps} steps, verifiable rewards")] if args.rl_steps > 0 else []
    )
    stages.append(("SFT", "expanded into thinking / non-thinking branches; LM loss + query-router cross-entropy"))
    accuracy = {
        "task_type": "text-classification",
        "task_name": "branch routing",
        "dataset_type": "held-out",
        "dataset_name": "held-out thinking / non-thinking prompts",
        "metric_type": "accuracy",
        "metric_name": "router accuracy",
        "metric_value": routing["router_accuracy"],
    }
    return {"training_stages": stages, "eval_results": [accuracy]}


def run(args: MetisHomeArguments, training_args: TrainingArguments) -> tuple[dict, MetisHomeForConditionalGeneration]:
    """RL (optional) -> expansion -> SFT -> routing evaluation; writes ``output_dir/metis_home`` (the model and
    tokenizer) and ``output_dir/results.json`` (main process only), and returns the results and the trained model
    (under FSDP: a plain copy on the main process, the sharded model on the others; the results on all)."""
    output_dir = Path(training_args.output_dir)
    dense, tokenizer = load_causal_lm(args.model_path)
    options = dict(
        router_layer=args.router_layer, router_pooling=args.router_pooling, router_loss_coef=args.router_loss_coef
    )
    collator = MetisHomeCollator(tokenizer, ["non_thinking", "thinking"], args.max_length)
    train, heldout = load_data(args, collator)
    if args.rl_steps > 0:
        dense = _rl_trained(dense, tokenizer, [e for e in train if e.branch == THINKING], args, training_args)
    torch.manual_seed(args.router_seed)
    metis = expand_to_metis_home(dense, **options)
    before = evaluate_routing(metis, tokenizer, heldout, args.eval_batch_size)
    trainer = run_sft_stage(metis, tokenizer, train, args, training_args)
    # Under FSDP the router's parameters are shards outside any forward (route() is not forward), and saving needs
    # the full weights: the main process evaluates and saves a plain copy; the others get its results.
    trained = unsharded_copy(trainer) if trainer.is_fsdp_enabled else metis
    results = None
    if trained is not None:
        after = evaluate_routing(trained, tokenizer, heldout, args.eval_batch_size)
        trained.card_details = _card_details(args, after)
        results = {
            "train_samples": len(train),
            "heldout_samples": len(heldout),
            "rl_steps": args.rl_steps,
            "sft_steps": trainer.state.global_step,
            "router_layer": trained.config.router_layer_index,
            "router_pooling": trained.config.router_pooling,
            "heldout_routing_at_expansion": before,
            "heldout_routing": after,
            "log_history": [entry for entry in trainer.state.log_history if "loss" in entry],
        }
    if trainer.is_world_process_zero():  # every process holds the same model and results; one writes them
        with atomic_directory(output_dir / "metis_home") as folder:
            trained.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    results = broadcast_from_main(results) if trainer.is_fsdp_enabled else results
    trainer.accelerator.wait_for_everyone()
    metis = trained if trained is not None else metis
    return results, metis


__all__ = [
    "MetisHomeArguments",
    "MetisHomeTrainer",
    "accuracy_reward",
    "evaluate_routing",
    "format_reward",
    "run",
    "run_rl_stage",
    "run_sft_stage",
]
