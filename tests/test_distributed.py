"""Multi-process training (issue 9) on CPU: ``torchrun --nproc_per_node 2`` (gloo) runs of the MixLoRA script
(``training_scripts/train_lora_experts.py``) and of MoE-LLaVA's stage III (``training_scripts/moe_tuning.py``), with
DDP and with FSDP2 (transformer-layer auto-wrap), against one process with the same global batch, seed and data
(fp32, dropout off; accelerate hands process i the i-th half of each batch the single process draws).

Where 1 and 2 processes differ, and the tolerances that follow:

- **Summation order** (all-reduced or reduce-scattered gradients, each shard padded to its own length) moves fp32
  results by ~1e-7. The MixLoRA runs train without the router loss in the gradient (``--router_aux_loss_coef 0``;
  the aux loss is still computed and logged), so this is their only difference: per-step losses agree within
  ``LOSS_ATOL`` (measured <= 1e-6) and the checkpoints' logits within ``EXACT_LOGIT_ATOL`` (measured 1.8e-7).
- **The router loss is per process.** Each process computes the load-balancing loss on its own shard, as
  DeepSpeed-MoE and the original MoE-LLaVA do: ``E * sum_e f_e * P_e`` is a product of batch means, so the mean over
  two shards is not its value on their union, and the routers' gradients differ by ``coef`` times that. The
  MoE-LLaVA runs keep the recipe's router loss (GShard top-1, coefficient 0.01): losses still agree within
  ``LOSS_ATOL`` (measured <= 2.4e-5; without the router-loss rescaling of ``DistributedTrainer`` they would be
  ``coef * aux``, ~0.02, apart), the checkpoints' logits within ``ROUTER_LOSS_LOGIT_ATOL`` (measured 2.1e-4 on
  logits of magnitude 0.5 after 4 SGD steps at lr 0.5; 1.5e-7 when the same runs use coefficient 0).
- DDP and FSDP do the same arithmetic in another order: their logits agree within ``EXACT_LOGIT_ATOL`` (measured
  <= 1.8e-7) whatever the router loss.
- ``aux_loss`` is logged as the mean over the processes' forwards; it agrees with one process's within ``AUX_ATOL``
  (the per-shard difference above: measured <= 4.5e-4 unweighted for MixLoRA, 2.4e-5 weighted for MoE-LLaVA). Expert
  counts are summed over processes: each router's total is exactly the single process's (rank 0 alone would count
  about half), the step-1 ``expert_load_max_ratio`` (same model, same tokens) is identical, and per expert the
  run's counts may differ by ``COUNT_ATOL`` assignments (a near-tie token sent to its other top choice by router
  weights that differ in the last bits; none did in the measured runs).

The runs use SGD: Adam's first step is ``lr * sign(g)``, which turns fp-level differences of near-zero gradient
entries into full-size steps, so Adam runs of 1 and 2 processes cannot be compared at any tight tolerance. The whole
file takes about 2 minutes on 2 CPU cores.
"""

import json
import runpy
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    TrainingArguments,
)

