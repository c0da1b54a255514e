"""The benchmark scripts run and write the JSON they promise (tiny sizes; timings are not asserted)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_moe_block  # noqa: E402


def test_moe_block_benchmark_writes_json(tmp_path):
    output = tmp_path / "out.json"
    bench_moe_block.main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    implementations = ("eager", "grouped_mm", "moe_zoo")
    expected = {"dense_floor", "moe_zoo_block[batched_mm]"}
    expected |= {f"transformers_qwen3_moe[{name}]" for name in implementations}
    expected |= {f"moe_zoo_block[{name}]" for name in implementations} | {"moe_zoo_block[moe_zoo, MOE_ZOO_MKL=always]"}
    assert set(report["results"]) == expected
    floor = report["results"]["dense_floor"]
    assert floor["forward_vs_dense_floor"] == 1.0 and floor["saved_for_backward_vs_dense_floor"] == 1.0
    for name, timing in report["results"].items():
        assert timing["forward_backward_ms"] > 0 and timing["saved_for_backward_mib"] > 0, name
        assert set(timing["page_faults"]) == {"forward_ms", "forward_backward_ms"}, name
        assert all(isinstance(n, int) and n >= 0 for n in timing["page_faults"].values()), name
        if name != "dense_floor":  # every MoE variant computes the same function as transformers' eager block
            assert timing["max_abs_error_vs_transformers_eager"] <= 1e-5, name


def test_gpu_block_benchmark_runs_on_cpu_and_refuses_a_missing_gpu(tmp_path, capsys):
    """The GPU benchmark's code path at tiny sizes on CPU (the figures it is for need a GPU: see its docstring)."""
    import bench_gpu_block

    output = tmp_path / "gpu.json"
    report = bench_gpu_block.main(["--device", "cpu", "--quick", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    ours, torch_path = "transformers_qwen3_moe[moe_zoo]", "transformers_qwen3_moe[moe_zoo, MOE_ZOO_TRITON=0]"
    assert set(report["results"]) == {
        "dense_floor",
        "transformers_qwen3_moe[eager]",
        "transformers_qwen3_moe[grouped_mm]",
        ours,
        torch_path,
    }
    for name, timing in report["results"].items():
        for key in ("forward_backward_vs_dense_floor", "forward_backward_speedup_over_grouped_mm"):
            assert math.isfinite(timing[key]) and timing[key] > 0, (name, key)
        if name != "dense_floor":
            assert timing["max_abs_error_vs_transformers_eager"] <= 1e-5, name
    assert report["results"]["transformers_qwen3_moe[grouped_mm]"]["forward_speedup_over_grouped_mm"] == 1.0
    assert {"1", "4"} <= set(report["decode"]) and report["decode"]["bandwidth_gb_per_s"] > 0
    assert report["decode"]["4"][ours]["vs_floor"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_gpu_block.main(["--quick"])
        assert "no CUDA device" in capsys.readouterr().err


def test_mixlora_benchmark_quick_mode_writes_json(tmp_path):
    import bench_mixlora

    output = tmp_path / "mixlora.json"
    bench_mixlora.main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["benchmark"] == "mixlora_ffn"
    assert set(report["shape"]) == {"tokens", "hidden", "intermediate", "experts", "top_k", "rank"}
    contenders = {"lora_floor", "moe_zoo_fused", "moe_zoo_naive", "mixlora_package"}
    assert set(report["results"]) | set(report["skipped"]) == contenders
    for name, timing in report["results"].items():
        for key in ("forward_ms", "forward_backward_ms", "forward_vs_lora_floor", "forward_backward_vs_lora_floor"):
            assert math.isfinite(timing[key]) and timing[key] > 0, (name, key)
        if name != "lora_floor" and name != "moe_zoo_naive":
            assert timing["max_abs_error_vs_naive"] <= 1e-5, name
    assert report["results"]["lora_floor"]["forward_vs_lora_floor"] == 1.0
    if "mixlora_package" in report["results"]:
        assert set(report["fused_speedup"]) == {
            "forward_package_over_fused",
            "forward_backward_package_over_fused",
        }


def test_the_suite_runs_every_part_and_summarises_the_targets(tmp_path):
    import run_suite

    result = run_suite.main(["--quick", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "suite_cpu.json").read_text()) == result
    for name in ("moe_block", "decode", "mixlora", "training_step", "metis_home"):
        part = json.loads((tmp_path / f"suite_{name}.json").read_text())
        assert part["allocator"] == result["allocator"] == "default", name  # every part records its own
    summary = result["summary"]
    for key, value in summary.items():
        values = value.values() if isinstance(value, dict) else [value]
        assert all(math.isfinite(v) and v > 0 for v in values), key
    decode = json.loads((tmp_path / "suite_decode.json").read_text())
    assert set(decode["results"]) == {"1", "4"} and decode["bandwidth_gb_per_s"] > 0
    for row in decode["results"].values():
        assert row["bandwidth_floor_ms"] > 0 and row["moe_zoo_block[moe_zoo]"]["forward_ms"] > 0
    step = json.loads((tmp_path / "suite_training_step.json").read_text())["results"]
    dense, moe = step["dense_same_active_parameters"], step["moe_llava[moe_zoo]"]
    assert moe["parameters"] > dense["parameters"], "the MoE holds more parameters than the dense model it matches"
    metis = json.loads((tmp_path / "suite_metis_home.json").read_text())
    assert metis["parameters"]["metis_home"] > metis["parameters"]["dense"]  # one FFN per branch
    assert metis["results"]["dense"]["forward_vs_dense"] == 1.0
    assert len(metis["routed_branches"]) == metis["shape"]["batch"]


def test_literature_options_benchmark_quick_mode_writes_json(tmp_path):
    import bench_literature_options

    output = tmp_path / "literature.json"
    bench_literature_options.main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    results = report["results"]
    assert {"dense", "moe (8 experts, top-2)", "pruned (EASY-EP, 4 of 8)", "bam (2 seeds, shared kv)"} <= set(results)
    assert len(results) == 10
    for name, timing in results.items():
        for key in ("forward_ms", "forward_backward_ms", "forward_vs_moe", "forward_backward_vs_dense"):
            assert math.isfinite(timing[key]) and timing[key] > 0, (name, key)
    assert results["moe (8 experts, top-2)"]["forward_vs_moe"] == 1.0
    # Pruning half the experts stores fewer parameters; the plain MoE stores more than its dense model.
    assert results["pruned (EASY-EP, 4 of 8)"]["parameters"] < results["moe (8 experts, top-2)"]["parameters"]
    assert results["moe (8 experts, top-2)"]["parameters"] > results["dense"]["parameters"]
