"""What the literature options of ``docs/literature_options.md`` cost, next to a plain top-2 MoE and its dense model.

A Llama at SmolLM2-135M's width (H=576, I=1536) with fewer layers is upcycled into an 8-expert top-2 MoE (every
layer), and into the same MoE with one option changed. Timed round-robin, as medians, on one batch: the forward
(no grad) and a training step's forward + backward of the LM loss (router loss included where the option has one).
Reported next to each: the stored parameters (buffers included: RMoE's frozen core is one), and the ratios to the
plain MoE and to the dense model.

- ``pruned (EASY-EP, 4 of 8)``: same compute per token, half the expert parameters;
- ``rmoe (low-rank 16)`` / ``rmoe (full)``: experts read as ``core + residual`` (the parametrisation recomputes
  the expert tensors every forward);
- ``gating residual (MoE++)``, ``shared experts in the softmax (UniMoE-Audio)``, ``top-p + null expert``,
  ``dense-to-sparse (EvoMoE, start)``: routing variants (dense-to-sparse starts with every expert active);
- ``bam (2 seeds, shared kv)``: soft Mixture-of-Attention doubles the attention's query side.

This machine is noisy: compare the ratios of one run.

    python benchmarks/bench_literature_options.py
    python benchmarks/bench_literature_options.py --quick      # tiny sizes, one repeat: checks that it runs
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from timing import (
    add_machine_options,
    environment,
    forward_step,
    interleaved_step_medians,
    run_measured,
    smollm2_width_llama,
    write_report,
)

import moe_zoo
from moe_zoo.analysis import easy_ep_prune
from moe_zoo.core.residual_experts import add_residual_experts, freeze_all_but_residuals

BASE = dict(num_experts=8, num_experts_per_tok=2, moe_layers="all")


def _moe(dense, **options):
    torch.manual_seed(1)
    return moe_zoo.upcycle(dense, **{**BASE, **options}, router_init_std=0.1).eval()


def variants(dense, batch: dict) -> dict[str, torch.nn.Module]:
    """The models to time, by name (``dense`` and the plain ``moe`` first)."""
    models = {"dense": dense, "moe (8 experts, top-2)": _moe(dense)}
    pruned, _, _ = easy_ep_prune(_moe(dense), [batch], num_keep=4, progress=False)
    models["pruned (EASY-EP, 4 of 8)"] = pruned
    for name, rank in (("rmoe (low-rank 16)", 16), ("rmoe (full)", None)):
        model = add_residual_experts(_moe(dense), rank=rank)
        freeze_all_but_residuals(model, train_routers=True)
        models[name] = model
    models["gating residual (MoE++)"] = _moe(dense, gating_residual=True)
    models["shared experts in the softmax (UniMoE-Audio)"] = _moe(
        dense, router_type="top_p", num_null_experts=1, num_shared_experts=1, shared_expert_routing=True
    )
    models["top-p + null expert"] = _moe(dense, router_type="top_p", top_p_threshold=0.7, num_null_experts=1)
    models["dense-to-sparse (EvoMoE, start)"] = _moe(dense, router_type="dense_to_sparse")
    seeds = [dense, copy.deepcopy(dense)]
    torch.manual_seed(1)
    models["bam (2 seeds, shared kv)"] = moe_zoo.bam_upcycle(seeds, share_kv=True, moe_layers="all").eval()
    return models


def _forward_backward(model, batch: dict):
    def step() -> None:
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    return step


def run(hidden: int, intermediate: int, layers: int, vocab: int, batch: int, tokens: int, repeats: int) -> dict:
    dense = smollm2_width_llama(hidden, intermediate, layers, vocab)
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models = variants(dense, inputs)
    steps = {
        name: {"forward_ms": forward_step(model, inputs), "forward_backward_ms": _forward_backward(model, inputs)}
        for name, model in models.items()
    }
    results = interleaved_step_medians(steps, repeats)
    moe, floor = results["moe (8 experts, top-2)"], results["dense"]
    for name, timing in results.items():
        model = models[name]
        # Stored elements: parameters and buffers (RMoE's frozen core is a buffer), tied tensors counted once.
        stored = {t.data_ptr(): t.numel() for t in [*model.parameters(), *model.buffers()] if t.numel()}
        timing["parameters"] = sum(stored.values())
        for key in ("forward_ms", "forward_backward_ms"):
            timing[key.replace("_ms", "_vs_moe")] = round(timing[key] / moe[key], 3)
            timing[key.replace("_ms", "_vs_dense")] = round(timing[key] / floor[key], 3)
    return {
        "benchmark": "literature_options",
        "shape": dict(hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab, batch=batch, tokens=tokens),
        "repeats": repeats,
        "dtype": "float32",
        **environment(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the script runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/literature_options_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.batch, args.tokens = 64, 128, 2, 256, 2, 8
        args.repeats = 1
    shape = (args.hidden, args.intermediate, args.layers, args.vocab, args.batch, args.tokens)
    report = run_measured(args, lambda: run(*shape, args.repeats))
    write_report(args.output, report)
    for name, timing in report["results"].items():
        print(
            f"{name:46s} params {timing['parameters'] / 1e6:6.1f}M  forward {timing['forward_vs_moe']:.2f}x moe "
            f"{timing['forward_vs_dense']:.2f}x dense  fwd+bwd {timing['forward_backward_vs_moe']:.2f}x moe "
            f"{timing['forward_backward_vs_dense']:.2f}x dense"
        )
    return report


if __name__ == "__main__":
    main()
