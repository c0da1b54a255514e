"""The ``moe-zoo`` command line: parsing only (the demo itself runs end to end in CI via ``moe-zoo demo``)."""

import pytest

from moe_zoo.cli import build_parser
from moe_zoo.core.options import parse_moe_layers


def test_demo_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.num_experts, args.top_k, args.moe_layers) == (4, 2, "sparse")
    assert args.output_dir == "outputs/smollm2-moe"


@pytest.mark.parametrize(
    ("text", "expected"), [("sparse", "sparse"), ("all", "all"), ("0,2,4", [0, 2, 4]), ("3", [3]), (" 1, 5 ", [1, 5])]
)
def test_moe_layers_accepts_modes_and_indices(text, expected):
    assert parse_moe_layers(text) == expected


def test_demo_options_are_parsed():
    args = build_parser().parse_args(["demo", "--num-experts", "8", "--top-k", "1", "--moe-layers", "0,1"])
    assert (args.num_experts, args.top_k, args.moe_layers) == (8, 1, [0, 1])


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2
