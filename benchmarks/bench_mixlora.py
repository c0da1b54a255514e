"""Benchmark one MixLoRA FFN layer: moe_zoo's fused and naive paths vs the ``mixlora`` package vs the LoRA floor.

Every contender wraps the same frozen Llama FFN (``gate_proj`` / ``up_proj`` / ``down_proj``, SiLU) with LoRA of the
same rank on all three projections, and runs in the same process on the same inputs, forward (no grad) and
forward+backward (the input requires grad; LoRA tensors and the router train; the base FFN is frozen):

- ``lora_floor``: the dense FFN with one PEFT ``LoraConfig`` LoRA on the three projections; what a mixture of LoRA
  experts costs at best (MixLoRA adds about ``k`` times the LoRA work and the routing);
- ``moe_zoo_fused`` / ``moe_zoo_naive``: :class:`~moe_zoo.peft.MixLoraFeedForward` with ``expert_forward`` set;
- ``mixlora_package``: the ``mixlora`` package's (0.2.3) ``MixLoraSparseMoe`` built through its own config and
  ``LoraLinear`` experts, with the same router and expert weights as moe_zoo's layer.

Dropout: the package's ``LoraLinear`` refuses ``lora_dropout == 0``, so it is built with 0.05 and its dropout modules
are put in eval mode; every other contender has no dropout. All contenders therefore compute without dropout. The
variants run round-robin (interleaved) so background load hits all of them alike; the JSON holds medians and ratios
computed within the run. This machine is noisy: compare ratios from one run, not absolute times across runs.

    python benchmarks/bench_mixlora.py --tokens 2048 --hidden 576 --intermediate 1536 --experts 8 --top-k 2 --rank 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from timing import add_machine_options, environment, interleaved_medians, run_measured, write_report
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from moe_zoo.core import lora_pairs_kernel
from moe_zoo.peft import MixLoraConfig, MixLoraFeedForward

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PACKAGE_DROPOUT = 0.05
"""The package's ``LoraLinear`` asserts ``lora_dropout > 0``; its dropout runs in eval mode (a no-op) here."""


def _dense_ffn(hidden: int, intermediate: int, seed: int) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(
        LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu", num_attention_heads=1)
    )
    return mlp.requires_grad_(False)


def _lora_floor(hidden: int, intermediate: int, rank: int) -> nn.Module:
    """The dense FFN with one PEFT LoRA (rank ``rank``, B random so it is not a no-op) on the three projections."""
    mlp = _dense_ffn(hidden, intermediate, seed=0)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJECTIONS)), mlp)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model


