"""DeepSpeed ZeRO-2 / ZeRO-3 through the Trainer's ``deepspeed`` argument, with the configs shipped in
``training_scripts/configs/``: they pass DeepSpeed's own config schema, and a 2-process CPU run of the fine-tuning
recipe (``training_scripts/finetune_upcycled.py``'s steps, ``tests/deepspeed_worker.py``) logs the same losses as one
process, partitions the experts and routers, and saves a checkpoint that ``from_pretrained`` loads with the trained
model's logits. The GPU variant is ``tests/gpu/test_deepspeed_gpu.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

import moe_zoo
from tests.deepspeed_worker import PROBE_IDS, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"zero2": ROOT / "training_scripts/configs/zero2.json", "zero3": ROOT / "training_scripts/configs/zero3.json"}
WORKER = Path(__file__).with_name("deepspeed_worker.py")
NEEDS_DEEPSPEED = "needs the `deepspeed` package (`pip install deepspeed`, part of the dev extra)"
# One process with 2 accumulated micro-batches of 2 and two processes with one micro-batch of 2 each see the same
# micro-batches and the same token count, so the losses agree up to the order of a few sums.
LOSS_TOLERANCE = 1e-5
# The trained weights differ by a few 1e-6 (Adam divides small gradient differences by small second moments).
TRAINED_LOGITS_TOLERANCE = dict(atol=1e-4, rtol=1e-4)
SAME_RUN_TOLERANCE = dict(atol=1e-6, rtol=1e-6)  # the saved weights are the engine's fp32 weights
TEXTS = [
    "the router sends each token to two experts",
    "experts are copies of the dense feed-forward block",
    "upcycling keeps the function of the dense model",
    "a short line",
    "zero redundancy shards optimizer states, gradients and weights across processes",
    "every process holds a part",
    "the auxiliary loss balances the load of the experts",
    "tokens",
    "deepspeed gathers the full weights for each forward",
    "and partitions them again afterwards",
    "the checkpoint loads with from_pretrained",
    "twelve examples make three steps of four",
]


def _auto_free(node: Any) -> bool:
    if isinstance(node, dict):
        return all(_auto_free(value) for value in node.values())
    return node != "auto"


# --- the configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs_leave_the_training_settings_to_the_trainer(name):
    config = json.loads(CONFIGS[name].read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[-1])
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto"  # the Trainer fills them from its arguments and the world size
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"  # --bf16 / --fp16 decide
    # No optimizer or scheduler section: the Trainer's own (--optim, --lr_scheduler_type) are used, so the same file
    # runs on GPUs and CPUs (DeepSpeed's optimizers need their compiled ops).
    assert "optimizer" not in config and "scheduler" not in config
    if name == "zero3":
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # save_model writes a whole checkpoint


@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs_pass_deepspeeds_own_schema(name, tmp_path):
    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    raw = json.loads(CONFIGS[name].read_text())
    known = {value for key, value in vars(constants).items() if key.isupper() and isinstance(value, str)}
    assert set(raw) - {"zero_optimization"} <= known, "a top-level key DeepSpeed does not know (it would ignore it)"
    # DeepSpeed's pydantic ZeRO model forbids unknown keys and checks types ("auto" values are left for the Trainer).
    zero = DeepSpeedZeroConfig(**raw["zero_optimization"])
    assert zero.stage == int(name[-1])
    # Filled as the Trainer fills it (TrainingArguments, then the model's hidden size), nothing "auto" is left and
    # DeepSpeed's full config (batch-size arithmetic, fp16 / bf16 / ZeRO models, strict) accepts it.
    args = TrainingArguments(str(tmp_path), use_cpu=True, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    moe = moe_zoo.upcycle(dense, num_experts=4)
    filled = HfTrainerDeepSpeedConfig(str(CONFIGS[name]))
    try:
        filled.trainer_config_process(args)
        filled.trainer_config_finalize(args, moe, num_training_steps=10)
        resolved = filled.config
    finally:
        unset_hf_deepspeed_config()  # the config registers itself globally (ZeRO-3 would reach every from_pretrained)
    assert _auto_free(resolved), resolved
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    DeepSpeedZeroConfig(strict=True, **resolved["zero_optimization"])
    checked = DeepSpeedConfig(resolved)
    assert checked.zero_optimization_stage == int(name[-1])
    assert (checked.train_batch_size, checked.train_micro_batch_size_per_gpu) == (4, 2)
    assert not checked.bfloat16_config.enabled and not checked.float16_config.enabled
    if name == "zero3":
        assert checked.zero_config.gather_16bit_weights_on_model_save


def test_deepspeeds_schema_refuses_a_misspelt_key():
    """The check above has teeth: a misspelt ZeRO key (which plain DeepSpeed would raise on) fails it."""
    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stage3_gather_16bit_weights_on_modle_save"):
        DeepSpeedZeroConfig(stage=3, stage3_gather_16bit_weights_on_modle_save=True)


# --- training: two processes against one ---------------------------------------------------------------------------


def make_spec(
    folder: Path, model_path: Path, deepspeed: str | None, per_device: int, accumulation: int, cpu: bool = True
) -> dict:
    """A worker spec: 3 optimizer steps over the 12 ``TEXTS`` (4 per step) from the tiny dense model at
    ``model_path``, on CPU processes unless ``cpu=False``."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "data.jsonl"
    data_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    return {
        "output_dir": str(folder),
        "model_path": str(model_path),
        "data_file": str(data_file),
        "deepspeed": deepspeed,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "max_steps": 3,
        "learning_rate": 5e-3,
        "cpu": cpu,
    }


