"""Multi-process runs (issue 9) of the other training scripts on CPU, against one process with the same global batch,
seed and data (fp32, SGD, dropout off; see ``tests/test_distributed.py`` for MixLoRA and MoE-LLaVA and for why SGD):

- ``training_scripts/finetune_upcycled.py`` (upcycled Llama, 4 experts top-2 on both layers, router loss 0.01):
  ``torchrun`` DDP and FSDP2 (``LlamaDecoderLayer`` auto-wrap) and ``accelerate launch`` DDP and FSDP2, the command
  lines of ``docs/distributed.md``;
- ``training_scripts/train_uni_moe.py --stage 3`` (3 experts top-1 from a saved stage-1 model, LoRA, router loss
  0.01): ``torchrun`` DDP;
- ``training_scripts/train_metis_home.py`` (the demo mix, SFT with the router's cross-entropy): ``torchrun`` DDP;
- ``training_scripts/train_vision_tower.py`` (a plain loop): ``torchrun``, one loadable folder.

Each launched process runs under ``tests/distributed_launch.py``'s recorder, so the tests also check that only the
main process wrote into the output folder: rank 1 wrote nothing there but, at times, the empty ``checkpoint-<step>``
folder every process asks for (its ``rng_state_1.pth`` goes through ``torch.save``'s native writer, which the
recorder does not see).

Tolerances, measured on these runs (3 SGD steps at lr 0.5, per-device batch 2 against 4):

- **Summation order** (all-reduced / reduce-scattered gradients) moves fp32 results by ~1e-7 to 1e-5.
- **The router loss is per process** (as in DeepSpeed-MoE; see ``tests/test_distributed.py``): ``E * sum_e f_e *
  P_e`` on each shard is not its value on their union, so runs with a router loss drift apart by ``coef`` times that
  difference. Logged ``loss`` and ``aux_loss`` agree within ``LOSS_ATOL`` / ``AUX_ATOL`` (1e-4): measured <= 4.8e-6
  and 1e-6 (upcycled; ``aux_loss`` is logged to 6 digits), 1.5e-5 and 1.5e-5 (Uni-MoE).
- Expert counts are summed over processes: each router's total is exactly one process's (rank 0 alone would count
  about half), per expert within ``COUNT_ATOL`` (2) assignments (a near-tie token; measured 0 everywhere).
- The upcycled checkpoints' logits agree within ``LOGIT_ATOL`` (1e-4): measured 8.1e-6 (DDP) and 2.0e-5 (FSDP) on
  logits of magnitude 3.6 (router loss 0.01, top-2 of 4). ``accelerate launch`` and ``torchrun`` are the same
  computation: their checkpoints are bit-identical (DDP with DDP, FSDP with FSDP).
- Uni-MoE's stage 3 (GShard top-1 loss, top-1 of 3 experts, the image projector trained fully at lr 0.5 and
  reached by the router loss's gradient) drifts more: logits within ``UNI_MOE_LOGIT_ATOL`` (5e-3), measured 1.6e-3
  on logits of magnitude 0.56, largest at the image positions; the same runs with ``--router_aux_loss_coef 0`` give
  2.1e-7 (measured once, not part of the test), so all of it is the per-process router loss.
- Metis-HOME's router loss is a cross-entropy over queries, a mean that two equal shards reproduce exactly: logged
  ``lm_loss`` / ``router_loss`` / ``router_accuracy`` are identical to the 4 logged digits, ``loss`` within 9.5e-7,
  and the logits of both branches within ``EXACT_LOGIT_ATOL`` (1e-5; measured 3.6e-7, the router's identical).

When Uni-MoE's LM loss ignored the Trainer's ``num_items_in_batch``, its 2-process runs logged (and trained on) twice
the single-process LM loss; without ``plain_module_class`` the FSDP checkpoints of moe-zoo models lacked the exported
code and the model card. The file takes about 3 minutes on 2 CPU cores (7 launches of 2 processes).
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

import moe_zoo  # noqa: F401  (registers the Auto classes)
from moe_zoo import assets
from moe_zoo.training.uni_moe_data import UniMoeCollator, load_uni_moe_jsonl
from moe_zoo.training.uni_moe_stages import build_dense_uni_moe
from tests import distributed_launch as launch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "training_scripts"
STEPS, GLOBAL_BATCH = 3, 4  # SGD steps; one process's batch (each of 2 processes gets half)
LOSS_ATOL = 1e-4
AUX_ATOL = 1e-4
COUNT_ATOL = 2
LOGIT_ATOL = 1e-4
UNI_MOE_LOGIT_ATOL = 5e-3
EXACT_LOGIT_ATOL = 1e-5
FINETUNE_MODES = ("torchrun-ddp", "torchrun-fsdp", "accelerate-ddp", "accelerate-fsdp")
TEXTS = ["Capital of France? Paris.", "Name a colour of the sky at noon."]


def _run_in_process(script: Path, argv: list[str]) -> None:
    """``python script argv`` in this process (the one-process reference; saves a launcher's start-up)."""
    old_argv = sys.argv
    try:
        sys.argv = [str(script), *argv]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old_argv


def _load(auto_class, folder: Path):
    """``from_pretrained`` of ``folder``, asserting that every weight was found and used."""
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    assert not problems, (folder, problems)
    return model.eval()


def _only_the_main_process_wrote(record: Path, output_dir: Path) -> None:
    """Rank 1 wrote nothing into ``output_dir`` but, maybe, the empty ``checkpoint-<step>`` folder: every process
    runs the Trainer's ``os.makedirs(checkpoint, exist_ok=True)``, and whichever comes first creates it."""
    writes = launch.writes_by_rank(record, output_dir)
    assert writes.keys() == {0, 1}, writes.keys()  # both processes ran under the recorder
    assert writes[0], "the main process wrote nothing?"
    assert all(re.fullmatch(r"(?:[^/]+/)*checkpoint-\d+", path) for path in writes[1]), writes[1]


def _max_difference(logits: dict[str, torch.Tensor], reference: str = "single") -> dict[str, float]:
    return {mode: (value - logits[reference]).abs().max().item() for mode, value in logits.items()}


# --- training_scripts/finetune_upcycled.py --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory, save_tiny_llm) -> dict[str, Path]:
    """Upcycling fine-tuning of a tiny Llama (SmolLM2's tokenizer) on 16 chats, one process with batch 4 and two with
    batch 2 each under every launcher / sharding. Returns each run's ``output_dir``; ``root/record-<mode>`` holds
    what each process wrote."""
    root = tmp_path_factory.mktemp("finetune")
    llm = save_tiny_llm(root / "llm")
    facts = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo")]
    rows = [
        {"messages": [{"role": "user", "content": f"Capital of {c}?"}, {"role": "assistant", "content": city}]}
        for c, city in facts * 4
    ]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    script = SCRIPTS / "finetune_upcycled.py"
    argv = [
        "--data_file", str(root / "chats.jsonl"), "--model_path", str(llm), "--moe_layers", "all",
        "--max_length", "64", "--learning_rate", "0.5",
    ]  # fmt: skip
    runs = {mode: root / mode for mode in ("single", *FINETUNE_MODES)}
    _run_in_process(script, [*argv, *launch.train_options(GLOBAL_BATCH, STEPS), "--output_dir", str(runs["single"])])
    half = [*argv, *launch.train_options(GLOBAL_BATCH // 2, STEPS)]
    fsdp = launch.fsdp_arguments(root, ["LlamaDecoderLayer"])
    for mode in FINETUNE_MODES:
        launcher, sharding = mode.split("-")
        arguments = [*half, "--output_dir", str(runs[mode])]
        record = root / f"record-{mode}"
        if launcher == "torchrun":
            launch.torchrun(script, arguments, root, fsdp if sharding == "fsdp" else (), record=record)
        else:
            launch.accelerate_launch(
                script, arguments, root, launch.ACCELERATE_FSDP if sharding == "fsdp" else launch.ACCELERATE_DDP, record
            )
    return runs


def test_upcycled_finetuning_under_torchrun_and_accelerate_trains_like_one_process(finetune_runs):
    single = finetune_runs["single"]
    single_stats = json.loads((single / "routing_stats.json").read_text())
    assert len(single_stats["expert_counts"]) == 2 and single_stats["global_step"] == STEPS
    for mode in FINETUNE_MODES:
        run = finetune_runs[mode]
        launch.check_launch_kind(run / f"checkpoint-{STEPS}", mode)
        one, many = (launch.logged_steps(folder / f"checkpoint-{STEPS}", STEPS) for folder in (single, run))
        launch.compare_logs(one, many, mode, LOSS_ATOL, AUX_ATOL)
        stats = json.loads((run / "routing_stats.json").read_text())
        assert stats["global_step"] == STEPS, mode
        launch.compare_counts(single_stats["expert_counts"], stats["expert_counts"], mode, COUNT_ATOL)
        _only_the_main_process_wrote(run.parent / f"record-{mode}", run)


def test_upcycled_checkpoints_are_the_single_process_folder_with_its_logits(finetune_runs):
    """Every setup saves the files one process saves (weights, config, tokenizer, exported code, model card), they
    load with no missing or unexpected weights, and give one process's logits."""
    single = finetune_runs["single"]
    names = {path.name for path in single.iterdir() if path.is_file()}
    assert {"model.safetensors", "config.json", "README.md", "modeling_upcycled_moe.py"} <= names
    tokenizer = AutoTokenizer.from_pretrained(single)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    logits = {}
    for mode, folder in finetune_runs.items():
        assert {path.name for path in folder.iterdir() if path.is_file()} == names, mode
        assert json.loads((folder / "config.json").read_text()) == json.loads((single / "config.json").read_text())
        with torch.no_grad():
            logits[mode] = _load(AutoModelForCausalLM, folder)(**batch).logits
    differences = _max_difference(logits)
    assert max(differences.values()) <= LOGIT_ATOL, differences
    assert max(_max_difference(logits, "torchrun-ddp").values()) <= LOGIT_ATOL
    for sharding in ("ddp", "fsdp"):  # the launchers start the same computation
        assert torch.equal(logits[f"torchrun-{sharding}"], logits[f"accelerate-{sharding}"]), sharding


# --- training_scripts/train_uni_moe.py, stage 3 ---------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _chat(question: str, answer: str, image: bool) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _uni_moe_parts(root: Path, llm: Path) -> Path:
    """A dense Uni-MoE from a tiny Llama, CLIP tower and Whisper (8 mel bins, 1-s chunks) saved as stage 1's output,
    and 8 training chats (6 about an image's colour, 2 text-only) in ``root/train.jsonl``."""
    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    CLIPVisionModel(CLIPVisionConfig(**vision, patch_size=8)).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision"
    )
    whisper = WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=50, max_target_positions=8,
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    WhisperModel(whisper).save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=8, chunk_length=1, sampling_rate=16_000).save_pretrained(root / "whisper")
    model, processor = build_dense_uni_moe(
        str(llm), vision_tower=str(root / "vision"), speech_model=str(root / "whisper"), speech_query_tokens=4
    )
    model.save_pretrained(root / "stage1")
    processor.save_pretrained(root / "stage1")
    rows = []
    for i in range(8):
        color = list(COLORS)[i % 2]
        if i % 4 == 3:
            rows.append({"messages": _chat("Say hi.", "hi", image=False)})
            continue
        noise = np.random.default_rng(i).integers(-20, 20, (40, 40, 3))
        Image.fromarray(np.clip(np.array(COLORS[color]) + noise, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append({"messages": _chat("What color is it?", color, image=True), "images": [f"{i}.png"]})
    (root / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root / "stage1"


@pytest.fixture(scope="module")
def uni_moe_runs(tmp_path_factory, save_tiny_llm) -> dict[str, Path]:
    """Uni-MoE stage 3 (3 experts, all from stage 1's FFN, top-1; LoRA without dropout) on the 8 chats, one process
    with batch 4 and DDP with 2 x 2."""
    root = tmp_path_factory.mktemp("uni_moe")
    stage1 = _uni_moe_parts(root, save_tiny_llm(root / "llm"))
    script = SCRIPTS / "train_uni_moe.py"
    argv = [
        "--stage", "3", "--init_model", str(stage1), "--experts", "base,base,base", "--top_k", "1",
        "--lora_dropout", "0", "--max_length", "256", "--data_file", str(root / "train.jsonl"),
        "--learning_rate", "0.5",
    ]  # fmt: skip
    runs = {"single": root / "single", "ddp": root / "ddp"}
    _run_in_process(script, [*argv, *launch.train_options(GLOBAL_BATCH, STEPS), "--output_dir", str(runs["single"])])
    ddp = [*argv, *launch.train_options(GLOBAL_BATCH // 2, STEPS), "--output_dir", str(runs["ddp"])]
    launch.torchrun(script, ddp, root, record=root / "record-ddp")
    return runs


def test_uni_moe_stage3_under_torchrun_trains_like_one_process(uni_moe_runs):
    single, ddp = uni_moe_runs["single"], uni_moe_runs["ddp"]
    launch.check_launch_kind(ddp / f"checkpoint-{STEPS}", "ddp")
    one, many = (launch.logged_steps(folder / f"checkpoint-{STEPS}", STEPS) for folder in (single, ddp))
    launch.compare_logs(one, many, "ddp", LOSS_ATOL, AUX_ATOL)
    markers = [json.loads((folder / "uni_moe_stage.json").read_text()) for folder in (single, ddp)]
    assert [marker["global_step"] for marker in markers] == [STEPS, STEPS]
    assert len(markers[0]["expert_counts"]) == 2  # the routers of both MoE layers
    launch.compare_counts(markers[0]["expert_counts"], markers[1]["expert_counts"], "ddp", COUNT_ATOL)
    _only_the_main_process_wrote(ddp.parent / "record-ddp", ddp)


def test_uni_moe_stage3_checkpoint_loads_and_gives_the_single_process_logits(uni_moe_runs):
    root = uni_moe_runs["single"].parent
    examples = load_uni_moe_jsonl(root / "train.jsonl")[:3]
    logits = {}
    for mode, folder in uni_moe_runs.items():
        model = _load(AutoModelForMultimodalLM, folder)
        assert model.config.num_experts == 3 and len(model.moe_blocks()) == 2
        batch = UniMoeCollator(AutoProcessor.from_pretrained(folder), 256)(examples)
        with torch.no_grad():
            logits[mode] = model(**batch).logits
    assert _max_difference(logits)["ddp"] <= UNI_MOE_LOGIT_ATOL


# --- training_scripts/train_metis_home.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metis_runs(tmp_path_factory, save_tiny_llm) -> dict[str, Path]:
    """Metis-HOME SFT (the demo mix, router on layer 1, router and branches at lr 0.5), one process with batch 4 and
    DDP with 2 x 2."""
    root = tmp_path_factory.mktemp("metis_home")
    llm = save_tiny_llm(root / "llm")
    script = SCRIPTS / "train_metis_home.py"
    argv = [
        "--model_path", str(llm), "--max_length", "256", "--router_layer", "1", "--learning_rate", "0.5",
        "--router_learning_rate", "0.5",
    ]  # fmt: skip
    runs = {"single": root / "single", "ddp": root / "ddp"}
    _run_in_process(script, [*argv, *launch.train_options(GLOBAL_BATCH, STEPS), "--output_dir", str(runs["single"])])
    ddp = [*argv, *launch.train_options(GLOBAL_BATCH // 2, STEPS), "--output_dir", str(runs["ddp"])]
    stdout = launch.torchrun(script, ddp, root, record=root / "record-ddp")
    assert stdout.count("held-out router accuracy") == 1  # the main process alone reports
    return runs


def test_metis_home_under_torchrun_logs_the_global_router_figures(metis_runs):
    """``lm_loss`` (label-token weighted), ``router_loss`` and ``router_accuracy`` (query weighted) are the whole
    batch's, as one process logs them; the held-out routing evaluation of the trained router is the same."""
    single, ddp = (json.loads((metis_runs[mode] / "results.json").read_text()) for mode in ("single", "ddp"))
    assert ddp["sft_steps"] == single["sft_steps"] == STEPS
    for one, many in zip(single["log_history"], ddp["log_history"], strict=True):
        for name in ("loss", "lm_loss", "router_loss", "router_accuracy"):
            assert abs(one[name] - many[name]) <= LOSS_ATOL, (one["step"], name, one[name], many[name])
    assert ddp["heldout_routing"] == single["heldout_routing"]
    launch.check_launch_kind(metis_runs["ddp"] / "sft" / f"checkpoint-{STEPS}", "ddp")
    _only_the_main_process_wrote(metis_runs["ddp"].parent / "record-ddp", metis_runs["ddp"])


def test_metis_home_checkpoint_loads_and_gives_the_single_process_logits(metis_runs):
    tokenizer = AutoTokenizer.from_pretrained(metis_runs["single"] / "metis_home")
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    logits = {}
    for mode, folder in metis_runs.items():
        model = _load(AutoModelForCausalLM, folder / "metis_home")
        with torch.no_grad():
            for branch in ("thinking", "non_thinking"):
                logits[f"{mode}/{branch}"] = model(**batch, branch=branch).logits
            logits[f"{mode}/router"] = model(**batch).branch_logits
    for what in ("thinking", "non_thinking", "router"):
        difference = (logits[f"ddp/{what}"] - logits[f"single/{what}"]).abs().max().item()
        assert difference <= EXACT_LOGIT_ATOL, (what, difference)


# --- training_scripts/train_vision_tower.py -------------------------------------------------------------------------


def test_vision_tower_script_under_torchrun_writes_one_loadable_folder(tmp_path):
    """The plain loop under ``torchrun``: the main process trains and writes the folder, the other returns; one
    complete folder, nothing left beside it, loadable with ``from_pretrained``."""
    out = tmp_path / "towers" / "tower"
    stdout = launch.torchrun(SCRIPTS / "train_vision_tower.py", ["--output_dir", str(out), "--epochs", "1"], tmp_path,
                      record=tmp_path / "record")  # fmt: skip
    assert stdout.count("held-out accuracy") == 1
    assert [path.name for path in out.parent.iterdir()] == ["tower"]  # no temporary folders left
    assert assets.is_complete(out)
    writes = launch.writes_by_rank(tmp_path / "record", out.parent)
    assert writes[0] and not writes[1], writes
    _load(CLIPVisionModel, out)
    CLIPImageProcessor.from_pretrained(out)
