"""``moe-zoo uni-moe-demo`` end to end with one step per run (the full run's figures are in docs/uni_moe.md): the
five runs train through the Trainer and save, the stage-3 checkpoint is an MoE of base, image and speech experts
that reloads with identical logits, both modalities are graded, and the routing plot and results.json are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMultimodalLM

from moe_zoo.cli import main
from moe_zoo.demos.uni_moe import DemoSettings, RunSettings, heldout_set, image_examples, run_uni_moe_demo
from moe_zoo.modeling.uni_moe import UniMoeForConditionalGeneration
from moe_zoo.training.image_qa import QUESTION_KINDS

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")

RUNS = ("stage1/image", "stage1/speech", "stage2/image", "stage2/speech", "stage3")


@pytest.fixture(scope="module")
def demo(smollm2_dir, digits_vision_tower_dir, tmp_path_factory):
    one_step = RunSettings(steps=1, batch_size=2, learning_rate=1e-4)
    settings = DemoSettings(
        output_dir=str(tmp_path_factory.mktemp("uni-moe-demo") / "out"),
        stage1=one_step,
        stage2=one_step,
        stage3=one_step,
        eval_examples=3,
        require_above_chance=False,
    )
    return settings, run_uni_moe_demo(settings)


def test_every_run_trains_and_saves(demo):
    settings, result = demo
    assert set(result.run_seconds) == set(RUNS)
    for run in RUNS:
        assert (Path(settings.output_dir) / run / "config.json").is_file(), run
    assert set(result.accuracy) == {"image", "speech"}
    assert all(0.0 <= value <= 1.0 for value in result.accuracy.values())
    assert all(set(kinds) == set(QUESTION_KINDS) for kinds in result.accuracy_by_kind.values())


@torch.no_grad()
def test_stage3_is_an_moe_of_the_base_image_and_speech_experts_and_reloads_exactly(demo):
    settings, result = demo
    assert result.reload_max_logit_difference == 0.0
    model = AutoModelForMultimodalLM.from_pretrained(Path(settings.output_dir) / "stage3")
    assert isinstance(model, UniMoeForConditionalGeneration)
    assert model.config.num_experts == 3 and len(model.moe_blocks()) == model.config.text_config.num_hidden_layers
    stage3 = json.loads((Path(settings.output_dir) / "stage3" / "uni_moe_stage.json").read_text())
    base, image, speech = stage3["experts"]
    assert base is None  # expert 0: stage 1's own FFN
    assert Path(image) == Path(settings.output_dir) / "stage2/image"
    assert Path(speech) == Path(settings.output_dir) / "stage2/speech"
    assert not AutoModelForMultimodalLM.from_pretrained(image).moe_blocks()  # the sources are dense


def test_routing_plot_and_results_are_written(demo):
    settings, result = demo
    assert open(result.plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for shares in result.expert_share.values():
        assert sum(shares) == pytest.approx(1.0) and len(shares) == 3
    saved = json.loads((Path(result.output_dir) / "results.json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["settings"]["stage3"]["steps"] == 1


def test_heldout_sets_mix_the_kinds_in_equal_shares():
    chosen = heldout_set(image_examples("heldout", seed=0), 9)
    assert [e["kind"] for e in chosen] == [k for k in QUESTION_KINDS for _ in range(3)]
    assert chosen[0]["messages"][0]["role"] == "system"


def test_cli_passes_its_options_and_reports_a_failed_check(monkeypatch, capsys):
    seen = {}

    def fake_demo(settings):
        seen["settings"] = settings
        from moe_zoo.demos import DemoCheckError

        raise DemoCheckError("Stage 3's held-out image accuracy 10.0% is not above chance 36.7%.")

    monkeypatch.setattr("moe_zoo.demos.uni_moe.run_uni_moe_demo", fake_demo)
    assert main(["uni-moe-demo", "--stage3-steps", "5", "--output-dir", "y", "--top-k", "1"]) == 1
    assert seen["settings"].stage3.steps == 5 and seen["settings"].output_dir == "y" and seen["settings"].top_k == 1
    assert "not above chance" in capsys.readouterr().err
