"""Benchmark one end-to-end training step of a small MoE-LLaVA against the dense LLaVA with the same active parameters.

Both models share the vision tower, projector, attention and embeddings; the MoE has ``E`` experts of width ``I`` in
every layer with top-``k`` routing (and its router loss), the dense model one FFN of width ``k * I``, so a token
touches the same number of parameters in both. A step is forward, backward and an AdamW update on a batch of image
conversations, timed round-robin with the MoE under each experts implementation, and once more with moe_zoo's CPU
grouped GEMM in training too (``MOE_ZOO_MKL=always``; by default training loops over the experts with ``mm``). This
machine is noisy: compare ratios from one run.

    python benchmarks/bench_training_step.py
    python benchmarks/bench_training_step.py --quick      # tiny sizes, one repeat: checks that it runs
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from unittest import mock

import torch
from bench_moe_block import OURS
from timing import add_machine_options, environment, interleaved_step_medians, run_measured, write_report
from transformers import CLIPVisionConfig, LlamaConfig

import moe_zoo
from moe_zoo.core.mkl_grouped import SWITCH as MKL_SWITCH

IMAGE_TOKEN = 3


def _model(hidden: int, intermediate: int, layers: int, experts: int, top_k: int, implementation: str | None):
    """MoE-LLaVA with ``experts`` experts of width ``intermediate`` in every layer, or (``implementation`` None) the
    dense model with one FFN of width ``top_k * intermediate``."""
    dense = implementation is None
    config = moe_zoo.MoeLlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        ),
        text_config=LlamaConfig(
            vocab_size=1024,
            hidden_size=hidden,
            intermediate_size=top_k * intermediate if dense else intermediate,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
        ),
        moe_layers="none" if dense else "all",
        num_experts=experts,
        num_experts_per_tok=top_k,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
        output_router_logits=not dense,
    )
    torch.manual_seed(0)
    model = moe_zoo.MoeLlavaForConditionalGeneration(config).train()
    if not dense:
        model.set_experts_implementation(implementation)
    return model


def _batch(batch: int, text_tokens: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(4, 1024, (batch, text_tokens), generator=generator)
    ids = torch.cat([text[:, :1], torch.full((batch, 16), IMAGE_TOKEN), text[:, 1:]], dim=1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(batch, 3, 64, 64, generator=generator)}


def _step(model: torch.nn.Module, batch: dict, environment: dict[str, str] | None = None):
    """One training step of ``model`` on ``batch``, with ``environment`` variables set while it runs."""
    # fused: how the Trainer's default optimizer (``adamw_torch_fused``) runs AdamW
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        with mock.patch.dict(os.environ, environment or {}):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def run(
    hidden: int, intermediate: int, layers: int, experts: int, top_k: int, batch: int, text_tokens: int, repeats: int
) -> dict:
    inputs = _batch(batch, text_tokens)
    models = {"dense_same_active_parameters": _model(hidden, intermediate, layers, experts, top_k, None)}
    for implementation in (OURS, "grouped_mm", "eager"):
        models[f"moe_llava[{implementation}]"] = _model(hidden, intermediate, layers, experts, top_k, implementation)
    with_mkl = f"moe_llava[{OURS}, {MKL_SWITCH}=always]"  # moe_zoo's CPU grouped GEMM in training too
    models[with_mkl] = _model(hidden, intermediate, layers, experts, top_k, OURS)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    environments = {with_mkl: {MKL_SWITCH: "always"}}
    steps = {name: {"step_ms": _step(m, inputs, environments.get(name))} for name, m in models.items()}
    results = interleaved_step_medians(steps, repeats, count_page_faults=True)
    floor = results["dense_same_active_parameters"]["step_ms"]
    for name, timing in results.items():
        timing["vs_dense"] = round(timing["step_ms"] / floor, 3)
        timing["parameters"] = counts[name]
    return {
        "benchmark": "moe_llava_training_step",
        "shape": dict(
            hidden=hidden,
            intermediate=intermediate,
            layers=layers,
            experts=experts,
            top_k=top_k,
            batch=batch,
            tokens_per_sample=text_tokens + 16,
        ),
        "step": "forward + backward + AdamW step (router loss included for the MoE)",
        "repeats": repeats,
        "dtype": "float32",
        **environment(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=8)  # two rotations of the four variants
    add_machine_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the script runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/moe_llava_step_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.experts, args.batch, args.text_tokens = 64, 64, 2, 4, 2, 8
        args.repeats = 1
    shape = (args.hidden, args.intermediate, args.layers, args.experts, args.top_k, args.batch, args.text_tokens)
    report = run_measured(args, lambda: run(*shape, args.repeats))
    write_report(args.output, report)
    for name, timing in report["results"].items():
        print(
            f"{name:40s} step {timing['step_ms']:9.2f} ms ({timing['vs_dense']:.2f}x dense)   "
            f"{timing['parameters'] / 1e6:6.1f}M parameters   {timing['page_faults']['step_ms']} page faults"
        )
    return report


if __name__ == "__main__":
    main()
