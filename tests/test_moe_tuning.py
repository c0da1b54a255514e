"""MoE-LLaVA's three-stage MoE-tuning (moe_zoo.training.moe_tuning) on tiny random parts: a CLIP vision tower and a
Llama with SmolLM2's real tokenizer. What each stage trains, function-preserving upcycling, training / saving /
reloading, exact resume, the router loss in the Trainer's loss, the collator's labels, and clear errors."""

import json
import math
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
)

import moe_zoo
from moe_zoo.training.moe_tuning import (
    STAGE_MARKER,
    MoeLlavaCollator,
    MoeTuningArguments,
    answer_questions,
    build_dense_moe_llava,
    prepare_stage_model,
    run_stage,
    set_trainable,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
QUESTION = "What color is the image?"


def _image(color: str, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-20, 20, (40, 40, 3))
    return Image.fromarray(np.clip(np.array(COLORS[color]) + noise, 0, 255).astype(np.uint8))


def _examples(n: int = 8) -> list[dict]:
    colors = list(COLORS)
    return [{"image": _image(colors[i % 2], i), "question": QUESTION, "answer": colors[i % 2]} for i in range(n)]


@pytest.fixture(scope="module")
def parts(tmp_path_factory, save_tiny_llm):
    """A tiny CLIP vision folder (with a 32x32 image processor) and a tiny Llama folder with SmolLM2's tokenizer."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision"
    )
    save_tiny_llm(root / "llm", num_hidden_layers=4)
    return root / "vision", root / "llm"


def _training_args(output_dir, max_steps=2, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **extra,
    )


class Snapshot(TrainerCallback):
    """The parameters as training starts (after any checkpoint was loaded)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def stages(parts, tmp_path_factory):
    """Stages 1 and 2 train 2 steps, stage 3 trains 4 (checkpoints at 2 and 4), each from the one before, with the
    original's learning rates (TrainingArguments' learning_rate left at its default)."""
    vision, llm = parts
    root = tmp_path_factory.mktemp("stages")
    results = {}
    for stage in (1, 2, 3):
        args = MoeTuningArguments(
            stage=stage,
            vision_tower=str(vision),
            language_model=str(llm),
            init_model=str(root / f"stage{stage - 1}") if stage > 1 else None,
            max_length=128,
        )
        snapshot = Snapshot()
        trainer = run_stage(
            args,
            _training_args(root / f"stage{stage}", max_steps=4 if stage == 3 else 2),
            _examples(),
            callbacks=[snapshot],
        )
        results[stage] = (trainer, snapshot, root / f"stage{stage}", args)
    return results


def _expected_trainable(names: list[str], stage: int) -> set[str]:
    projector = {n for n in names if n.startswith("model.multi_modal_projector.")}
    if stage == 1:
        return projector
    if stage == 2:
        return {n for n in names if not n.startswith("model.vision_tower.")}
    return projector | {n for n in names if re.fullmatch(r"model\.language_model\.layers\.\d+\.mlp\..+", n)}


def test_each_stage_trains_exactly_what_the_original_trains(stages):
    for stage, (trainer, *_rest) in stages.items():
        names = [n for n, _ in trainer.model.named_parameters()]
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable == _expected_trainable(names, stage), stage
    stage1 = {n for n, p in stages[1][0].model.named_parameters() if p.requires_grad}
    assert stage1 == {f"model.multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    stage2 = {n for n, p in stages[2][0].model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight"} <= stage2
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in stage2
    assert not any(n.startswith("model.vision_tower.") for n in stage2)
    stage3 = {n for n, p in stages[3][0].model.named_parameters() if p.requires_grad}
    layer = "model.language_model.layers.{}.mlp.{}"
    assert {
        layer.format(0, "gate.weight"),
        layer.format(0, "experts.gate_up_proj"),
        layer.format(2, "experts.down_proj"),
    } <= stage3
    assert {layer.format(1, "gate_proj.weight"), layer.format(3, "down_proj.weight")} <= stage3  # the dense FFNs
    assert not any(
        k in n for n in stage3 for k in ("self_attn", "layernorm", "embed_tokens", "norm.weight", "lm_head", "vision")
    )


def test_stage3_starts_from_the_stage2_function(stages, parts):
    _, _, stage2_dir, _ = stages[2]
    dense = AutoModelForImageTextToText.from_pretrained(stage2_dir).eval()
    moe, processor = prepare_stage_model(MoeTuningArguments(stage=3, init_model=str(stage2_dir)))
    assert moe.config.capacity_factor == 1.5 and moe.config.eval_capacity_factor == 2.0
    assert moe.config.aux_loss_type == "gshard_top1_sum" and moe.config.output_router_logits
    assert len(moe.moe_blocks()) == 2 and moe.config.moe_layer_indices == [0, 2]
    batch = MoeLlavaCollator(processor, 128)(_examples(4))
    with torch.no_grad():
        reference = dense(**batch).logits
        out = moe.eval()(**batch)
    assert (out.logits - reference).abs().max() <= 1e-5
    assert out.aux_loss > 0


def test_each_stage_trains_saves_and_reloads(stages):
    learning_rates = {1: 1e-3, 2: 2e-5, 3: 2e-5}
    for stage, (trainer, snapshot, output_dir, args) in stages.items():
        assert trainer.args.learning_rate == learning_rates[stage]
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        assert losses and all(math.isfinite(loss) for loss in losses), stage
        for name, parameter in trainer.model.named_parameters():
            changed = not torch.equal(parameter.detach(), snapshot.before[name])
            assert changed == parameter.requires_grad, (stage, name)
        assert json.loads((output_dir / STAGE_MARKER).read_text())["stage"] == stage
        reloaded = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
        processor = AutoProcessor.from_pretrained(output_dir)
        assert type(reloaded) is moe_zoo.MoeLlavaForConditionalGeneration
        assert len(reloaded.moe_blocks()) == (2 if stage == 3 else 0)
        batch = MoeLlavaCollator(processor, 128, args.resolved_conversation)(_examples(4))
        reference = MoeLlavaCollator(trainer.processing_class, 128, args.resolved_conversation)(_examples(4))
        assert all(torch.equal(batch[k], reference[k]) for k in reference)
        trainer.model.eval()
        with torch.no_grad():
            assert torch.equal(reloaded(**batch).logits, trainer.model(**batch).logits), stage
    answers = answer_questions(reloaded, processor, _examples(3), max_new_tokens=3, batch_size=2)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_a_resumed_stage_ends_like_an_uninterrupted_one(stages, tmp_path):
    full, _, full_dir, args = stages[3]
    shutil.copytree(full_dir / "checkpoint-2", tmp_path / "checkpoint-2")
    resumed = run_stage(args, _training_args(tmp_path, max_steps=4, resume_from_checkpoint="true"), _examples())
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        run_stage(args, _training_args(tmp_path / "empty", resume_from_checkpoint="true"), _examples())


def test_the_router_loss_is_part_of_the_stage3_trainer_loss(stages):
    trainer = stages[3][0]
    model = trainer.model.train()
    batch = trainer.data_collator(_examples(4))
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, batch)
        lm_only = model(**batch, output_router_logits=False).loss
        aux_loss = model(**batch).aux_loss
    assert aux_loss > 0
    torch.testing.assert_close(trainer_loss, lm_only + aux_loss)