def _moe_zoo(hidden: int, intermediate: int, experts: int, top_k: int, rank: int, forward: str):
    config = MixLoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        num_experts=experts,
        top_k=top_k,
        target_modules=list(PROJECTIONS),
        expert_forward=forward,
        router_init_range=0.1,
    )
    layer = MixLoraFeedForward(_dense_ffn(hidden, intermediate, seed=0), "default", config, set(PROJECTIONS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name in PROJECTIONS:
            getattr(layer, f"lora_B_{name}")["default"].normal_(0.0, 0.02)
    return layer


class _PackageLayer(nn.Module):
    """The ``mixlora`` package's MoE FFN as a module: its experts live in a plain dict, so this holds them (and the
    router tensor, which the package keeps as a bare attribute) where ``parameters()`` and ``zero_grad`` see them."""

    def __init__(self, moe: nn.Module, router: nn.Parameter, experts: nn.ModuleDict):
        super().__init__()
        self.moe = moe
        self.router = router
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states)


def _mixlora_package(reference: MixLoraFeedForward, top_k: int, rank: int) -> nn.Module | None:
    """The package's ``MixLoraSparseMoe`` with ``reference``'s router and expert weights (None if not installed)."""
    try:
        import mixlora
        from mixlora.lora_linear import LoraLinear
        from mixlora.model import MixLoraSparseMoe
    except ImportError:
        return None
    config = mixlora.MixLoraConfig.from_config(
        dict(
            bias="none",
            peft_type="MIXLORA",
            task_type="CAUSAL_LM",
            base_model_name_or_path="bench",
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=PACKAGE_DROPOUT,
            target_modules=list(PROJECTIONS),
            routing_strategy="mixlora",
            num_experts=reference.moe_gate["default"].num_experts,
            top_k=top_k,
            act_fn="silu",
        )
    )
    config.dtype_ = torch.float32
    config.model_type_ = "llama"
    base = reference.base_layer
    moe = MixLoraSparseMoe(base, config)
    router = nn.Parameter(reference.moe_gate["default"].weight.detach().clone())
    moe.gate_ = router
    experts = nn.ModuleDict()
    for name in PROJECTIONS:
        lora_a = getattr(reference, f"lora_A_{name}")["default"].detach()
        lora_b = getattr(reference, f"lora_B_{name}")["default"].detach()
        for expert in range(config.num_experts_):
            linear = LoraLinear(getattr(base, name), config, (lora_a[expert].clone(), lora_b[expert].clone()))
            linear.eval()  # the package asserts dropout > 0; eval makes it a no-op like the other contenders
            moe.experts_[f"experts.{expert}.{name}"] = linear
            experts[f"{name}_{expert}"] = linear
    return _PackageLayer(moe, router, experts)


def _max_error(variants: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Largest output difference of each MixLoRA variant to the naive path (all compute the same function)."""
    with torch.no_grad():
        expected = variants["moe_zoo_naive"](x)
        return {
            name: (module(x) - expected).abs().max().item()
            for name, module in variants.items()
            if name not in ("lora_floor", "moe_zoo_naive")
        }


def run(tokens: int, hidden: int, intermediate: int, experts: int, top_k: int, rank: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden)
    fused = _moe_zoo(hidden, intermediate, experts, top_k, rank, "fused")
    naive = _moe_zoo(hidden, intermediate, experts, top_k, rank, "naive")
    naive.load_state_dict(fused.state_dict())
    variants: dict[str, nn.Module] = {
        "lora_floor": _lora_floor(hidden, intermediate, rank),
        "moe_zoo_fused": fused.train(),
        "moe_zoo_naive": naive.train(),
    }
    skipped = {}
    package = _mixlora_package(fused, top_k, rank)
    if package is None:
        skipped["mixlora_package"] = "the mixlora package is not installed"
    else:
        variants["mixlora_package"] = package
    errors = _max_error(variants, x)
    results = interleaved_medians(variants, x, repeats)
    floor = results["lora_floor"]
    for name, timing in results.items():
        for key in ("forward_ms", "forward_backward_ms"):
            timing[key.replace("_ms", "_vs_lora_floor")] = round(timing[key] / floor[key], 3)
        if name in errors:
            timing["max_abs_error_vs_naive"] = errors[name]
    ratios = {}
    if package is not None:
        for key in ("forward_ms", "forward_backward_ms"):
            ratios[key.replace("_ms", "_package_over_fused")] = round(
                results["mixlora_package"][key] / results["moe_zoo_fused"][key], 3
            )
    return {
        "benchmark": "mixlora_ffn",
        "shape": dict(tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k, rank=rank),
        "repeats": repeats,
        "dropout": f"none (the package's LoraLinear needs lora_dropout > 0: built with {PACKAGE_DROPOUT}, eval mode)",
        "fused_cpu_pass": {"mode": lora_pairs_kernel.compile_mode(), "built": lora_pairs_kernel.available()},
        **environment(),
        "results": results,
        "fused_speedup": ratios,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    add_machine_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the script runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mixlora_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.intermediate, args.experts, args.rank, args.repeats = 64, 16, 24, 4, 4, 1
    report = run_measured(
        args,
        lambda: run(args.tokens, args.hidden, args.intermediate, args.experts, args.top_k, args.rank, args.repeats),
    )
    write_report(args.output, report)
    for name, timing in report["results"].items():
        print(
            f"{name:18s} fwd {timing['forward_ms']:8.2f} ms ({timing['forward_vs_lora_floor']:.2f}x floor)   "
            f"fwd+bwd {timing['forward_backward_ms']:8.2f} ms ({timing['forward_backward_vs_lora_floor']:.2f}x)"
        )
    for key, value in report["fused_speedup"].items():
        print(f"{key}: {value:.2f}x")
    return report


if __name__ == "__main__":
    main()
