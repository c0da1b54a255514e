"""Benchmark what Metis-HOME's branches and query router cost next to the dense model they were expanded from.

The model is a Llama at SmolLM2-135M's width (H=576, I=1536) with fewer layers; Metis-HOME's router reads the middle
layer. Timed round-robin, as medians, for one batch of prompts:

- ``forward``: the dense model; Metis-HOME with a forced branch (all rows on one branch); with mixed branches (each
  row through its own branch's FFN); and routed (the router's partial pass to the middle layer, then the forward);
- ``training step``: forward + backward + AdamW on the dense model vs Metis-HOME with branch labels (half the rows
  on each branch; the router's partial pass and loss included);
- ``generate``: the prefill (``generate`` of one token; for Metis-HOME the route is chosen then, once) and the cost
  of each further cached step, ``(generate(new_tokens) - generate(1)) / (new_tokens - 1)``, dense vs Metis-HOME on one
  forced branch and as routed (the fresh router splits the batch; a split batch reads both branches' FFN weights at
  every step, which decoding, bound by memory traffic, feels).

This machine is noisy: compare the ratios of one run.

    python benchmarks/bench_metis_home.py
    python benchmarks/bench_metis_home.py --quick      # tiny sizes, one repeat: checks that it runs
"""

from __future__ import annotations

import argparse
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


def _models(hidden: int, intermediate: int, layers: int, vocab: int):
    dense = smollm2_width_llama(hidden, intermediate, layers, vocab, tie_word_embeddings=True)
    return dense, moe_zoo.expand_to_metis_home(dense).eval()


def _train_step(model, batch: dict, **options):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model.train()
        model(**batch, **options).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    return step


def _generate(model, batch: dict, new_tokens: int, **options):
    def step() -> None:
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)

    return step


def run(
    hidden: int, intermediate: int, layers: int, vocab: int, batch: int, tokens: int, new_tokens: int, repeats: int
):
    dense, metis = _models(hidden, intermediate, layers, vocab)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    prompts = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids.clone()
    labels[:, : tokens // 2] = -100
    mixed = torch.arange(batch) % 2
    steps = {
        "dense": {
            "forward_ms": forward_step(dense, prompts),
            "train_step_ms": _train_step(dense, {**prompts, "labels": labels}),
            "prefill_ms": _generate(dense, prompts, 1),
            "generate_ms": _generate(dense, prompts, new_tokens),
        },
        "metis_home[forced branch]": {
            "forward_ms": forward_step(metis, prompts, branch="thinking"),
            "prefill_ms": _generate(metis, prompts, 1, branch="thinking"),
            "generate_ms": _generate(metis, prompts, new_tokens, branch="thinking"),
        },
        "metis_home[mixed branches]": {"forward_ms": forward_step(metis, prompts, branch=mixed)},
        "metis_home[routed]": {
            "forward_ms": forward_step(metis, prompts),
            "train_step_ms": _train_step(metis, {**prompts, "labels": labels, "branch_labels": mixed}),
            "prefill_ms": _generate(metis, prompts, 1),
            "generate_ms": _generate(metis, prompts, new_tokens),
        },
    }
    results = interleaved_step_medians(steps, repeats)
    for timing in results.values():
        if "generate_ms" in timing:  # the cost of one cached step, the prompt's (and the route's) taken out
            timing["decode_per_token_ms"] = (timing.pop("generate_ms") - timing["prefill_ms"]) / (new_tokens - 1)
    floor = dict(results["dense"])
    for timing in results.values():
        for key in list(timing):
            timing[key.replace("_ms", "_vs_dense")] = round(timing[key] / floor[key], 3)
    return {
        "benchmark": "metis_home",
        "shape": dict(
            hidden=hidden,
            intermediate=intermediate,
            layers=layers,
            vocab=vocab,
            batch=batch,
            tokens=tokens,
            new_tokens=new_tokens,
            router_layer=metis.config.router_layer_index,
        ),
        "parameters": {
            "dense": sum(p.numel() for p in dense.parameters()),
            "metis_home": sum(p.numel() for p in metis.parameters()),
        },
        "routed_branches": metis.route(**prompts).names,  # a mixed batch reads both branches' FFNs at every step
        "repeats": repeats,
        "dtype": "float32",
        **environment(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    add_machine_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the script runs")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/metis_home_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.batch, args.tokens = 64, 128, 2, 256, 2, 8
        args.new_tokens, args.repeats = 3, 1
    shape = (args.hidden, args.intermediate, args.layers, args.vocab, args.batch, args.tokens, args.new_tokens)
    report = run_measured(args, lambda: run(*shape, args.repeats))
    write_report(args.output, report)
    for name, timing in report["results"].items():
        ratios = "  ".join(
            f"{k.removesuffix('_vs_dense')} {v:.2f}x" for k, v in timing.items() if k.endswith("_vs_dense")
        )
        print(f"{name:28s} {ratios}")
    return report


if __name__ == "__main__":
    main()