def test_collator_supervises_exactly_the_answers_and_eos(parts):
    vision, llm = parts
    _, processor = build_dense_moe_llava(str(vision), str(llm))
    tokenizer = processor.tokenizer
    examples = [
        {"image": _image("red", 0), "question": QUESTION, "answer": "red"},
        {"image": np.full((32, 32, 3), 200, dtype=np.uint8), "question": "And this one?", "answer": "light grey"},
    ]
    batch = MoeLlavaCollator(processor, 256)(examples)
    image_id = processor.image_token_id
    for row, example in enumerate(examples):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        answer = tokenizer(" " + example["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert labels[length:].eq(-100).all()
        assert labels[labels != -100].tolist() == answer == ids[length - len(answer) : length].tolist()
        assert labels[: length - len(answer)].eq(-100).all()
        assert int((ids == image_id).sum()) == 16  # 4x4 patches, CLS dropped
        # the prompt's tokens are those the processor gives at inference
        prompt = MoeLlavaCollator(processor).prompt(example)
        assert prompt.endswith(f"USER: <image>\n{example['question']} ASSISTANT:")
        inference = processor(images=[example["image"]], text=[prompt])["input_ids"][0]
        assert ids[: length - len(answer)].tolist() == list(inference)

    # chat messages, two rounds: both answers supervised, both user turns masked
    chat = {
        "image": _image("blue", 1),
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "blue"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "yes"},
        ],
    }
    batch = MoeLlavaCollator(processor, 256)([chat])
    supervised = tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert supervised == f" blue{tokenizer.eos_token} yes{tokenizer.eos_token}"
    assert int((batch["input_ids"][0] == image_id).sum()) == 16

    # LLaVA's stage-I "plain" format: <image>{answer}\n, the answer and newline supervised
    batch = MoeLlavaCollator(processor, 256, conversation="plain")(examples[:1])
    assert tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100]) == "red\n"
    assert batch["input_ids"][0][:16].eq(image_id).all()

    # max_length cuts the end; cutting image placeholders is refused
    prompt_length = len(
        processor(images=[examples[0]["image"]], text=[MoeLlavaCollator(processor).prompt(examples[0])])["input_ids"][0]
    )
    cut = MoeLlavaCollator(processor, max_length=prompt_length + 1)(examples[:1])
    assert cut["input_ids"].shape[1] == prompt_length + 1
    assert tokenizer.decode(cut["labels"][0][cut["labels"][0] != -100]) == " red"
    with pytest.raises(ValueError, match="max_length"):
        MoeLlavaCollator(processor, max_length=20)(examples[:1])


