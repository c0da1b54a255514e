"""The benchmark suite in one run: the MoE block, decoding, the MixLoRA layer, a MoE-LLaVA training step and
Metis-HOME next to its dense model.

Runs each benchmark script's ``main`` with its defaults (the shapes of issue 5; see each script), writes their JSON
next to one summary, ``benchmarks/results/suite_cpu.json``, and prints the ratios the targets are stated in. About
5 minutes on a 2-core CPU; ``--quick`` runs every part at tiny sizes (the tests do this).

    python benchmarks/run_suite.py
    python benchmarks/run_suite.py --keep-freed-memory    # glibc keeps freed pages (see timing.keep_freed_memory);
                                                          # --keep-freed-memory and --threads reach every part
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bench_decode
import bench_metis_home
import bench_mixlora
import bench_moe_block
import bench_training_step
from timing import add_machine_options, write_report

PARTS = {
    "moe_block": bench_moe_block,
    "decode": bench_decode,
    "mixlora": bench_mixlora,
    "training_step": bench_training_step,
    "metis_home": bench_metis_home,
}


def summary(reports: dict) -> dict:
    """The figures the targets are stated in, from the parts' reports."""
    block = reports["moe_block"]["results"]
    ours = block["moe_zoo_block[moe_zoo]"]
    decode = reports["decode"]["results"]
    mixlora = reports["mixlora"]["results"]["moe_zoo_fused"]
    step = reports["training_step"]["results"]
    metis = reports["metis_home"]["results"]
    return {
        "block_forward_vs_dense_floor": ours["forward_vs_dense_floor"],
        "block_forward_backward_vs_dense_floor": ours["forward_backward_vs_dense_floor"],
        "block_grouped_mm_forward_backward_vs_dense_floor": block["moe_zoo_block[grouped_mm]"][
            "forward_backward_vs_dense_floor"
        ],
        "block_saved_for_backward_vs_dense_floor": ours["saved_for_backward_vs_dense_floor"],
        "decode_vs_bandwidth_floor": {t: row["moe_zoo_block[moe_zoo]"]["vs_floor"] for t, row in decode.items()},
        "mixlora_forward_backward_vs_lora_floor": mixlora["forward_backward_vs_lora_floor"],
        "mixlora_package_over_fused": reports["mixlora"]["fused_speedup"].get("forward_backward_package_over_fused"),
        "training_step_vs_dense": step["moe_llava[moe_zoo]"]["vs_dense"],
        "training_step_grouped_mm_vs_dense": step["moe_llava[grouped_mm]"]["vs_dense"],
        "metis_home_forward_forced_branch_vs_dense": metis["metis_home[forced branch]"]["forward_vs_dense"],
        "metis_home_decode_forced_branch_vs_dense": metis["metis_home[forced branch]"]["decode_per_token_vs_dense"],
        "metis_home_forward_routed_vs_dense": metis["metis_home[routed]"]["forward_vs_dense"],
        "metis_home_training_step_vs_dense": metis["metis_home[routed]"]["train_step_vs_dense"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every part at tiny sizes, one repeat")
    add_machine_options(parser)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    shared = ["--quick"] * args.quick + ["--keep-freed-memory"] * args.keep_freed_memory
    shared += ["--threads", str(args.threads)] if args.threads else []
    reports = {}
    for name, module in PARTS.items():
        print(f"== {name}")
        reports[name] = module.main(["--output", str(args.output_dir / f"suite_{name}.json"), *shared])
    result = {
        "allocator": reports["moe_block"]["allocator"],
        "summary": summary(reports),
        "parts": {name: str(args.output_dir / f"suite_{name}.json") for name in PARTS},
    }
    write_report(args.output_dir / "suite_cpu.json", result)
    print("== summary")
    for key, value in result["summary"].items():
        print(f"{key:52s} {value}")
    return result


if __name__ == "__main__":
    main()
