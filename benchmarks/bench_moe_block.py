"""Benchmark one MoE layer: moe_zoo's SparseMoeBlock vs transformers' MixtralSparseMoeBlock vs the dense floor.

Every variant runs in the same process on the same inputs and weights, forward and forward+backward, and the
result is written as JSON with medians and ratios to the dense floor (a dense SwiGLU FFN of intermediate size
k * I, i.e. the same active FLOPs as top-k routing with perfectly balanced experts). This machine is noisy: compare
ratios from one run, not absolute times across runs.

    python benchmarks/bench_moe_block.py --tokens 2048 --hidden 512 --intermediate 1024 --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from timing import interleaved_medians
from transformers import MixtralConfig, PreTrainedConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_zoo.core import GatedMLP, MoeOptions, SparseMoeBlock

BATCHED_MM_MAX_BYTES = 2 * 2**30


class BenchConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_bench"


def run(tokens: int, hidden: int, intermediate: int, experts: int, top_k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden)
    variants: dict[str, torch.nn.Module] = {}
    skipped = {}
    implementations = ["eager", "batched_mm", "grouped_mm"]
    # batched_mm gathers a private copy of the expert weights for every (token, expert) pair: fine for decoding,
    # tens of GB for a training-size batch.
    gathered_bytes = tokens * top_k * 3 * intermediate * hidden * 4
    if gathered_bytes > BATCHED_MM_MAX_BYTES:
        implementations.remove("batched_mm")
        skipped["batched_mm"] = f"would gather {gathered_bytes / 2**30:.1f} GiB of expert weights"
    for implementation in implementations:
        config = BenchConfig(num_experts=experts, num_experts_per_tok=top_k)
        config._experts_implementation = implementation
        block = SparseMoeBlock(config, hidden, intermediate, "silu")
        block.experts.reset_parameters(0.02)
        block.reset_routing(0.02)
        variants[f"moe_zoo[{implementation}]"] = block
    for implementation in ("eager", "grouped_mm"):
        mixtral_config = MixtralConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts, num_experts_per_tok=top_k
        )
        mixtral_config._experts_implementation = implementation
        reference = MixtralSparseMoeBlock(mixtral_config)
        reference.load_state_dict(variants["moe_zoo[eager]"].state_dict(), strict=False)
        variants[f"transformers_mixtral[{implementation}]"] = reference
    variants["dense_floor"] = GatedMLP(hidden, top_k * intermediate, "silu")

    results = interleaved_medians(variants, x, repeats)
    floor = results["dense_floor"]
    for timing in results.values():
        for key in ("forward_ms", "forward_backward_ms"):
            timing[key.replace("_ms", "_vs_dense_floor")] = round(timing[key] / floor[key], 3)
    return {
        "benchmark": "moe_block",
        "shape": dict(tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k),
        "repeats": repeats,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/moe_block_cpu.json"))
    args = parser.parse_args(argv)
    report = run(args.tokens, args.hidden, args.intermediate, args.experts, args.top_k, args.repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name, timing in report["results"].items():
        print(
            f"{name:34s} fwd {timing['forward_ms']:8.2f} ms ({timing['forward_vs_dense_floor']:.2f}x floor)   "
            f"fwd+bwd {timing['forward_backward_ms']:8.2f} ms ({timing['forward_backward_vs_dense_floor']:.2f}x)"
        )
    return report


if __name__ == "__main__":
    main()
