"""The benchmark scripts run and write the JSON they promise (tiny sizes; timings are not asserted)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_moe_block  # noqa: E402


def test_moe_block_benchmark_writes_json(tmp_path):
    output = tmp_path / "out.json"
    bench_moe_block.main(
        [
            "--tokens",
            "32",
            "--hidden",
            "16",
            "--intermediate",
            "24",
            "--experts",
            "4",
            "--repeats",
            "1",
            "--output",
            str(output),
        ]
    )
    report = json.loads(output.read_text())
    expected = {
        "moe_zoo[eager]",
        "moe_zoo[batched_mm]",
        "moe_zoo[grouped_mm]",
        "transformers_mixtral[eager]",
        "transformers_mixtral[grouped_mm]",
        "dense_floor",
    }
    assert set(report["results"]) == expected
    assert report["results"]["dense_floor"]["forward_vs_dense_floor"] == 1.0
    assert all(r["forward_backward_ms"] > 0 for r in report["results"].values())
