"""Benchmark decoding through one MoE layer: forward (no grad) for T = 1..64 tokens, moe_zoo's experts implementation
vs transformers' eager, grouped_mm and batched_mm, against the memory-bandwidth floor.

Decoding is bound by memory bandwidth: a step must read every expert some token routed to. The floor for each T is
the bytes of those experts' weights (counted from the block's own routing of the input) divided by this machine's
bandwidth, measured in the same run by copying a buffer far larger than the caches. Every variant shares the
router and expert weights. This machine is noisy: compare ratios from one run.

    python benchmarks/bench_decode.py                     # H=1024, I=704, E=16, k=2 (the block benchmark's shape)
    python benchmarks/bench_decode.py --quick             # tiny sizes, one repeat: checks that it runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_moe_block import OURS, moe_zoo_block
from timing import add_machine_options, environment, interleaved_medians, median_seconds, run_measured, write_report

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm", OURS)
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def bandwidth_gb_per_s(megabytes: int = 512, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Read + write bandwidth of a large copy on ``device`` (the median of ``repeats`` after one warm-up), in GB/s."""
    source = torch.ones(megabytes * 2**18, device=device)
    target = torch.empty_like(source)
    return 2 * source.nbytes / median_seconds(lambda: target.copy_(source), repeats, source.device) / 1e9


def routed_expert_bytes(bank, router_weight: torch.Tensor, indices: torch.Tensor) -> int:
    """Bytes of the experts of ``bank`` that ``indices`` route to (each read once; empty slots skipped) plus the
    router's: what a decoding step must read."""
    experts = torch.unique(indices[indices < bank.num_experts]).numel()
    per_expert = (bank.gate_up_proj[0].numel() + bank.down_proj[0].numel()) * bank.down_proj.element_size()
    return experts * per_expert + router_weight.numel() * router_weight.element_size()


def active_expert_bytes(block, x: torch.Tensor) -> int:
    """:func:`routed_expert_bytes` of the experts moe_zoo's ``block`` routes ``x``'s tokens to."""
    with torch.no_grad():
        _, _, indices = block.route(x.reshape(-1, x.shape[-1]))
    return routed_expert_bytes(block.experts, block.gate.weight, indices)


def run(hidden: int, intermediate: int, experts: int, top_k: int, token_counts, repeats: int) -> dict:
    bandwidth = bandwidth_gb_per_s()
    ours = moe_zoo_block(OURS, hidden, intermediate, experts, top_k).eval()
    variants = {}
    for implementation in IMPLEMENTATIONS:
        block = ours if implementation == OURS else moe_zoo_block(implementation, hidden, intermediate, experts, top_k)
        block.load_state_dict(ours.state_dict())
        variants[f"moe_zoo_block[{implementation}]"] = block.eval()
    results = {}
    for tokens in token_counts:
        torch.manual_seed(tokens)
        x = torch.randn(1, tokens, hidden)
        timings = interleaved_medians(variants, x, repeats, metrics=("forward_ms",))
        floor_ms = active_expert_bytes(ours, x) / (bandwidth * 1e9) * 1e3
        results[str(tokens)] = {
            "bandwidth_floor_ms": round(floor_ms, 4),
            **{
                name: {"forward_ms": t["forward_ms"], "vs_floor": round(t["forward_ms"] / floor_ms, 2)}
                for name, t in timings.items()
            },
        }
    return {
        "benchmark": "moe_decode",
        "shape": dict(hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k),
        "bandwidth_gb_per_s": round(bandwidth, 1),
        "repeats": repeats,
        "dtype": "float32",
        **environment(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS))
    parser.add_argument("--repeats", type=int, default=20)
    add_machine_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the script runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/moe_decode_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.experts, args.tokens, args.repeats = 16, 24, 4, [1, 4], 1
    report = run_measured(
        args, lambda: run(args.hidden, args.intermediate, args.experts, args.top_k, args.tokens, args.repeats)
    )
    write_report(args.output, report)
    print(f"bandwidth {report['bandwidth_gb_per_s']} GB/s; forward time / bandwidth floor:")
    names = [name for name in next(iter(report["results"].values())) if name != "bandwidth_floor_ms"]
    print(f"{'T':>4s} {'floor ms':>9s} " + " ".join(f"{name:>26s}" for name in names))
    for tokens, row in report["results"].items():
        cells = " ".join(f"{row[name]['forward_ms']:10.3f} ms ({row[name]['vs_floor']:6.1f}x)" for name in names)
        print(f"{tokens:>4s} {row['bandwidth_floor_ms']:9.4f} {cells}")
    return report


if __name__ == "__main__":
    main()