def run_workers(spec: dict, processes: int, timeout: int = 300) -> dict:
    """``torchrun --nproc_per_node processes tests/deepspeed_worker.py`` on ``spec``; returns rank 0's result."""
    path = Path(spec["output_dir"]) / "spec.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if spec["cpu"]:  # CPU processes even where a GPU is visible (two ranks cannot share one GPU under NCCL)
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [*command, str(WORKER), str(path)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    return json.loads((Path(spec["output_dir"]) / "result.json").read_text())


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, save_tiny_llm) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("dense"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dense) -> dict:
    """The reference: one process, no DeepSpeed, 2 micro-batches of 2 accumulated per step."""
    spec = make_spec(tmp_path_factory.mktemp("one_process"), tiny_dense, None, per_device=2, accumulation=2)
    result = train(spec)
    result["folder"] = Path(spec["output_dir"])
    return result


def check_checkpoint(
    folder: Path, reference_folder: Path, same_run: dict | None = None, across_runs: dict | None = None
) -> None:
    """The saved model loads with ``from_pretrained`` (nothing missing), has the trained engine's logits (within
    ``same_run``), and those of the one-process run (within ``across_runs``)."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    probe = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        logits = model.eval()(probe).logits
        reference = AutoModelForCausalLM.from_pretrained(reference_folder).eval()(probe).logits
    torch.testing.assert_close(logits, torch.load(folder / "trained_logits.pt"), **(same_run or SAME_RUN_TOLERANCE))
    torch.testing.assert_close(logits, reference, **(across_runs or TRAINED_LOGITS_TOLERANCE))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_match_one_and_save_a_loadable_checkpoint(name, tmp_path, tiny_dense, one_process):
    pytest.importorskip("deepspeed", reason=NEEDS_DEEPSPEED)
    spec = make_spec(tmp_path / name, tiny_dense, str(CONFIGS[name]), per_device=2, accumulation=1)
    result = run_workers(spec, processes=2)
    assert result["world_size"] == 2
    assert len(result["losses"]) == 3
    assert result["losses"] == pytest.approx(one_process["losses"], rel=LOSS_TOLERANCE)
    # The logged router statistics are the global batch's, not rank 0's half: the aux loss is the mean over the
    # same micro-batches, and each router's assignment count totals the single process's.
    assert len(result["aux_losses"]) == 3
    assert result["aux_losses"] == pytest.approx(one_process["aux_losses"], rel=LOSS_TOLERANCE)
    assert result["expert_counts"].keys() == one_process["expert_counts"].keys()
    for router, counts in result["expert_counts"].items():
        assert sum(counts) == sum(one_process["expert_counts"][router]), router
    ranks = result["ranks"]
    assert [r["stage"] for r in ranks] == [int(name[-1])] * 2
    experts = [n for n in ranks[0]["params"] if ".mlp.experts." in n]
    routers = [n for n in ranks[0]["params"] if n.endswith("mlp.gate.weight")]
    assert experts and routers
    for rank in ranks:
        # Each process keeps about half of the fp32 master weights and their Adam states (ZeRO-1/2/3 alike)...
        assert rank["fp32_partition_numel"] <= math.ceil(rank["total_numel"] / 2) + 64
        if name == "zero3":
            # ...and under ZeRO-3 its half of every expert bank and router (`ds_tensor`). Outside a forward an expert
            # bank is not materialised at all; a router, like any tensor under `stage3_param_persistence_threshold`
            # (the config's "auto": 10 x hidden size elements), is kept whole on every rank as well, by DeepSpeed's
            # design (gathering it each forward would cost more than it saves).
            for param_name in experts + routers:
                param = rank["params"][param_name]
                assert param["local_numel"] == math.ceil(param["full_numel"] / 2), param_name
                persistent = param["full_numel"] < rank["persistence_threshold"]
                assert param["persistent"] == persistent, param_name
                assert param["materialised_numel"] == (param["full_numel"] if persistent else 0), param_name
            assert not any(rank["params"][n]["persistent"] for n in experts)
    check_checkpoint(Path(spec["output_dir"]), one_process["folder"])
