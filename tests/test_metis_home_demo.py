"""``moe-zoo metis-home-demo`` end to end with a few steps (the full run's figures are in docs/metis_home.md): SmolLM2
is expanded and trained through the Trainer, the saved model reloads with identical logits and branch decisions, the
routing report covers every task type, and one query per type is answered on the branch the router chose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_zoo.cli import main
from moe_zoo.demos import metis_home as demo_module
from moe_zoo.demos.metis_home import DemoSettings, run_metis_home_demo


@pytest.fixture(scope="module")
def demo(smollm2_dir, tmp_path_factory):
    settings = DemoSettings(
        output_dir=str(tmp_path_factory.mktemp("metis-home-demo") / "out"),
        steps=2,
        batch_size=4,
        max_new_tokens=6,
        require_above_majority=False,
    )
    return settings, run_metis_home_demo(settings)


def test_the_demo_trains_reloads_and_reports_routing_per_task_type(demo):
    settings, result = demo
    results = result.results
    assert results["sft_steps"] == settings.steps and results["router_layer"] == 15  # SmolLM2's 30 layers / 2
    for routing in (results["heldout_routing_at_expansion"], results["heldout_routing"]):
        assert set(routing["by_family"]) == {"gsm8k", "mmlu", "bbh"}
        assert routing["count"] == sum(f["count"] for f in routing["by_family"].values())
    assert results["heldout_routing"]["by_family"]["bbh"]["labelled_branch"] == ["non_thinking"]
    logged = results["log_history"]
    assert logged and {"router_loss", "lm_loss", "router_accuracy"} <= set(logged[-1])
    written = json.loads((Path(settings.output_dir) / "demo_results.json").read_text())
    assert written["heldout_routing"] == results["heldout_routing"]


def test_one_query_per_task_type_is_answered_on_the_routed_branch(demo):
    _, result = demo
    assert [a["family"] for a in result.answers] == ["gsm8k", "mmlu", "bbh"]
    for answer in result.answers:
        assert answer["branch"] in ("thinking", "non_thinking")
        assert (answer["branch"] == "thinking") == (answer["thinking_probability"] > 0.5)
        assert isinstance(answer["answer"], str)


def test_the_cli_passes_its_options_to_the_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo_module, "run_metis_home_demo", lambda settings: seen.setdefault("settings", settings))
    assert main(["metis-home-demo", "--steps", "3", "--router-layer", "4", "--router-learning-rate", "0.5"]) == 0
    settings = seen["settings"]
    assert (settings.steps, settings.router_layer, settings.router_learning_rate) == (3, 4, 0.5)
    assert settings.require_above_majority  # the full demo checks that the router beats the majority baseline
