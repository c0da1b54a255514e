"""MoE-tuning's stages in QLoRA mode (``load_in_4bit`` + ``qlora_rank``): the stage's trainable set realised on a
4-bit base (routers and other full-precision parameters directly, LoRA on the quantized ``nn.Linear`` layers and
per-expert LoRA on the quantized expert banks), trained with the real ``run_stage`` and saved merged onto the
dequantized base as a full model folder.

Models run in train mode where logits are compared: on a CPU bitsandbytes' ``Linear4bit`` repacks its weight on its
first eval forward without gradients (see tests/test_quantized_experts.py).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    HfArgumentParser,
    TrainerCallback,
)

from moe_zoo.core.quantized_experts import QuantizedExperts, QuantizedProjection, is_quantized_linear
from moe_zoo.training.moe_tuning import (
    MoeLlavaCollator,
    MoeTuningArguments,
    build_dense_moe_llava,
    prepare_stage_model,
    run_stage,
    set_trainable,
)
from moe_zoo.training.qlora import merge_qlora
from tests.test_moe_tuning import _examples, _training_args, parts  # noqa: F401  (parts: a fixture)

FOUR_BIT = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
STEPS = 10
LEARNING_RATE = 1e-2
MERGE_TOLERANCE = 1e-5
"""Max |logit difference| between the merged full-precision stage output and the trained QLoRA model (measured
2.4e-7 on logits of size ~1: the merge adds the LoRA deltas to exactly the weights the quantized model dequantizes; what is left is float
rounding of ``x W.T + s x A.T B.T`` against ``x (W + s B A).T``)."""


@pytest.fixture(scope="module")
def dense_stage2(parts, tmp_path_factory):  # noqa: F811
    """A dense MoE-LLaVA (tiny CLIP + tiny Llama) saved as stage II's output: stage III's starting point."""
    vision, llm = parts
    folder = tmp_path_factory.mktemp("qlora") / "stage2"
    torch.manual_seed(0)
    model, processor = build_dense_moe_llava(str(vision), str(llm))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _batch(folder) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "right"
    return MoeLlavaCollator(processor, 128, "chat")(_examples(2))


def _logits(model, batch) -> torch.Tensor:
    model.train()  # see the module docstring
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


class Recorder(TrainerCallback):
    """Parameters and quantized buffers as training starts, which parameters got gradients, and the trained QLoRA
    model's logits on ``batch`` as training ends (before the stage merges it)."""

    def __init__(self, batch):
        self.batch, self.got_grad = batch, set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b.clone() for n, b in model.named_buffers() if not b.is_floating_point() or ".experts." in n}
        self.packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.got_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers_after = {n: b.clone() for n, b in model.named_buffers() if n in self.buffers}
        self.packed_after = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.packed}
        self.logits = _logits(model, self.batch)


@pytest.fixture(scope="module")
def qlora_stage3(dense_stage2, tmp_path_factory):
    output = tmp_path_factory.mktemp("qlora") / "stage3"
    args = MoeTuningArguments(
        stage=3, init_model=str(dense_stage2), max_length=128, load_in_4bit=True, qlora_rank=8, capacity_factor=None
    )
    recorder = Recorder(_batch(dense_stage2))
    training = _training_args(output, max_steps=STEPS, learning_rate=LEARNING_RATE)
    training.save_steps = STEPS // 2
    trainer = run_stage(args, training, _examples(), callbacks=[recorder])
    return trainer, recorder, output


def test_qlora_stage3_trains_routers_and_lora_and_leaves_the_quantized_base_alone(qlora_stage3):
    trainer, recorder, _ = qlora_stage3
    trainable = recorder.trainable
    routers = {n for n in trainable if ".mlp.gate.weight" in n}
    expert_lora = {n for n in trainable if ".mlp.experts." in n and ".lora_" in n}
    linear_lora = {n for n in trainable if ".lora_A.default." in n or ".lora_B.default." in n}
    assert routers and expert_lora and linear_lora
    # only what stage 3 trains: projector and .mlp. of the language model; nothing packed, no attention or vision
    assert all(n.startswith(("model.multi_modal_projector.", "model.language_model.layers.")) for n in trainable)
    assert not any(".self_attn." in n or "vision_tower" in n for n in trainable)
    assert all(".mlp." in n for n in trainable if n.startswith("model.language_model."))
    # dense FFNs (the non-MoE layers) and the projector got LoRA too; the projector's biases train directly
    assert any(".mlp.gate_proj.lora_B" in n for n in linear_lora)
    assert any(n.startswith("model.multi_modal_projector.") and n.endswith("lora_B.default.weight") for n in trainable)
    assert "model.multi_modal_projector.linear_1.base_layer.bias" in trainable
    for name in routers | expert_lora | {n for n in linear_lora if "lora_B" in n}:
        assert name in recorder.got_grad, name
        assert not torch.equal(recorder.before[name], recorder.after[name]), name
    assert recorder.buffers and recorder.packed
    for name, buffer in recorder.buffers.items():
        assert torch.equal(buffer, recorder.buffers_after[name]), name
    for name, packed in recorder.packed.items():
        assert torch.equal(packed, recorder.packed_after[name]), name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"QLoRA stage 3 (NF4 base): loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3
    # the Trainer's checkpoints hold the whole quantized model, LoRA factors and routers included
    checkpoint = safetensors.torch.load_file(trainer.args.output_dir + f"/checkpoint-{STEPS // 2}/model.safetensors")
    assert expert_lora <= set(checkpoint) and routers <= set(checkpoint)


