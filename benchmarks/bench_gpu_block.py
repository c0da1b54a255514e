"""Benchmark one MoE layer on a GPU (bf16): forward+backward, forward, decoding and peak memory, moe_zoo's experts
implementation (its Triton kernels, and with ``MOE_ZOO_TRITON=0`` its ``torch._grouped_mm`` path) vs transformers'
``eager`` and ``grouped_mm`` experts vs the dense floor, all in one process on the same weights.

Shapes (``--shape``), each transformers' ``Qwen3MoeSparseMoeBlock`` with the experts' sizes of:

- ``mixtral``: a Mixtral-8x7B layer (H=4096, I=14336, E=8, top-2), few large experts;
- ``qwen3``: a Qwen3-30B-A3B layer (H=2048, I=768, E=128, top-8), many fine-grained experts.

Figures in the JSON: medians of interleaved repeats (CUDA-synchronised), each variant's time over the dense floor
(one SwiGLU FFN over ``T * k`` tokens) and over transformers' ``grouped_mm``, its achieved TFLOP/s over the rate of
one dense bf16 GEMM of the floor's first projection measured in the same run, the peak memory a forward+backward
allocates beyond the weights, and decoding (T = 1..64) over the bandwidth floor (the bytes of the experts routed to
at the device's measured copy bandwidth).

    python benchmarks/bench_gpu_block.py --shape mixtral
    python benchmarks/bench_gpu_block.py --shape qwen3
    python benchmarks/bench_gpu_block.py --device cpu --quick     # tiny, fp32, on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from bench_decode import TOKEN_COUNTS, bandwidth_gb_per_s, routed_expert_bytes
from bench_moe_block import OURS, qwen3_moe_block
from timing import (
    WithEnvironment,
    environment,
    forward_steps,
    interleaved_step_medians,
    median_seconds,
    synchronize,
    write_report,
)
from torch import nn

from moe_zoo.core import GatedMLP
from moe_zoo.core.routed_pairs import TRITON_SWITCH

SHAPES = {
    "mixtral": dict(hidden=4096, intermediate=14336, experts=8, top_k=2),
    "qwen3": dict(hidden=2048, intermediate=768, experts=128, top_k=8),
}
QUICK_SHAPE = dict(hidden=32, intermediate=48, experts=4, top_k=2)
TORCH_GROUPED_MM_PATH = f"{OURS}, {TRITON_SWITCH}=0"


def _synchronized(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    def step() -> None:
        fn()
        synchronize(device)

    return step


def variants(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The floor and the MoE blocks, the MoE blocks sharing one set of router and expert weights."""
    hidden, intermediate = shape["hidden"], shape["intermediate"]
    torch.manual_seed(0)
    floor = GatedMLP(hidden, intermediate, "silu").to(device, dtype)
    blocks = {name: qwen3_moe_block(name, **shape).to(device, dtype) for name in ("eager", "grouped_mm", OURS)}
    reference = blocks[OURS]
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.02)
    for block in blocks.values():
        block.gate.weight = reference.gate.weight
        block.experts.gate_up_proj = reference.experts.gate_up_proj
        block.experts.down_proj = reference.experts.down_proj
    return {
        "dense_floor": floor,
        **{f"transformers_qwen3_moe[{name}]": block for name, block in blocks.items()},
        f"transformers_qwen3_moe[{TORCH_GROUPED_MM_PATH}]": WithEnvironment(reference, **{TRITON_SWITCH: "0"}),
    }


def dense_gemm_tflops(rows: int, hidden: int, width: int, device, dtype, repeats: int) -> float:
    """The rate of one dense ``(rows, H) @ (H, width)`` GEMM: what a grouped GEMM of the same size could reach."""
    a = torch.randn(rows, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, width, device=device, dtype=dtype)
    return 2 * rows * hidden * width / median_seconds(lambda: torch.mm(a, b), repeats, device) / 1e12


def peak_extra_mib(module: nn.Module, x: torch.Tensor) -> float | None:
    """Memory a forward+backward allocates at its peak beyond what was allocated before (CUDA only)."""
    if x.device.type != "cuda":
        return None
    step = forward_steps(module, x)["forward_backward_ms"]
    step()
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    step()
    torch.cuda.synchronize(x.device)
    return round((torch.cuda.max_memory_allocated(x.device) - before) / 2**20, 1)


