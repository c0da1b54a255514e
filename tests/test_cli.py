"""The ``moe-zoo`` command line: parsing (the demos themselves run in tests/test_moe_llava_demo.py and
tests/test_smollm2_assets.py)."""

import pytest

from moe_zoo.cli import build_parser
from moe_zoo.core.options import parse_moe_layers
from moe_zoo.demos.moe_llava import DemoSettings


def test_demo_defaults_are_the_demo_settings():
    args = build_parser().parse_args(["demo"])
    defaults = DemoSettings()
    assert (args.num_experts, args.top_k, args.moe_layers) == (4, 2, "sparse")
    assert args.output_dir == defaults.output_dir == "outputs/moe-llava-demo"
    for stage in (1, 2, 3):
        own = defaults.stage(stage)
        parsed = [getattr(args, f"stage{stage}_{name}") for name in ("steps", "batch_size", "learning_rate")]
        assert parsed == [own.steps, own.batch_size, own.learning_rate]


def test_upcycle_demo_defaults():
    args = build_parser().parse_args(["upcycle-demo"])
    assert (args.num_experts, args.top_k, args.moe_layers) == (4, 2, "sparse")
    assert args.output_dir == "outputs/smollm2-moe"


@pytest.mark.parametrize(
    ("text", "expected"), [("sparse", "sparse"), ("all", "all"), ("0,2,4", [0, 2, 4]), ("3", [3]), (" 1, 5 ", [1, 5])]
)
def test_moe_layers_accepts_modes_and_indices(text, expected):
    assert parse_moe_layers(text) == expected


@pytest.mark.parametrize("command", ["demo", "upcycle-demo"])
def test_demo_options_are_parsed(command):
    args = build_parser().parse_args([command, "--num-experts", "8", "--top-k", "1", "--moe-layers", "0,1"])
    assert (args.num_experts, args.top_k, args.moe_layers) == (8, 1, [0, 1])


def test_demo_stage_options_are_parsed():
    args = build_parser().parse_args(["demo", "--stage2-steps", "3", "--stage3-learning-rate", "2e-4"])
    assert (args.stage2_steps, args.stage3_learning_rate) == (3, 2e-4)


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2