def test_qlora_stage3_saves_a_merged_full_model_that_matches_the_trained_one(qlora_stage3, dense_stage2):
    _, recorder, output = qlora_stage3
    model, info = AutoModelForImageTextToText.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.moe_blocks() and not any(isinstance(m, QuantizedExperts) for m in model.modules())
    assert not any(is_quantized_linear(m) for m in model.modules())
    assert not any("lora" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert getattr(model.config, "quantization_config", None) is None
    difference = (_logits(model, recorder.batch) - recorder.logits).abs().max().item()
    print(f"merged fp32 stage-3 output vs trained QLoRA model: max |logit difference| {difference:.2e}")
    assert difference <= MERGE_TOLERANCE
    # the next stage (or inference) may load it in 4-bit again
    again = AutoModelForImageTextToText.from_pretrained(output, quantization_config=FOUR_BIT)
    assert any(isinstance(m, QuantizedExperts) for m in again.modules())
    assert torch.isfinite(_logits(again, recorder.batch)).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_merging_before_training_changes_nothing_beyond_dequantization(dense_stage2, bits):
    """With ``lora_B`` zero the merged model computes exactly what the quantized model computes (its base
    dequantized), to float rounding; and ``prepare_model_for_kbit_training`` with gradient checkpointing works on
    the QLoRA stage model."""
    quantization = {"load_in_4bit": True} if bits == 4 else {"load_in_8bit": True}
    args = MoeTuningArguments(stage=3, init_model=str(dense_stage2), max_length=128, **quantization)
    model, _ = prepare_stage_model(args, seed=0)
    assert args.resolved_qlora_rank == 8
    projection = model.moe_blocks()[0].experts.down_proj
    assert isinstance(projection, QuantizedProjection) and projection.lora_A.shape[:2] == (4, 8)
    batch = _batch(dense_stage2)
    quantized = _logits(model, batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    prepared = prepare_model_for_kbit_training(  # freezes everything
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    for parameter in trainable:
        parameter.requires_grad_(True)
    prepared.train()
    loss = prepared(**batch).loss
    loss.backward()  # through checkpointed layers: prepare_model_for_kbit_training enabled the input gradients
    assert torch.isfinite(loss) and model.moe_blocks()[0].gate.weight.grad is not None
    assert projection.lora_B.grad is not None and projection.lora_B.grad.abs().sum() > 0
    prepared.gradient_checkpointing_disable()
    merged = merge_qlora(model)
    difference = (_logits(merged, batch) - quantized).abs().max().item()
    print(f"{bits}-bit QLoRA stage model before training vs its merge: max |logit difference| {difference:.2e}")
    assert difference <= 1e-5


def test_qlora_options_and_misuse_raise_clear_errors(dense_stage2):
    with pytest.raises(ValueError, match="qlora_rank must be >= 1"):
        MoeTuningArguments(stage=3, load_in_4bit=True, qlora_rank=0)
    with pytest.raises(ValueError, match="load_in_4bit or load_in_8bit"):
        MoeTuningArguments(stage=3, qlora_rank=8)
    with pytest.raises(ValueError, match="not both"):
        MoeTuningArguments(stage=3, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="nf4"):
        MoeTuningArguments(stage=3, load_in_4bit=True, bnb_4bit_quant_type="int4")
    full_precision = AutoModelForImageTextToText.from_pretrained(dense_stage2)
    with pytest.raises(ValueError, match="QLoRA needs a quantized model"):
        set_trainable(full_precision, 2, qlora_rank=8)
    quantized = AutoModelForImageTextToText.from_pretrained(dense_stage2, quantization_config=FOUR_BIT)
    with pytest.raises(ValueError, match="qlora_rank must be >= 1"):
        set_trainable(quantized, 2, qlora_rank=0)
    with pytest.raises(ValueError, match="quantized .*cannot train"):
        set_trainable(quantized, 2)
    trainable = set_trainable(quantized, 1, qlora_rank=4)  # stage 1 in QLoRA: the projector's LoRA and biases
    assert trainable and all(n.startswith("model.multi_modal_projector.") for n in trainable)


def test_a_qlora_stage_refuses_to_resume(dense_stage2, tmp_path):
    args = MoeTuningArguments(stage=3, init_model=str(dense_stage2), load_in_4bit=True)
    with pytest.raises(ValueError, match="cannot resume"):
        run_stage(args, _training_args(tmp_path, resume_from_checkpoint="true"), _examples())


def test_qlora_stages_1_and_2_chain_into_full_model_folders(parts, tmp_path):  # noqa: F811
    vision, llm = parts
    for stage in (1, 2):
        args = MoeTuningArguments(
            stage=stage,
            vision_tower=str(vision),
            language_model=str(llm),
            init_model=str(tmp_path / "stage1") if stage == 2 else None,
            max_length=128,
            load_in_4bit=True,
            qlora_rank=4,
        )
        training = _training_args(tmp_path / f"stage{stage}", max_steps=2, learning_rate=LEARNING_RATE)
        trainer = run_stage(args, training, _examples())
        assert all(not is_quantized_linear(m) for m in trainer.model.modules())
        model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / f"stage{stage}", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert not model.moe_blocks() and not any("lora" in n for n, _ in model.named_parameters())


def test_the_training_script_accepts_the_qlora_options():
    parser = HfArgumentParser(MoeTuningArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--stage", "3", "--init_model", "runs/s2", "--load_in_4bit", "true", "--qlora_rank", "8"]
    )
    assert args.qlora and args.resolved_qlora_rank == 8 and args.quantization_config().load_in_4bit
    assert args.quantization_config().bnb_4bit_quant_type == "nf4"