def test_dense_model_from_parts_and_clear_errors(parts, tmp_path):
    vision, llm = parts
    model, processor = build_dense_moe_llava(str(vision), str(llm))
    assert model.config.moe_layer_indices == [] and model.config.image_seq_length == 16
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<image>"
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer) == model.lm_head.out_features
    source = CLIPVisionModel.from_pretrained(vision)
    torch.testing.assert_close(model.model.vision_tower.state_dict(), source.state_dict(), rtol=0, atol=0)
    llama = LlamaForCausalLM.from_pretrained(llm)
    torch.testing.assert_close(
        model.model.language_model.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight
    )
    assert torch.equal(model.lm_head.weight[: llama.lm_head.out_features], llama.lm_head.weight)
    # set_trainable's answer is the requires_grad state; stage 3 refuses a dense model; stages are 1..3
    assert set(set_trainable(model, 2)) == {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="upcycle"):
        set_trainable(model, 3)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        set_trainable(model, 4)

    (tmp_path / "no_config").mkdir()
    CLIPImageProcessor().save_pretrained(tmp_path / "no_config")
    no_processor = tmp_path / "no_processor"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(no_processor)
    cases = [
        (None, "vision tower is missing"),
        (str(tmp_path / "nowhere"), "does not exist"),
        (str(tmp_path / "no_config"), "vision config is missing"),
        (str(llm), "not a vision tower"),
        (str(no_processor), "no image processor"),
        (CLIPVisionConfig(**VISION), "pass image_processor"),
    ]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            build_dense_moe_llava(source, str(llm))
    with pytest.raises(ValueError, match="init_model"):
        prepare_stage_model(MoeTuningArguments(stage=2))


def test_script_runs_all_stages_from_a_jsonl(parts, tmp_path):
    vision, llm = parts
    rows = []
    for i, example in enumerate(_examples(4)):
        example["image"].save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": example["question"], "answer": example["answer"]})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    main = runpy.run_path(str(REPO_ROOT / "training_scripts" / "moe_tuning.py"), run_name="moe_tuning_script")["main"]
    argv = ["--all_stages", "--vision_tower", str(vision), "--language_model", str(llm)]
    argv += ["--data_file", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    argv += ["--max_length", "128", "--save_strategy", "no"]
    trainers = main(argv)
    assert [t.args.learning_rate for t in trainers] == [1e-3, 2e-5, 2e-5]
    assert len(AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "stage3").moe_blocks()) == 2
    assert main([*argv, "--resume_from_checkpoint", "true"]) == [None, None, None]  # all finished


def test_tied_embeddings_like_smollm2(parts, save_tiny_llm, tmp_path):
    """SmolLM2 ties its LM head to the embeddings: stage 2 trains the shared matrix, stage 3 freezes it, and
    upcycling (which sees the head's name first in MoE-LLaVA) still preserves the function."""
    vision, _ = parts
    save_tiny_llm(tmp_path / "tied", num_hidden_layers=2, tie_word_embeddings=True)
    dense, processor = build_dense_moe_llava(str(vision), str(tmp_path / "tied"))
    shared = dense.model.language_model.embed_tokens.weight
    assert dense.lm_head.weight is shared and shared.shape[0] == len(processor.tokenizer)
    set_trainable(dense, 2)
    assert shared.requires_grad
    moe = moe_zoo.upcycle_moe_llava(dense.eval(), **MoeTuningArguments(stage=3).moe_options()).eval()
    assert moe.lm_head.weight is moe.model.language_model.embed_tokens.weight
    trainable = set_trainable(moe, 3)
    assert not moe.lm_head.weight.requires_grad and "model.language_model.layers.1.mlp.gate_proj.weight" in trainable
    batch = MoeLlavaCollator(processor, 128)(_examples(2))
    with torch.no_grad():
        assert (moe(**batch).logits - dense(**batch).logits).abs().max() <= 1e-5