import moe_zoo
from moe_zoo.peft import MixLoraConfig
from moe_zoo.training.moe_tuning import MoeLlavaCollator, build_dense_moe_llava
from moe_zoo.training.routing_stats import RoutingStatsTrainer, router_loss_term
from tests.distributed_launch import (
    check_launch_kind,
    compare_counts,
    compare_logs,
    fsdp_arguments,
    logged_steps,
    torchrun,
    train_options,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIXLORA_SCRIPT = REPO_ROOT / "training_scripts" / "train_lora_experts.py"
MOE_TUNING_SCRIPT = REPO_ROOT / "training_scripts" / "moe_tuning.py"

STEPS = 4
GLOBAL_BATCH = 4
LOSS_ATOL = 1e-4
AUX_ATOL = 3e-3
COUNT_ATOL = 2
EXACT_LOGIT_ATOL = 1e-5
ROUTER_LOSS_LOGIT_ATOL = 1e-3
MODES = ("ddp", "fsdp")


def _compare_checkpoint_files(single: Path, distributed: Path, weights: str, mode: str) -> None:
    """The same tensors (names, shapes, dtypes) in the weight file, and the trained ones close."""
    with safe_open(single / weights, "pt") as a, safe_open(distributed / weights, "pt") as b:
        assert set(a.keys()) == set(b.keys()), mode
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.shape == y.shape and x.dtype == y.dtype, (mode, key)


# --- MixLoRA: training_scripts/train_lora_experts.py ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixlora_runs(tmp_path_factory, save_tiny_llm) -> dict[str, Path]:
    """The MixLoRA script, 4 SGD steps on GSM8K's 4 training chats (every second one held out; the aux loss logged
    but not trained, see the module docstring), with one process (batch 4) and with 2 processes (batch 2 each) under
    DDP and FSDP. Returns each run's ``output_dir``."""
    root = tmp_path_factory.mktemp("mixlora")
    llm = save_tiny_llm(root / "llm")
    argv = [
        "--model_path", str(llm), "--method", "mixlora", "--lora_r", "4", "--lora_alpha", "8", "--num_experts", "4",
        "--top_k", "2", "--lora_dropout", "0", "--max_length", "128", "--task_families", "gsm8k",
        "--heldout_every", "2", "--compare_with_lora", "false", "--learning_rate", "1.0", "--router_aux_loss_coef", "0",
    ]  # fmt: skip
    runs = {mode: root / mode for mode in ("single", *MODES)}
    old_argv = sys.argv
    try:
        sys.argv = [
            str(MIXLORA_SCRIPT),
            *argv,
            *train_options(GLOBAL_BATCH, STEPS),
            "--output_dir",
            str(runs["single"]),
        ]
        runpy.run_path(str(MIXLORA_SCRIPT), run_name="__main__")
    finally:
        sys.argv = old_argv
    half = [*argv, *train_options(GLOBAL_BATCH // 2, STEPS)]
    torchrun(MIXLORA_SCRIPT, [*half, "--output_dir", str(runs["ddp"])], root)
    fsdp = fsdp_arguments(root, ["LlamaDecoderLayer"])
    torchrun(MIXLORA_SCRIPT, [*half, "--output_dir", str(runs["fsdp"])], root, fsdp)
    return runs


def test_mixlora_ddp_and_fsdp_train_like_one_process(mixlora_runs):
    single_dir = mixlora_runs["single"] / "mixlora"
    single = json.loads((single_dir / "run_results.json").read_text())
    for mode in MODES:
        run_dir = mixlora_runs[mode] / "mixlora"
        check_launch_kind(run_dir / f"checkpoint-{STEPS}", mode)
        single_steps = logged_steps(single_dir / f"checkpoint-{STEPS}", STEPS)
        compare_logs(single_steps, logged_steps(run_dir / f"checkpoint-{STEPS}", STEPS), mode, LOSS_ATOL, AUX_ATOL)
        results = json.loads((run_dir / "run_results.json").read_text())
        assert abs(results["train_loss"] - single["train_loss"]) <= LOSS_ATOL, mode
        assert abs(results["heldout_loss"]["all"] - single["heldout_loss"]["all"]) <= LOSS_ATOL, mode
        assert results["trainable_parameters"] == single["trainable_parameters"], mode  # FSDP: global sizes
        compare_counts(single["expert_counts"], results["expert_counts"], mode, COUNT_ATOL)
        # results.json is written once, by the main process, and sums the comparison up as one process does
        summary = json.loads((mixlora_runs[mode] / "results.json").read_text())
        assert summary["runs"]["mixlora"]["expert_counts"] == results["expert_counts"], mode


def test_mixlora_checkpoints_load_and_give_the_same_logits(mixlora_runs, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["What is 2 + 3? The answer is 5.", "Name a colour of the sky at noon."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    logits = {}
    for mode in ("single", *MODES):
        folder = mixlora_runs[mode] / "mixlora"
        model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits[mode] = model(**batch).logits
        if mode != "single":
            _compare_checkpoint_files(mixlora_runs["single"] / "mixlora", folder, "adapter_model.safetensors", mode)
    for mode in MODES:
        difference = (logits[mode] - logits["single"]).abs().max().item()
        assert difference <= EXACT_LOGIT_ATOL, (mode, difference)
    assert (logits["ddp"] - logits["fsdp"]).abs().max().item() <= EXACT_LOGIT_ATOL


# --- MoE-LLaVA stage III: training_scripts/moe_tuning.py ------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
QUESTION = "What color is the image?"


def _image(color: str, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-20, 20, (40, 40, 3))
    return Image.fromarray(np.clip(np.array(COLORS[color]) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def moe_llava_runs(tmp_path_factory, save_tiny_llm) -> dict[str, Path]:
    """A dense MoE-LLaVA (a tiny CLIP tower, a 4-layer Llama with SmolLM2's tokenizer) saved as stage II's output,
    and stage III from it (upcycled, 4 experts top-2 on layers 0 and 2, the router loss on): 4 SGD steps on 8
    image questions with one process (batch 4) and with 2 (batch 2 each) under DDP and FSDP."""
    root = tmp_path_factory.mktemp("moe_llava")
    torch.manual_seed(0)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision"
    )
    save_tiny_llm(root / "llm", num_hidden_layers=4)
    dense, processor = build_dense_moe_llava(str(root / "vision"), str(root / "llm"))
    dense.save_pretrained(root / "stage2")
    processor.save_pretrained(root / "stage2")
    rows = []
    for i in range(8):
        color = list(COLORS)[i % 2]
        _image(color, i).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": QUESTION, "answer": color})
    (root / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    argv = [
        "--stage", "3", "--init_model", str(root / "stage2"), "--data_file", str(root / "train.jsonl"),
        "--max_length", "128", "--learning_rate", "0.5",
    ]  # fmt: skip
    runs = {mode: root / mode for mode in ("single", *MODES)}
    main = runpy.run_path(str(MOE_TUNING_SCRIPT), run_name="moe_tuning_script")["main"]
    main([*argv, *train_options(GLOBAL_BATCH, STEPS), "--output_dir", str(runs["single"])])
    half = [*argv, *train_options(GLOBAL_BATCH // 2, STEPS)]
    torchrun(MOE_TUNING_SCRIPT, [*half, "--output_dir", str(runs["ddp"])], root)
    fsdp = fsdp_arguments(root, ["LlamaDecoderLayer", "CLIPEncoderLayer"])
    torchrun(MOE_TUNING_SCRIPT, [*half, "--output_dir", str(runs["fsdp"])], root, fsdp)
    return runs


def test_moe_llava_stage3_ddp_and_fsdp_train_like_one_process(moe_llava_runs):
    single_dir = moe_llava_runs["single"]
    single_marker = json.loads((single_dir / "moe_tuning_stage.json").read_text())
    assert len(single_marker["expert_counts"]) == 2  # the two MoE layers' routers
    for mode in MODES:
        run_dir = moe_llava_runs[mode]
        check_launch_kind(run_dir / f"checkpoint-{STEPS}", mode)
        single_steps = logged_steps(single_dir / f"checkpoint-{STEPS}", STEPS)
        compare_logs(single_steps, logged_steps(run_dir / f"checkpoint-{STEPS}", STEPS), mode, LOSS_ATOL, AUX_ATOL)
        marker = json.loads((run_dir / "moe_tuning_stage.json").read_text())
        assert marker["global_step"] == STEPS
        compare_counts(single_marker["expert_counts"], marker["expert_counts"], mode, COUNT_ATOL)


def test_moe_llava_checkpoints_load_and_give_the_same_logits(moe_llava_runs):
    examples = [{"image": _image(list(COLORS)[i % 2], 100 + i), "question": QUESTION, "answer": "red"} for i in (0, 1)]
    logits = {}
    for mode in ("single", *MODES):
        folder = moe_llava_runs[mode]
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        assert len(model.moe_blocks()) == 2
        batch = MoeLlavaCollator(AutoProcessor.from_pretrained(folder), 128)(examples)
        with torch.no_grad():
            logits[mode] = model(**batch).logits
        if mode != "single":
            _compare_checkpoint_files(moe_llava_runs["single"], folder, "model.safetensors", mode)
    for mode in MODES:
        difference = (logits[mode] - logits["single"]).abs().max().item()
        assert difference <= ROUTER_LOSS_LOGIT_ATOL, (mode, difference)
    assert (logits["ddp"] - logits["fsdp"]).abs().max().item() <= EXACT_LOGIT_ATOL


# --- the reductions themselves --------------------------------------------------------------------------------------

REDUCTION_CHECK = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from moe_zoo.training.distributed import WindowStats, all_reduce_sum, distributed_ready

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert distributed_ready()
    assert all_reduce_sum(torch.tensor([1.0, 2.0]) * (rank + 1)).tolist() == [3.0, 6.0]
    window = WindowStats()
    # rank 0 logged one value (2.0), rank 1 three (4.0 each): the mean over all four values is 3.5, not 3.0
    for _ in range(1 + 2 * rank):
        window.add("aux_loss", 2.0 + 2.0 * rank)
    window.add("lm_loss", 10.0 * (rank + 1), count=5 * (rank + 1))  # token-weighted: (10 + 20) / (5 + 10)
    if rank == 1:
        window.add("only_rank_1", 7.0)
    means = window.global_means(["aux_loss", "lm_loss", "only_rank_1", "never"])
    assert means == {"aux_loss": 3.5, "lm_loss": 2.0, "only_rank_1": 7.0}, means
    assert window.totals == {}
    dist.destroy_process_group()
    """
)


def test_window_means_and_sums_are_global_and_weighted(tmp_path):
    script = tmp_path / "reduction_check.py"
    script.write_text(REDUCTION_CHECK)
    torchrun(script, [], tmp_path)


def test_the_router_loss_weighs_once_with_gradient_accumulation(tmp_path):
    """With ``num_items_in_batch`` the Trainer leaves the loss undivided by the accumulation steps (the LM loss is
    already normalised over all of them); the router loss, a per-batch mean, is divided by them instead of being
    counted once per micro-batch."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    model = moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4, output_router_logits=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_accumulation_steps=2)
    trainer = RoutingStatsTrainer(model=model, args=args, train_dataset=[{"input_ids": [1, 2]}])
    ids = torch.randint(1, 64, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    outputs = model(**batch)
    items = torch.tensor(2 * 8 * 2)  # this micro-batch's label tokens and the other micro-batch's
    lm_mean = outputs.loss.detach() - outputs.aux_loss.detach()  # the mean over this batch's 16 label tokens
    trainer.current_gradient_accumulation_steps = 2
    loss = trainer.compute_loss(model, batch, num_items_in_batch=items)
    expected = lm_mean * 16 / items + outputs.aux_loss.detach() / 2
    torch.testing.assert_close(loss.detach(), expected)


def test_router_loss_term_is_what_each_model_added_to_its_loss():
    """What ``DistributedTrainer`` rescales must be exactly the router part of the loss: for MixLoRA (unweighted
    ``aux_loss`` and ``z_loss`` outputs, weighted in the loss) and for moe-zoo's MoE models (weighted ``aux_loss``)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    ids = torch.randint(1, 64, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    mixlora = MixLoraConfig(r=2, num_experts=4, top_k=2, routing_strategy="mixlora-switch", task_type="CAUSAL_LM")
    models = {
        "mixlora": get_peft_model(AutoModelForCausalLM.from_config(config), mixlora),
        "upcycled": moe_zoo.upcycle(AutoModelForCausalLM.from_config(config), num_experts=4, output_router_logits=True),
    }
    for name, model in models.items():
        model.eval()  # no router jitter: the same routing in both forwards
        with torch.no_grad():
            outputs = model(**batch)
            logits = outputs.logits[:, :-1].reshape(-1, config.vocab_size)
            lm_loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
        term = router_loss_term(model, batch, outputs)
        assert term is not None and term > 0, name
        torch.testing.assert_close(outputs.loss - lm_loss, term, msg=name)
    assert router_loss_term(models["mixlora"], {"input_ids": ids}, models["mixlora"](input_ids=ids)) is None
