"""One process of the DeepSpeed checks in ``tests/test_deepspeed.py`` (not a test module).

``torchrun --nproc_per_node 2 tests/deepspeed_worker.py SPEC.json`` fine-tunes an upcycled MoE with the recipe of
``training_scripts/finetune_upcycled.py`` (:func:`moe_zoo.training.finetune.run`: ``TrainingArguments`` first, then
the dense model loaded with ``from_pretrained`` and :func:`moe_zoo.upcycle`d, then its ``RoutingStatsTrainer``), with
``TrainingArguments(deepspeed=<config>)``;
without a config it is the one-process reference (run in the test's own process by :func:`train`). Rank 0 writes
``result.json`` (the logged losses, how the experts and routers are partitioned on every rank) and the trained
model's logits on fixed ids; the Trainer saves the final model into ``output_dir``.

Two things make DeepSpeed run on CPU processes (the spec's ``cpu``, run with ``CUDA_VISIBLE_DEVICES=""``), and both are
set here only then:

* accelerate (1.16) finds no device backend on a CPU-only torch, so under ``ACCELERATE_USE_DEEPSPEED`` it counts one
  process and the Trainer would fill ``train_batch_size`` for a world of 1 (DeepSpeed then refuses the config) and
  would not shard the data. A ``PartialState(backend="gloo")`` made first, and handed to the Trainer with
  ``accelerator_config={"use_configured_state": True}``, has the real world size; DeepSpeed's CPU accelerator runs
  its collectives over gloo.
* DeepSpeed's CPU communication backend compiles a shared-memory all-reduce op with ninja the first time (about
  45 s on 2 cores); it serves only DeepSpeed-inference's ``inference_all_reduce``, which ZeRO training never calls,
  so it is marked unavailable and gloo's all-reduce is used throughout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from moe_zoo.training.finetune import UpcycleFinetuneArguments, run

PROBE_IDS = [[5, 17, 42, 99, 7, 3, 250, 11], [64, 8, 120, 33, 2, 77, 15, 9]]
"""Token ids whose logits are compared between the trained engine, its saved checkpoint and the reference."""


def cpu_deepspeed_state() -> dict[str, Any]:
    """The accelerate state and ``accelerator_config`` that let DeepSpeed run on CPU processes (see the module doc)."""
    import deepspeed.ops
    from accelerate import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"use_configured_state": True}


def partitioning(engine: Any, model: torch.nn.Module) -> dict[str, Any]:
    """What this rank holds: for ZeRO-3 the local partition of every expert tensor and router weight, how much of the
    full tensor is materialised outside a forward (nothing, except for the small tensors ZeRO-3 keeps whole on every
    rank: ``ds_persist``, below ``stage3_param_persistence_threshold``), and for every stage its share of the fp32
    master weights and optimizer state."""
    record: dict[str, Any] = {"stage": engine.zero_optimization_stage(), "params": {}}
    if record["stage"] == 3:
        record["persistence_threshold"] = engine.zero_param_persistence_threshold()
    for name, param in model.named_parameters():
        if ".mlp.experts." in name or name.endswith("mlp.gate.weight"):
            if hasattr(param, "ds_id"):
                record["params"][name] = {
                    "full_numel": param.ds_numel,
                    "full_shape": list(param.ds_shape),
                    "local_numel": param.ds_tensor.numel(),
                    "materialised_numel": param.data.numel(),
                    "persistent": bool(getattr(param, "ds_persist", False)),
                }
            else:
                record["params"][name] = {"full_numel": param.numel(), "local_numel": param.numel()}
    optimizer = engine.optimizer
    record["total_numel"] = sum(p.numel() if not hasattr(p, "ds_id") else p.ds_numel for p in model.parameters())
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        record["fp32_partition_numel"] = sum(t.numel() for t in optimizer.single_partition_of_fp32_groups)
    elif hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        record["fp32_partition_numel"] = sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat)
    return record


def train(spec: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning run of ``spec``; returns (and on rank 0 writes) its result."""
    config = spec.get("deepspeed")
    extra: dict[str, Any] = {}
    on_cpu = spec.get("cpu", not torch.cuda.is_available())
    if config and on_cpu:
        extra["accelerator_config"] = cpu_deepspeed_state()
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["per_device_train_batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"],
        max_steps=spec["max_steps"],
        learning_rate=spec["learning_rate"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        deepspeed=config,
        use_cpu=on_cpu and not config,
        bf16=spec.get("bf16", False),
        **extra,
    )
    moe_args = UpcycleFinetuneArguments(
        data_file=spec["data_file"], model_path=spec["model_path"], moe_layers="sparse", max_length=32
    )
    trainer = run(moe_args, args)  # the recipe itself: upcycle, RoutingStatsTrainer, train, save_model
    result: dict[str, Any] = {
        "world_size": args.world_size,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        # Reduced over processes by the RoutingStatsTrainer: the same micro-batches as the one-process reference.
        "aux_losses": [entry["aux_loss"] for entry in trainer.state.log_history if "aux_loss" in entry],
        "expert_counts": {name: counts.tolist() for name, counts in trainer.expert_counts.items()},
    }
    if config:
        local = partitioning(trainer.model_wrapped, trainer.model)
        gathered: list[Any] = [None] * args.world_size
        torch.distributed.all_gather_object(gathered, local)
        result["ranks"] = gathered
    trainer.model.eval()
    with torch.no_grad():  # every rank runs it: under ZeRO-3 each forward gathers the partitions from all ranks
        logits = trainer.model(torch.tensor(PROBE_IDS, device=args.device)).logits.float().cpu()
    if trainer.is_world_process_zero():
        torch.save(logits, Path(spec["output_dir"]) / "trained_logits.pt")
        (Path(spec["output_dir"]) / "result.json").write_text(json.dumps(result))
    return result


def main() -> None:
    train(json.loads(Path(sys.argv[1]).read_text()))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