def run(shape: dict, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int, decode_tokens) -> dict:
    hidden, intermediate, top_k = shape["hidden"], shape["intermediate"], shape["top_k"]
    modules = variants(shape, device, dtype)
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    inputs = {name: x for name in modules}
    inputs["dense_floor"] = torch.randn(1, tokens * top_k, hidden, device=device, dtype=dtype)
    with torch.no_grad():
        expected = modules["transformers_qwen3_moe[eager]"](x).float()
        errors = {
            name: (module(x).float() - expected).abs().max().item() for name, module in modules.items() if "[" in name
        }
    steps = {
        name: {key: _synchronized(fn, device) for key, fn in forward_steps(module, inputs[name]).items()}
        for name, module in modules.items()
    }
    results = interleaved_step_medians(steps, repeats)
    flops = {"forward_ms": 2 * tokens * top_k * hidden * 3 * intermediate}
    flops["forward_backward_ms"] = 3 * flops["forward_ms"]
    gemm_tflops = dense_gemm_tflops(tokens * top_k, hidden, 2 * intermediate, device, dtype, repeats)
    floor, grouped = results["dense_floor"], results["transformers_qwen3_moe[grouped_mm]"]
    for name, timing in results.items():
        for key in ("forward_ms", "forward_backward_ms"):
            metric = key.removesuffix("_ms")
            timing[f"{metric}_vs_dense_floor"] = round(timing[key] / floor[key], 3)
            timing[f"{metric}_speedup_over_grouped_mm"] = round(grouped[key] / timing[key], 3)
            tflops = flops[key] / (timing[key] / 1e3) / 1e12
            timing[f"{metric}_tflops"] = round(tflops, 2)
            timing[f"{metric}_vs_dense_gemm_rate"] = round(tflops / gemm_tflops, 3)
        timing["peak_extra_mib"] = peak_extra_mib(modules[name], inputs[name])
        if name in errors:
            timing["max_abs_error_vs_transformers_eager"] = errors[name]
    return {
        "benchmark": "moe_block_gpu",
        "shape": {**shape, "tokens": tokens},
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        **environment(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dense_gemm_tflops": round(gemm_tflops, 1),
        "results": results,
        "decode": decode(modules, shape, device, dtype, repeats, decode_tokens),
    }


def decode(modules: dict, shape: dict, device, dtype, repeats: int, token_counts) -> dict:
    """Forward of each MoE variant for a few tokens, over the bandwidth floor of the experts they are routed to."""
    megabytes = 1024 if device.type == "cuda" else 256
    bandwidth = bandwidth_gb_per_s(megabytes, device=device)
    moe = {name: module for name, module in modules.items() if name != "dense_floor"}
    reference = modules[f"transformers_qwen3_moe[{OURS}]"]
    rows = {"bandwidth_gb_per_s": round(bandwidth, 1)}
    for tokens in token_counts:
        x = torch.randn(1, tokens, shape["hidden"], device=device, dtype=dtype)
        steps = {
            name: {"forward_ms": _synchronized(forward_steps(m, x)["forward_ms"], device)} for name, m in moe.items()
        }
        timings = interleaved_step_medians(steps, repeats)
        with torch.no_grad():
            _, _, indices = reference.gate(x.reshape(-1, x.shape[-1]))
        floor_ms = routed_expert_bytes(reference.experts, reference.gate.weight, indices) / (bandwidth * 1e9) * 1e3
        rows[str(tokens)] = {
            "bandwidth_floor_ms": round(floor_ms, 4),
            **{
                name: {"forward_ms": t["forward_ms"], "vs_floor": round(t["forward_ms"] / floor_ms, 2)}
                for name, t in timings.items()
            },
        }
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks that it runs")
    parser.add_argument(
        "--output", type=Path, default=None, help="default: benchmarks/results/moe_block_gpu_<shape>.json"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark is for GPUs (use --device cpu --quick to check that it runs)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape, decode_tokens = SHAPES[args.shape], TOKEN_COUNTS
    if args.quick:
        shape, args.tokens, args.repeats, decode_tokens = QUICK_SHAPE, 64, 1, (1, 4)
    report = run(shape, args.tokens, device, dtype, args.repeats, decode_tokens)
    write_report(args.output or Path(f"benchmarks/results/moe_block_gpu_{args.shape}.json"), report)
    print(f"{report['device']}, {report['dtype']}, {report['shape']}; dense GEMM {report['dense_gemm_tflops']} TFLOP/s")
    for name, t in report["results"].items():
        print(
            f"{name:52s} fwd+bwd {t['forward_backward_ms']:9.3f} ms ({t['forward_backward_vs_dense_floor']:.2f}x floor,"
            f" {t['forward_backward_speedup_over_grouped_mm']:.2f}x faster than grouped_mm,"
            f" {t['forward_backward_vs_dense_gemm_rate']:.0%} of the GEMM rate)   fwd {t['forward_ms']:8.3f} ms"
            f"   peak {t['peak_extra_mib']} MiB"
        )
    return report


if __name__ == "__main__":
    main()
