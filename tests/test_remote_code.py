"""Saved moe_zoo models carry their own code: they load with ``trust_remote_code=True`` in a process where moe_zoo
cannot be imported (identical logits), and with moe_zoo imported its installed classes are used instead."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig
from transformers.dynamic_module_utils import get_imports

import moe_zoo
from moe_zoo.publishing.remote_code import ALLOWED_THIRD_PARTY, RemoteCodeExportError, _read_module
from tests import test_metis_home_model as metis_tests
from tests import test_moe_llava_model as moe_llava_tests
from tests import test_uni_moe_model as uni_moe_tests
from tests.remote_loading import load_in_fresh_process, save_reference


def _upcycled():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    moe = moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4).eval()
    return moe, {"input_ids": torch.randint(0, 64, (2, 7))}


def _moe_llava():
    return moe_llava_tests._moe(), moe_llava_tests._inputs()


def _uni_moe():
    torch.manual_seed(0)
    model = uni_moe_tests.UniMoeForConditionalGeneration(uni_moe_tests.tiny_config()).eval()
    return model, {"input_ids": torch.randint(3, 100, (2, 7))}


def _metis_over_moe_llava():
    dense, metis = metis_tests._pair("moe_llava")
    metis_tests._diverge(metis)
    return metis, metis_tests._inputs("moe_llava")


FAMILIES = {
    "upcycled_moe": (_upcycled, "AutoModelForCausalLM"),
    "moe_llava": (_moe_llava, "AutoModelForImageTextToText"),
    "uni_moe": (_uni_moe, "AutoModelForImageTextToText"),
    "metis_home": (_metis_over_moe_llava, "AutoModelForImageTextToText"),
}


def _save_family(name: str, root: Path, generate: bool = False) -> Path:
    build, _ = FAMILIES[name]
    model, inputs = build()
    model.save_pretrained(root / name)
    save_reference(model, inputs, root / f"{name}.pt", generate=generate)
    return root / name


def _items(root: Path, names) -> list[dict]:
    return [{"source": root / name, "auto": FAMILIES[name][1], "reference": root / f"{name}.pt"} for name in names]


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    for name in FAMILIES:
        _save_family(name, root, generate=name == "metis_home")
    return root


def test_saved_models_load_with_trust_remote_code_where_moe_zoo_is_absent(saved_families, tmp_path):
    results = load_in_fresh_process(_items(saved_families, FAMILIES), tmp_path)
    assert results.pop("moe_zoo_imported") is False
    for name in FAMILIES:
        result = results[str(saved_families / name)]
        assert result["module"].startswith("transformers_modules."), result  # the checkpoint's own code ran
        assert result["equal"], f"{name}: logits differ by {result['max_diff']}"
    assert results[str(saved_families / "metis_home")]["generate_equal"]  # routed generation, too


def test_the_saved_folder_has_code_and_an_auto_map(saved_families):
    config = json.loads((saved_families / "moe_llava" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_moe_llava.MoeLlavaConfig",
        "AutoModel": "modeling_moe_llava.MoeLlavaModel",
        "AutoModelForImageTextToText": "modeling_moe_llava.MoeLlavaForConditionalGeneration",
    }
    for name in FAMILIES:
        code = sorted((saved_families / name).glob("*.py"))
        assert code, name
        for path in code:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):  # only single-dot relative imports, and never moe_zoo itself
                    assert node.level <= 1 and not (node.module or "").startswith("moe_zoo"), (path, node.lineno)
            # what transformers' check_imports will require of the downloading environment
            assert set(get_imports(path)) <= ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names), path
    metis_files = {path.name for path in (saved_families / "metis_home").glob("*.py")}
    assert {"modeling_metis_home.py", "modeling_moe_llava.py", "configuration_moe_llava.py"} <= metis_files


@pytest.mark.parametrize("name", ["upcycled_moe", "moe_llava"])
def test_with_moe_zoo_imported_the_installed_classes_are_used(saved_families, name):
    auto = AutoModelForCausalLM if name == "upcycled_moe" else AutoModelForImageTextToText
    model = auto.from_pretrained(saved_families / name, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("moe_zoo.modeling.")
    saved = torch.load(saved_families / f"{name}.pt")
    with torch.no_grad():
        assert torch.equal(model(**saved["inputs"]).logits, saved["logits"])


def test_saving_another_model_into_the_folder_removes_code_it_does_not_use(saved_families, tmp_path):
    folder = tmp_path / "model"
    metis, _ = _metis_over_moe_llava()
    metis.save_pretrained(folder)
    assert (folder / "modeling_moe_llava.py").is_file()
    (folder / "my_script.py").write_text("print('mine')\n")
    moe, _ = _upcycled()
    moe.save_pretrained(folder)
    names = {path.name for path in folder.glob("*.py")}
    assert "modeling_moe_llava.py" not in names and "modeling_metis_home.py" not in names
    assert {"modeling_upcycled_moe.py", "my_script.py"} <= names  # the user's own file is kept


def test_a_module_importing_a_package_outside_plain_transformers_cannot_be_exported():
    with pytest.raises(RemoteCodeExportError, match="peft"):
        _read_module("moe_zoo.peft.mixlora.model")
