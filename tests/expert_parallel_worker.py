"""One process of the 2-process expert-parallel check in ``tests/test_expert_parallel.py`` (not a test module).

Started by ``torchrun --nproc_per_node 2 tests/expert_parallel_worker.py SPEC.json``. For every case of the spec
(a saved moe_zoo model folder and a ``DistributedConfig``), each rank loads the folder with transformers' own
``from_pretrained(..., distributed_config=...)``, which applies the model's TP/EP plans, and writes to
``<out>/<case>.rank<R>.pt``: the local shape and values of every expert tensor and the bank's ``num_experts``
after sharding, the eval logits, and the training loss and gradients of one forward/backward. With ``save`` it also
saves the model from all ranks (transformers gathers the shards on rank 0). The test compares all of it with the
single-process model. Runs on CPU with gloo (transformers picks the backend from the device).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.distributed import DistributedConfig

import moe_zoo  # noqa: F401  (registers the model classes)
from moe_zoo.core import SparseMoeBlock

AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "image_text_to_text": AutoModelForImageTextToText}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor, as a plain CPU tensor."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().cpu().clone()


def run_case(case: dict[str, Any], out: Path, rank: int) -> None:
    model = AUTO_CLASSES[case["auto_class"]].from_pretrained(
        case["folder"], distributed_config=DistributedConfig(**case["distributed_config"])
    )
    inputs = {key: value.to(model.device) for key, value in torch.load(case["inputs"]).items()}
    record: dict[str, Any] = {"ep_plan": dict(model.ep_plan), "experts": {}, "routers": {}}
    for name, block in model.named_modules():
        if isinstance(block, SparseMoeBlock):
            tensors = {n: local(p) for n, p in block.experts.named_parameters(recurse=False)}
            global_shapes = {n: tuple(p.shape) for n, p in block.experts.named_parameters(recurse=False)}
            record["experts"][name] = {
                "num_experts": block.experts.num_experts,
                "tensors": tensors,
                "global_shapes": global_shapes,
                "is_dtensor": {n: hasattr(p, "to_local") for n, p in block.experts.named_parameters(recurse=False)},
            }
            record["routers"][name] = type(block.gate.weight).__name__
    model.eval()
    with torch.no_grad():
        record["logits"] = local(model(**inputs, use_cache=False).logits)
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"], output_router_logits=True, use_cache=False).loss
    loss.backward()
    record["loss"] = loss.item()
    record["grads"] = {
        name: local(param.grad)
        for name, param in model.named_parameters()
        if param.grad is not None and (".experts." in name or name.endswith("mlp.gate.weight"))
    }
    torch.save(record, out / f"{case['name']}.rank{rank}.pt")
    if case.get("save"):
        model.zero_grad(set_to_none=True)
        model.save_pretrained(out / f"{case['name']}.saved")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    rank = int(os.environ["RANK"])
    for case in spec["cases"]:
        run_case(case, out, rank)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
