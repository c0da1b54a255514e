"""Saving never loses anything: per-file atomic save_pretrained, and the `moe-zoo upcycle` command."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

import moe_zoo
from moe_zoo.cli import main


def _moe():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    return moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4)


def test_interrupted_save_leaves_the_previous_save_intact(tmp_path, monkeypatch):
    model = _moe()
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash_half_way(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_half_way)
    with torch.no_grad():
        model.moe_blocks()[0].gate.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))  # no temporary folder left behind


def test_save_keeps_other_files_and_removes_stale_shards(tmp_path):
    model = _moe()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "checkpoint-10").is_dir()
    assert (
        not list(tmp_path.glob("model-*-of-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 8))
    assert moe_zoo.max_logit_difference(model, reloaded, ids) == 0.0


def test_cli_upcycle_command(tmp_path, capsys):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4
    )
    dense = AutoModelForCausalLM.from_config(config)
    dense.save_pretrained(tmp_path / "dense")
    code = main(
        ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "3", "--moe-layers", "1,3"]
    )
    assert code == 0 and "2 MoE layers" in capsys.readouterr().out
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.config.moe_layer_indices == [1, 3] and moe.config.num_experts == 3
    ids = torch.randint(0, 64, (2, 9))
    assert moe_zoo.max_logit_difference(dense, moe, ids) <= 1e-5
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "bad"), "--top-k", "9"]) == 1
    assert "num_experts_per_tok" in capsys.readouterr().err
