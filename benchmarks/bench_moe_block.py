"""Benchmark one MoE layer, forward and forward+backward: moe_zoo's experts implementation vs transformers' eager and
grouped_mm experts vs the dense floor, all in one process on the same inputs and weights.

Contenders (every expert bank has the same weights; routing is each block's own, softmax top-k):

- ``dense_floor``: one SwiGLU FFN of the experts' size over ``T * k`` tokens, i.e. exactly the FLOPs of top-k routing
  with perfectly balanced experts, and no routing at all: what an MoE layer costs at best;
- ``transformers_qwen3_moe[eager | grouped_mm | moe_zoo]``: transformers' ``Qwen3MoeSparseMoeBlock`` (its router, its
  experts class) with each experts implementation, ``moe_zoo`` being ours (registered on ``import moe_zoo``);
- ``moe_zoo_block[eager | batched_mm | grouped_mm | moe_zoo]``: moe_zoo's ``SparseMoeBlock`` with each one
  (``batched_mm`` only where its per-pair copy of the expert weights fits in memory);
- ``moe_zoo_block[moe_zoo, MOE_ZOO_MKL=always]``: the same block with its CPU grouped GEMM (MKL's ``sgemm_batch``,
  see ``moe_zoo.core.mkl_grouped``) in training too; by default it runs only in passes without a backward (the
  forward here), and training loops over the experts with ``torch.mm``.

The JSON holds medians of interleaved repeats, ratios to the floor computed within the run, and the bytes each
variant keeps for its backward (the activation memory of a training step; CPU torch has no peak-memory counter).
This machine is noisy: compare ratios from one run, not absolute times across runs.

    python benchmarks/bench_moe_block.py                  # issue 5's CPU shape: T=2048, H=1024, I=704, E=16, k=2
    python benchmarks/bench_moe_block.py --quick          # tiny sizes, one repeat: checks that it runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import (
    WithEnvironment,
    add_machine_options,
    environment,
    interleaved_medians,
    run_measured,
    saved_for_backward_bytes,
    write_report,
)
from transformers import PreTrainedConfig, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moe_zoo  # noqa: F401  (registers the "moe_zoo" experts implementation)
from moe_zoo.core import GatedMLP, MoeOptions, SparseMoeBlock
from moe_zoo.core.mkl_grouped import SWITCH as MKL_SWITCH

BATCHED_MM_MAX_BYTES = 2 * 2**30
OURS = "moe_zoo"


class BenchConfig(PreTrainedConfig, MoeOptions):
    model_type = "moe_zoo_bench"


def moe_zoo_block(implementation: str, hidden: int, intermediate: int, experts: int, top_k: int) -> SparseMoeBlock:
    config = BenchConfig(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True)
    config._experts_implementation = implementation
    block = SparseMoeBlock(config, hidden, intermediate, "silu")
    torch.manual_seed(1)
    block.experts.reset_parameters(0.02)
    block.reset_routing(0.02)
    return block


def qwen3_moe_block(
    implementation: str, hidden: int, intermediate: int, experts: int, top_k: int, weights: dict | None = None
) -> Qwen3MoeSparseMoeBlock:
    """transformers' Qwen3-MoE block at this shape with ``implementation`` experts (``weights``: a state dict)."""
    config = Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=intermediate,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
    )
    config._experts_implementation = implementation
    block = Qwen3MoeSparseMoeBlock(config)
    if weights is not None:
        block.load_state_dict(weights)
    return block


def run(tokens: int, hidden: int, intermediate: int, experts: int, top_k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden)
    variants: dict[str, torch.nn.Module] = {"dense_floor": GatedMLP(hidden, intermediate, "silu")}
    inputs = {"dense_floor": torch.randn(1, tokens * top_k, hidden)}
    skipped = {}
    ours = moe_zoo_block(OURS, hidden, intermediate, experts, top_k)
    weights = {name: ours.state_dict()[name] for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    for implementation in ("eager", "grouped_mm", OURS):
        variants[f"transformers_qwen3_moe[{implementation}]"] = qwen3_moe_block(
            implementation, hidden, intermediate, experts, top_k, weights
        )
    # batched_mm gathers a private copy of the expert weights for every (token, expert) pair: fine for decoding,
    # tens of GB for a training-size batch.
    implementations = ["eager", "batched_mm", "grouped_mm", OURS]
    gathered_bytes = tokens * top_k * 3 * intermediate * hidden * 4
    if gathered_bytes > BATCHED_MM_MAX_BYTES:
        implementations.remove("batched_mm")
        skipped["moe_zoo_block[batched_mm]"] = f"would gather {gathered_bytes / 2**30:.1f} GiB of expert weights"
    for implementation in implementations:
        block = ours if implementation == OURS else moe_zoo_block(implementation, hidden, intermediate, experts, top_k)
        block.load_state_dict(ours.state_dict())
        variants[f"moe_zoo_block[{implementation}]"] = block
    variants[f"moe_zoo_block[{OURS}, {MKL_SWITCH}=always]"] = WithEnvironment(ours, **{MKL_SWITCH: "always"})

    with torch.no_grad():
        expected = variants["transformers_qwen3_moe[eager]"](x)
        errors = {name: (module(x) - expected).abs().max().item() for name, module in variants.items() if "[" in name}
    results = interleaved_medians(variants, x, repeats, inputs, count_page_faults=True)
    floor = results["dense_floor"]
    floor_bytes = saved_for_backward_bytes(variants["dense_floor"], inputs["dense_floor"])
    for name, timing in results.items():
        for key in ("forward_ms", "forward_backward_ms"):
            timing[key.replace("_ms", "_vs_dense_floor")] = round(timing[key] / floor[key], 3)
        saved = saved_for_backward_bytes(variants[name], inputs.get(name, x))
        timing["saved_for_backward_mib"] = round(saved / 2**20, 2)
        timing["saved_for_backward_vs_dense_floor"] = round(saved / floor_bytes, 3)
        if name in errors:
            timing["max_abs_error_vs_transformers_eager"] = errors[name]
    return {
        "benchmark": "moe_block",
        "shape": dict(tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k),
        "dense_floor": f"one SwiGLU FFN (intermediate {intermediate}) over tokens * top_k = {tokens * top_k} tokens",
        "repeats": repeats,
        "dtype": "float32",
        **environment(),
        "results": results,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    add_machine_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the script runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/moe_block_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.intermediate, args.experts, args.repeats = 32, 16, 24, 4, 1
    report = run_measured(
        args, lambda: run(args.tokens, args.hidden, args.intermediate, args.experts, args.top_k, args.repeats)
    )
    write_report(args.output, report)
    for name, timing in report["results"].items():
        print(
            f"{name:44s} fwd {timing['forward_ms']:8.2f} ms ({timing['forward_vs_dense_floor']:.2f}x floor)   "
            f"fwd+bwd {timing['forward_backward_ms']:8.2f} ms ({timing['forward_backward_vs_dense_floor']:.2f}x)   "
            f"saved {timing['saved_for_backward_mib']:7.1f} MiB ({timing['saved_for_backward_vs_dense_floor']:.2f}x)   "
            f"page faults {timing['page_faults']['forward_ms']}/{timing['page_faults']['forward_backward_ms']}"
        )
    return report


if __name__ == "__main__":
    main()
