"""The main job, ``moe-zoo demo``, end to end with a few steps per stage (the full run's figures are in the
README): every stage trains through the Trainer and saves, upcycling is checked in float64, the stage-III checkpoint
reloads with identical logits, accuracy is graded per question kind, and the expert-load plot and results.json are
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText

import moe_zoo
from moe_zoo.cli import main
from moe_zoo.demos.moe_llava import CHANCE, DemoSettings, StageSettings, heldout_questions, run_moe_llava_demo
from moe_zoo.training.image_qa import QUESTION_KINDS


@pytest.fixture(scope="module")
def demo(smollm2_dir, digits_vision_tower_dir, tmp_path_factory):
    settings = DemoSettings(
        output_dir=str(tmp_path_factory.mktemp("demo") / "out"),
        stage1=StageSettings(steps=2, batch_size=4, learning_rate=1e-3),
        stage2=StageSettings(steps=1, batch_size=2, learning_rate=1e-4),
        stage3=StageSettings(steps=1, batch_size=2, learning_rate=1e-4),
        eval_examples=6,
        load_images=4,
        require_above_chance=False,
    )
    return settings, run_moe_llava_demo(settings)


def test_every_stage_is_saved_and_graded(demo):
    settings, result = demo
    assert [report.stage for report in result.stages] == [1, 2, 3]
    for report in result.stages:
        assert Path(report.output_dir) == Path(settings.output_dir) / f"stage{report.stage}"
        assert report.steps == settings.stage(report.stage).steps
        assert 0.0 <= report.accuracy <= 1.0 and report.final_train_loss > 0
    assert set(result.stages[0].accuracy_by_kind) == {"digit"}  # stage I: captions
    assert set(result.stages[2].accuracy_by_kind) == set(QUESTION_KINDS)
    assert result.chance_accuracy == pytest.approx(sum(CHANCE.values()) / 3)


def test_upcycling_is_checked_in_float64_and_the_checkpoint_reloads_exactly(demo):
    _, result = demo
    assert result.upcycling_float64_max_logit_difference <= 1e-9
    assert result.upcycling_max_logit_difference < 1e-2
    assert result.reload_max_logit_difference == 0.0
    model = AutoModelForImageTextToText.from_pretrained(result.stages[2].output_dir)
    assert isinstance(model, moe_zoo.MoeLlavaForConditionalGeneration) and model.moe_blocks()
    assert not AutoModelForImageTextToText.from_pretrained(result.stages[1].output_dir).moe_blocks()


def test_plot_and_results_are_written(demo):
    settings, result = demo
    assert open(result.plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((Path(result.output_dir) / "results.json").read_text())
    assert saved["settings"]["stage1"]["steps"] == settings.stage1.steps
    assert [s["accuracy"] for s in saved["stages"]] == [r.accuracy for r in result.stages]


def test_heldout_questions_mix_the_kinds_in_equal_shares():
    questions = heldout_questions(9, seed=0)
    assert [q["kind"] for q in questions] == [k for k in QUESTION_KINDS for _ in range(3)]
    assert len(heldout_questions(7, seed=0)) == 7


def test_cli_runs_the_demo_and_reports_a_failed_check(monkeypatch, capsys):
    """``moe-zoo demo`` passes its options on, and a failed check is one error line, not a traceback."""
    seen = {}

    def fake_demo(settings):
        seen["settings"] = settings
        from moe_zoo.demos import DemoCheckError

        raise DemoCheckError("stage III's held-out accuracy 10.0% is not above chance (36.7%).")

    monkeypatch.setattr("moe_zoo.demos.moe_llava.run_moe_llava_demo", fake_demo)
    assert main(["demo", "--stage2-steps", "3", "--output-dir", "x"]) == 1
    assert seen["settings"].stage2.steps == 3 and seen["settings"].output_dir == "x"
    assert "not above chance" in capsys.readouterr().err
