"""Converting original Uni-MoE checkpoints: the v1 and 8e fixture models made by the original code (transformers
4.31, DeepSpeed 0.14) convert and reproduce its logits, router logits, expert choices, GShard losses and
intermediates from the converted original inputs; synthetic state dicts of both layouts land where they should
(the in-expert LoRA merged as W + s * B @ A); split e2 / 8e folders (extra files, a PEFT adapter, per-expert files)
assemble into the same model; anything unplaceable, missing or unsupported fails loudly; the CLI converts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText, CLIPConfig, CLIPVisionConfig, WhisperConfig

import moe_zoo
from moe_zoo.cli import main
from moe_zoo.core.losses import gshard_load_balancing_loss, router_aux_loss
from moe_zoo.core.recording import LayerRouting
from moe_zoo.modeling.uni_moe import UniMoeForConditionalGeneration
from moe_zoo.modeling.uni_moe.convert_uni_moe_original import (
    EXPERT_BASE_FILES,
    ConversionError,
    build_config,
    convert_original_inputs,
    convert_state_dict,
    convert_uni_moe_original,
    load_original_checkpoint,
    merge_peft_adapter,
)

CASES = {"v1": ("image", "speech", "text", "image_speech"), "8e": ("text", "image")}
TOL = 1e-5
VOCAB = 320


@pytest.fixture(scope="module")
def uni_moe_fixtures(shared_path: Path) -> Path:
    """The folder of Uni-MoE fixtures produced by the original code (``v1/`` and ``8e/``)."""
    path = shared_path / "fixtures" / "uni_moe_original"
    if not path.is_dir():
        pytest.skip(f"Uni-MoE fixtures not found at {path}")
    return path


@pytest.fixture(scope="module")
def converted(uni_moe_fixtures, tmp_path_factory):
    """``{variant: (model, saved folder)}``: each fixture converted once, in eager attention (the original's)."""
    root = tmp_path_factory.mktemp("uni_moe_converted")
    models = {}
    for variant in CASES:
        model = convert_uni_moe_original(uni_moe_fixtures / variant, root / variant)
        model.set_attn_implementation("eager")
        models[variant] = (model, root / variant)
    return models


def _load(folder: Path, name: str):
    return torch.load(folder / name, weights_only=True)


def _run(model, inputs, **kwargs):
    """Forward with the routers' outputs (logits, weights, indices) captured per MoE layer."""
    captured = []
    hooks = [block.gate.register_forward_hook(lambda m, i, o: captured.append(o)) for block in model.moe_blocks()]
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=False, output_router_logits=True, output_hidden_states=True, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, captured


@pytest.mark.parametrize("variant,case", [(v, c) for v, cases in CASES.items() for c in cases])
def test_fixture_case_reproduces_the_original(converted, uni_moe_fixtures, variant, case):
    model = converted[variant][0]
    folder = uni_moe_fixtures / variant
    inputs = _load(folder, f"inputs_{case}.pt")
    reference = _load(folder, f"logits_{case}.pt")
    routing = _load(folder, f"router_logits_{case}.pt")
    intermediates = _load(folder, f"intermediates_{case}.pt")
    ours = convert_original_inputs(inputs, model.config)
    out, captured = _run(model, ours)

    # Every merged position, padding included (the original embeds pad id 0, so do we).
    assert out.logits.shape == reference.shape
    assert (out.logits - reference).abs().max() <= TOL
    merged_mask = intermediates["merged_attention_mask"]
    expected_mask = torch.ones_like(ours["input_ids"]) if merged_mask is None else merged_mask.long()
    assert torch.equal(ours["attention_mask"], expected_mask)
    hidden = torch.stack(out.hidden_states)
    assert hidden.shape == intermediates["hidden_states"].shape  # embeddings, each layer, the final norm last
    assert (hidden - intermediates["hidden_states"]).abs().max() <= TOL
    if intermediates["inputs_embeds"] is not None:
        media = {"image": ours.get("pixel_values"), "speech": ours.get("input_features")}
        with torch.no_grad():
            embeds = model.model.embed_with_media(ours["input_ids"], media)
        assert (embeds - intermediates["inputs_embeds"]).abs().max() <= TOL

    assert len(captured) == len(routing["router_logits"]) == len(model.config.moe_layer_indices)
    num_experts = model.config.num_experts
    for layer, (logits, weights, indices) in enumerate(captured):
        expected = routing["router_logits"][layer]
        assert torch.equal(out.router_logits[layer], logits)
        assert logits.shape == expected.shape  # B * T_merged tokens: padding is routed, as in the original
        assert (logits - expected).abs().max() <= TOL
        if variant == "v1":
            assert torch.equal(indices, routing["topk_experts"][layer])  # the same top-2, in the same order
            assert (weights - routing["topk_weights"][layer]).abs().max() <= 1e-6
        else:
            combine = torch.zeros_like(logits).scatter(1, indices, weights.to(logits.dtype))
            assert torch.equal(combine > 0, routing["expert_weights"][layer] > 0)  # the same two experts
            assert (combine - routing["expert_weights"][layer]).abs().max() <= 1e-6
            counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
            assert torch.equal(counts, routing["exp_counts"][layer].to(counts.dtype))
            # DeepSpeed's l_aux of this layer: over every routed token, padding included.
            assert abs(gshard_load_balancing_loss(logits) - routing["l_aux"][layer]) <= 1e-6
    if variant == "8e":
        records = [LayerRouting(c[0], c[2], b.gate) for c, b in zip(captured, model.moe_blocks(), strict=True)]
        assert abs(router_aux_loss(records, model.config) - intermediates["moe_loss"]) <= 1e-6

    with torch.no_grad():
        if "image_features" in intermediates:
            features = model.model.get_image_features(ours["pixel_values"])
            assert (features - intermediates["image_features"]).abs().max() <= TOL
        if "audio_aligner_out" in intermediates:
            encoder_states = model.model.speech_encoder(ours["input_features"]).last_hidden_state
            assert (encoder_states - intermediates["audio_encoder_out"]).abs().max() <= TOL
            aligned = model.model.get_speech_features(ours["input_features"])
            assert (aligned - intermediates["audio_aligner_out"]).abs().max() <= TOL
        for layer, (mlp_input, mlp_output) in (intermediates.get("moe_io") or {}).items():
            block = model.model.language_model.layers[layer].mlp
            assert (block(mlp_input) - mlp_output).abs().max() <= TOL


def test_converted_configs_carry_the_original_settings(converted):
    v1, e8 = converted["v1"][0].config, converted["8e"][0].config
    assert (v1.image_token_id, v1.video_token_id, v1.speech_token_id, v1.audio_token_id) == (320, 321, 322, 323)
    assert v1.text_config.vocab_size == VOCAB and v1.text_config.rope_parameters["rope_theta"] == 10000.0
    assert (v1.router_type, v1.num_experts, v1.num_experts_per_tok, v1.router_aux_loss_coef) == (
        "topk_softmax",
        4,
        2,
        0,
    )
    assert v1.moe_layer_indices == [0, 1, 2] and v1.speech_query_tokens == 8
    assert (v1.vision_feature_layer, v1.vision_feature_select_strategy) == (-2, "default")
    assert (v1.vision_config.model_type, v1.speech_config.model_type) == ("clip_vision_model", "whisper")
    assert (e8.router_type, e8.norm_topk_prob, e8.aux_loss_type, e8.router_aux_loss_coef) == (
        "softmax_topk",
        True,
        "gshard_top1_sum",
        0.01,
    )
    assert (e8.num_experts, e8.moe_layer_indices, e8.capacity_factor, e8.router_second_expert_gumbel) == (
        8,
        [0, 1],
        None,
        False,
    )
    assert (e8.modality_l1_loss_coef, e8.modality_kl_loss_coef) == (0.0, 0.0)
    assert (e8.image_expert_indices, e8.audio_expert_indices) == ([2, 3, 4, 6], [0, 4, 5, 7])
    assert e8.speech_config is None and e8.text_config.intermediate_size == 32


def test_saved_model_reloads_with_identical_logits(converted, uni_moe_fixtures):
    for variant, case in (("v1", "image_speech"), ("8e", "image")):
        model, folder = converted[variant]
        reloaded = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
        assert type(reloaded) is UniMoeForConditionalGeneration
        inputs = convert_original_inputs(_load(uni_moe_fixtures / variant, f"inputs_{case}.pt"), model.config)
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
        saved = load_file(folder / "model.safetensors")
        assert saved.keys() == model.state_dict().keys()
        if variant == "v1":  # the unused one-row embedding of the connector's decoder is zero, not random
            assert not saved["model.speech_connector.decoder.embed_tokens.weight"].any()


# --- inputs ------------------------------------------------------------------------------------------------------


def test_inputs_follow_the_original_consumption_order(converted):
    config = converted["v1"][0].config
    q, p = config.speech_query_tokens, 16
    images = torch.randn(3, 3, 32, 32)
    features = torch.randn(2, 3, 8, 100)
    inputs = {
        # Row 0: two images, two speech segments (chunks 0-1, chunk 2); row 1: one one-chunk segment.
        "input_ids": torch.tensor([[1, -200, 5, -300, -200, -300, 6], [1, -300, 7, 8, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
        "labels": torch.tensor([[-100, -100, 5, -100, -100, -100, 6], [-100, -100, 7, 8, -100, -100, -100]]),
        "images": images,
        "image_mask": torch.tensor([True, False, True]),  # images 0 and 2 are real
        "input_features": features,
        "features_mask": torch.tensor([[1, 1, 2], [3, 0, 1]]),  # the first id < 1 ends a row
        "return_dict": True,
    }
    ours = convert_original_inputs(inputs, config)
    # Images go in batch order across rows (not per row): row 0's two sentinels take the two real images.
    assert torch.equal(ours["pixel_values"], images[[0, 2]])
    assert torch.equal(
        ours["input_features"], torch.stack([features[0, 0], features[0, 1], features[0, 2], features[1, 0]])
    )
    image, speech = config.image_token_id, config.speech_token_id
    row0 = [1, *[image] * p, 5, *[speech] * 2 * q, *[image] * p, *[speech] * q, 6]
    row1 = [1, *[speech] * q, 7, 8]
    assert ours["input_ids"][0].tolist() == row0
    assert ours["input_ids"][1].tolist() == row1 + [0] * (len(row0) - len(row1))  # its own pads, then right pads
    assert ours["attention_mask"].sum(dim=1).tolist() == [len(row0), len(row1)]
    assert ours["labels"][0].tolist() == [-100 if t in (1, image, speech) else t for t in row0]
    assert ours["return_dict"] is True
    # A 5-D `images` puts all images of an element at its sentinel; image_mask is not read there.
    grouped = convert_original_inputs(
        {"input_ids": torch.tensor([[1, -200, 2]]), "images": torch.randn(1, 2, 3, 32, 32)}, config
    )
    assert grouped["input_ids"].shape == (1, 2 + 2 * p) and grouped["pixel_values"].shape == (2, 3, 32, 32)
    # The original's text-only call passes dummy media that no sentinel reads.
    dummy = {
        "input_ids": torch.tensor([[1, 5, 6]]),
        "images": torch.zeros(1, 3, 32, 32),
        "image_mask": torch.tensor([False]),
        "input_features": torch.ones(1, 1, 8, 100),
        "features_mask": torch.tensor([[0]]),
    }
    plain = convert_original_inputs(dummy, config)
    assert plain["input_ids"].tolist() == [[1, 5, 6]] and plain["attention_mask"].tolist() == [[1, 1, 1]]
    assert "pixel_values" not in plain and "input_features" not in plain


def test_input_mismatches_are_refused(converted):
    config = converted["v1"][0].config
    images = {"images": torch.randn(1, 3, 32, 32), "image_mask": torch.tensor([True])}
    with pytest.raises(ConversionError, match="2 image sentinels.*1 images"):
        convert_original_inputs({"input_ids": torch.tensor([[1, -200, -200]]), **images}, config)
    with pytest.raises(ConversionError, match="image_mask"):
        convert_original_inputs({"input_ids": torch.tensor([[1, -200]]), "images": images["images"]}, config)
    speech = {"input_features": torch.randn(1, 2, 8, 100), "features_mask": torch.tensor([[1, 2]])}
    with pytest.raises(ConversionError, match="row 0 of input_ids holds 1 speech sentinels.*2 segments"):
        convert_original_inputs({"input_ids": torch.tensor([[1, -300, 4]]), **speech}, config)
    with pytest.raises(ConversionError, match="no input_features"):
        convert_original_inputs({"input_ids": torch.tensor([[1, -300]])}, config)
    with pytest.raises(ConversionError, match="no vision tower"):
        convert_original_inputs({"input_ids": torch.tensor([[1, -200]]), **images}, _text_only_config())
    with pytest.raises(ConversionError, match="unknown original inputs"):
        convert_original_inputs({"input_ids": torch.tensor([[1]]), "modality": "x"}, config)


# --- configs -----------------------------------------------------------------------------------------------------


def _original_config(layout: str, **overrides) -> dict:
    """A tiny original config.json of either layout (4 layers), with vision and speech towers named as released."""
    fields = {
        "model_type": "llava" if layout == "v1" else "llava_llama",
        "vocab_size": 40,
        "hidden_size": 16,
        "intermediate_size": 12,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "rms_norm_eps": 1e-5,
        "moe": True,
        "num_experts": 3,
        "num_experts_per_tok": 2,
        "mm_vision_tower": "/path/to/clip-vit-large-patch14-336",  # hard-coded paths must not matter
        "mm_hidden_size": 8,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_audio_tower": "/path/to/whisper-small",
        "mm_audio_hidden_size": 8,
        "audio_projector_type": "linear",
        "mm_audio_select_layer": 0,
        "query_tokens_size": 4,
    }
    if layout == "8e":
        fields |= {
            "moe_type": "dense",
            "ep_size": 8,
            "capacity_factor": 1.5,
            "lora_r": 2,
            "lora_alpha": 4,
            "aux_balance_loss": True,
            "aux_balance_loss_coef": 0.01,
            "aux_multimodal_loss": False,
            "aux_multimodal_loss_coef": 0.02,
            "aux_kl_loss": False,
            "aux_kl_loss_coef": 0.03,
            "image_expert_indices": [0, 1],
            "audio_expert_indices": [2],
            "video_expert_indices": [0, 1],
        }
    return {**fields, **overrides}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    """Tiny tower configs under their released folder names: a full CLIPConfig (as the Hub folder holds) and a
    WhisperConfig."""
    root = tmp_path_factory.mktemp("encoders")
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16)
    CLIPConfig(vision_config={**vision, "patch_size": 8}).save_pretrained(root / "clip-vit-large-patch14-336")
    WhisperConfig(
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_mel_bins=4,
        max_source_positions=6,
        max_target_positions=8,
        vocab_size=30,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ).save_pretrained(root / "whisper-small")
    return root


def _text_only_config(layout: str = "v1", **overrides):
    fields = {"mm_vision_tower": None, "mm_audio_tower": None, **overrides}
    return build_config(_original_config(layout, **fields))


def test_build_config_maps_the_moe_and_media_fields(encoders, uni_moe_fixtures):
    v1 = build_config(_original_config("v1"), encoders)
    assert (v1.vision_config.image_size, v1.speech_config.d_model, v1.speech_query_tokens) == (16, 8, 4)
    assert (v1.router_type, v1.moe_layer_indices, v1.router_aux_loss_coef, v1.image_token_id) == (
        "topk_softmax",
        [0, 1, 2, 3],
        0.0,
        40,
    )
    e8 = build_config(_original_config("8e", aux_multimodal_loss=True, aux_kl_loss=True), encoders)
    assert (e8.modality_l1_loss_coef, e8.modality_kl_loss_coef, e8.router_aux_loss_coef) == (0.02, 0.03, 0.01)
    assert e8.audio_expert_indices == [2]
    # moe_type="sparse": MoE where layer_num % moe_stride == 0 (modeling_llama_dp.py), LlamaMLPLoRA elsewhere.
    assert _text_only_config("8e", moe_type="sparse", moe_stride=2).moe_layer_indices == [0, 2]
    assert _text_only_config("8e", moe_type="sparse", moe_stride=3).moe_layer_indices == [0, 3]
    assert _text_only_config("8e", moe_type="other").moe_layer_indices == []
    assert _text_only_config("8e", aux_balance_loss=False).router_aux_loss_coef == 0.0
    top1 = _text_only_config("8e", num_experts_per_tok=1)  # DeepSpeed's top-1 gate keeps the probability
    assert (top1.num_experts_per_tok, top1.norm_topk_prob) == (1, False)
    assert _text_only_config("8e", ep_size=1).moe_options() == _text_only_config("8e", ep_size=8).moe_options()
    assert _text_only_config("v1", moe=None).moe_layer_indices == []
    assert _text_only_config("v1", mm_vision_select_feature="cls_patch").vision_config is None
    cls = build_config(_original_config("v1", mm_vision_select_feature="cls_patch"), encoders)
    assert cls.vision_feature_select_strategy == "full"
    linear = _text_only_config("v1", rope_scaling={"type": "linear", "factor": 2.0}).text_config.rope_parameters
    assert (linear["rope_type"], linear["factor"], linear["rope_theta"]) == ("linear", 2.0, 10000.0)
    # The fixture's CLIPVisionConfig file, given explicitly, works as well as a full CLIPConfig.
    fixture_tower = uni_moe_fixtures / "v1" / "encoders" / "clip-vit-large-patch14-336"
    explicit = build_config(_original_config("v1", mm_hidden_size=32), encoders, vision_config=fixture_tower)
    assert type(explicit.vision_config) is CLIPVisionConfig and explicit.vision_config.hidden_size == 32


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' is not supported.*mlp2x_gelu"),
        ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu'"),
        ({"audio_projector_type": "mlp2x_gelu"}, "audio_projector_type 'mlp2x_gelu'"),
        ({"mm_audio_select_layer": -1}, "mm_audio_select_layer -1"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size 1024 differs"),
        ({"mm_vision_select_layer": 5}, "mm_vision_select_layer 5"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"mm_vision_tower": "openai/siglip-base"}, "siglip-base"),
    ],
)
def test_build_config_refuses_what_it_cannot_map(encoders, overrides, message):
    with pytest.raises(ConversionError, match=message):
        build_config(_original_config("v1", **overrides), encoders)


def test_build_config_refuses_8e_features_that_change_the_function(encoders):
    for overrides, message in (
        ({"num_experts_per_tok": 3}, "num_experts_per_tok=3"),
        ({"use_fm_block": True}, "use_fm_block"),
        ({"moe_type": "sparse"}, "moe_stride"),
        ({"aux_balance_loss_coef": None}, "aux_balance_loss_coef"),
    ):
        with pytest.raises(ConversionError, match=message):
            _text_only_config("8e", **overrides)
    with pytest.raises(ConversionError, match="encoders_dir"):
        build_config(_original_config("v1"))


# --- synthetic state dicts ---------------------------------------------------------------------------------------


def _random_model(config) -> UniMoeForConditionalGeneration:
    torch.manual_seed(0)
    model = UniMoeForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)  # no zeros or ones that a wrong placement could still match
    return model


def _to_original(state_dict: dict, layout: str, dense_layers: set[int], scaling: float | None, seed: int = 1) -> dict:
    """Our state dict written back in the original's names (an independent inverse of the converter): experts
    unstacked; for ``scaling``, every FFN projection ``W`` split into an in-module LoRA with
    ``W_stored = W - scaling * B @ A``. Adds the keys the original has and the converter must drop."""
    generator = torch.Generator().manual_seed(seed)
    out = {}

    def projection(key, weight):
        if scaling is None:
            out[key] = weight
            return
        a = torch.randn(2, weight.shape[1], generator=generator)
        b = torch.randn(weight.shape[0], 2, generator=generator)
        out[key] = (weight.double() - scaling * (b.double() @ a.double())).float()
        stem = key.removesuffix(".weight")
        out[f"{stem}_lora_A.weight"], out[f"{stem}_lora_B.weight"] = a, b

    renames = {
        "model.language_model.": "model.",
        "model.vision_tower.": "model.vision_tower.vision_tower.vision_model.",
        "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "model.speech_encoder.": "model.audio_tower.audio_tower.",
        "model.speech_connector.decoder.": "model.mm_audio_aligner.decoder.audio_decoder.",
        "model.speech_connector.projector.": "model.mm_audio_aligner.projector.",
        "model.speech_connector.query_tokens": "model.query_tokens",
    }
    for key, tensor in state_dict.items():
        layer_key = key.removeprefix("model.language_model.")
        parts = layer_key.split(".")
        if key.endswith(("selection_bias", "speech_connector.decoder.embed_tokens.weight")):
            continue
        if parts[0] == "layers" and parts[2] == "mlp":
            prefix = f"model.layers.{parts[1]}.mlp."
            expert = prefix + (
                "experts.{e}.{p}.weight" if layout == "v1" else "deepspeed_moe.experts.deepspeed_experts.{e}.{p}.weight"
            )
            if parts[3:] == ["gate", "weight"]:
                out[prefix + ("gate.weight" if layout == "v1" else "deepspeed_moe.gate.wg.weight")] = tensor
            elif parts[3:] == ["experts", "gate_up_proj"]:
                for e, bank in enumerate(tensor):
                    gate, up = bank.chunk(2, dim=0)
                    projection(expert.format(e=e, p="gate_proj"), gate)
                    projection(expert.format(e=e, p="up_proj"), up)
            elif parts[3:] == ["experts", "down_proj"]:
                for e, bank in enumerate(tensor):
                    projection(expert.format(e=e, p="down_proj"), bank)
            else:
                assert int(parts[1]) in dense_layers
                projection(prefix + ".".join(parts[3:]), tensor)
            continue
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[renames[prefix] + key.removeprefix(prefix) if prefix else key] = tensor
    # What the original also holds: rotary caches, the inherited second Whisper, the aligner's token embedding.
    for layer in range(4):
        out[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, 8, 2).float() / 8)
        )
    if any(k.startswith("model.audio_tower.") for k in out):
        out["model.audio_tower.encoder.conv1.weight"] = torch.randn(8, 4, 3)
        out["model.audio_tower.decoder.layer_norm.weight"] = torch.randn(8)
        out["model.mm_audio_aligner.decoder.audio_decoder.embed_tokens.weight"] = torch.randn(30, 8)
    return out


def test_v1_state_dict_round_trips(encoders):
    config = build_config(_original_config("v1"), encoders)
    model = _random_model(config)
    ours = model.state_dict()
    original = _to_original(ours, "v1", set(), None)
    converted = convert_state_dict(original, config)
    assert converted.keys() == ours.keys()
    for key, tensor in converted.items():
        if key == "model.speech_connector.decoder.embed_tokens.weight" or key.endswith("selection_bias"):
            assert not tensor.any(), key  # filled with zeros, as the original has no counterpart
        else:
            assert torch.equal(tensor, ours[key]), key
    # One expert by hand: gate_up_proj[e] = [gate_proj_e; up_proj_e], down_proj[e] = down_proj_e.
    bank = converted["model.language_model.layers.2.mlp.experts.gate_up_proj"]
    assert bank.shape == (3, 24, 16)
    gate, up = (
        original["model.layers.2.mlp.experts.1.gate_proj.weight"],
        original["model.layers.2.mlp.experts.1.up_proj.weight"],
    )
    assert torch.equal(bank[1], torch.cat([gate, up]))
    assert torch.equal(
        converted["model.language_model.layers.2.mlp.experts.down_proj"][1],
        original["model.layers.2.mlp.experts.1.down_proj.weight"],
    )
    assert (
        converted["model.vision_tower.pre_layrnorm.weight"]
        is original["model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"]
    )


def test_8e_state_dict_round_trips_with_the_lora_merged():
    config = _text_only_config("8e", moe_type="sparse", moe_stride=2)  # MoE layers 0 and 2, LlamaMLPLoRA 1 and 3
    assert config.moe_layer_indices == [0, 2]
    model = _random_model(config)
    ours = model.state_dict()
    scaling = 4 / 2
    original = _to_original(ours, "8e", {1, 3}, scaling)
    converted = convert_state_dict(original, config, lora_scaling=scaling)
    assert converted.keys() == ours.keys()
    for key, tensor in converted.items():
        assert torch.allclose(tensor, ours[key], atol=1e-6, rtol=0), key
    # The merge is exactly W + s * B @ A in float64, rounded once, for experts and dense FFNs alike.
    for ours_key, index, original_key in (
        ("model.language_model.layers.2.mlp.experts.gate_up_proj", (1, slice(12, 24)), "deepspeed_experts.1.up_proj"),
        ("model.language_model.layers.2.mlp.experts.down_proj", (2,), "deepspeed_experts.2.down_proj"),
    ):
        stem = f"model.layers.2.mlp.deepspeed_moe.experts.{original_key}"
        w, a, b = (original[f"{stem}{suffix}.weight"] for suffix in ("", "_lora_A", "_lora_B"))
        expected = (w.double() + scaling * (b.double() @ a.double())).float()
        assert torch.equal(converted[ours_key][index], expected)
        assert not torch.allclose(expected, w, atol=1e-3)
    w, a, b = (original[f"model.layers.1.mlp.up_proj{s}.weight"] for s in ("", "_lora_A", "_lora_B"))
    assert torch.equal(
        converted["model.language_model.layers.1.mlp.up_proj.weight"],
        (w.double() + scaling * (b.double() @ a.double())).float(),
    )


@pytest.mark.parametrize(
    "extra",
    [
        "model.some_new_module.weight",
        "model.layers.0.mlp.experts.3.up_proj.weight",  # expert 3 of 3
        "model.layers.0.mlp.experts.0.w1.weight",
        "model.layers.4.input_layernorm.weight",  # a layer beyond num_hidden_layers
        "model.image_newline",
    ],
)
def test_an_unknown_key_is_refused_by_name(extra):
    config = _text_only_config()
    original = _to_original(_random_model(config).state_dict(), "v1", set(), None)
    original[extra] = torch.zeros(1)
    with pytest.raises(ConversionError, match="cannot place 1 key") as error:
        convert_state_dict(original, config)
    assert extra in str(error.value)


def test_a_missing_tensor_is_refused_by_name(encoders):
    config = build_config(_original_config("v1"), encoders)
    original = _to_original(_random_model(config).state_dict(), "v1", set(), None)
    full = dict(original)
    del original["model.layers.1.mlp.experts.2.up_proj.weight"], original["model.layers.3.mlp.gate.weight"]
    with pytest.raises(ConversionError, match="lacks 2 key") as error:
        convert_state_dict(original, config)
    message = str(error.value)
    assert "model.layers.1.mlp.experts.2.up_proj.weight (for model.language_model.layers.1.mlp.experts.*)" in message
    assert "model.layers.3.mlp.gate.weight (for model.language_model.layers.3.mlp.gate.weight)" in message
    original = dict(full)
    del original["model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"]
    with pytest.raises(
        ConversionError, match=r"never filled from the checkpoint: 1 key.*model\.vision_tower\.pre_layrnorm"
    ):
        convert_state_dict(original, config)
    original = dict(full)
    original["model.mm_projector.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"shape mismatch.*linear_1\.weight \(3, 3\) != \(16, 8\)"):
        convert_state_dict(original, config)
    original = dict(full)
    original["model.layers.0.self_attn.rotary_emb.inv_freq"] = (
        original["model.layers.0.self_attn.rotary_emb.inv_freq"] / 2
    )
    with pytest.raises(ConversionError, match="rotary frequencies"):
        convert_state_dict(original, config)


def test_8e_lora_keys_need_their_scaling_and_partner():
    config = _text_only_config("8e")
    original = _to_original(_random_model(config).state_dict(), "8e", set(), 2.0)
    with pytest.raises(ConversionError, match="lora_scaling = lora_alpha / lora_r"):
        convert_state_dict(original, config)
    del original["model.layers.3.mlp.deepspeed_moe.experts.deepspeed_experts.0.down_proj_lora_B.weight"]
    with pytest.raises(ConversionError, match=r"lacks 1 key.*deepspeed_experts\.0\.down_proj_lora_B\.weight"):
        convert_state_dict(original, config, lora_scaling=2.0)
    original["model.layers.3.mlp.gate.weight"] = torch.zeros(3, 16)  # a v1 router in an 8e layer
    with pytest.raises(ConversionError, match=r"layers \[3\] mix v1 keys"):
        convert_state_dict(original, config, lora_scaling=2.0)


# --- split checkpoints -------------------------------------------------------------------------------------------


def _module_tree(weights: dict[str, torch.Tensor]) -> nn.Module:
    """An nn.Module whose Linear layers sit at the given dotted paths (the original's module names)."""
    root = nn.Module()
    for name, weight in weights.items():
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        parent.add_module(name.split(".")[-1], linear)
    return root


@pytest.mark.parametrize("variant", ["plain", "patterns", "rslora"])
def test_peft_adapter_merges_as_peft_does(tmp_path, variant):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    modules = {
        "model.layers.0.self_attn.q_proj": torch.randn(8, 8),
        "model.layers.0.mlp.experts.1.gate_proj": torch.randn(6, 8),
        "model.layers.1.self_attn.v_proj": torch.randn(8, 8),
    }
    options = {
        "plain": {},
        "patterns": {"rank_pattern": {"gate_proj": 2}, "alpha_pattern": {"v_proj": 32}},
        "rslora": {"use_rslora": True},
    }[variant]
    peft_model = get_peft_model(
        _module_tree(modules), LoraConfig(r=4, lora_alpha=8, target_modules=list(modules), **options)
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    peft_model.save_pretrained(tmp_path)
    reference = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    state_dict = {f"{name}.weight": weight.clone() for name, weight in modules.items()}
    state_dict["model.layers.0.self_attn.k_proj.weight"] = torch.randn(8, 8)  # not targeted: left alone
    untouched = state_dict["model.layers.0.self_attn.k_proj.weight"]
    merged = merge_peft_adapter(state_dict, tmp_path)
    assert sorted(merged) == sorted(reference)
    for key, weight in reference.items():
        assert torch.allclose(state_dict[key], weight, atol=1e-5, rtol=1e-6), key
        assert not torch.allclose(state_dict[key], modules[key.removesuffix(".weight")], atol=1e-2)
    assert state_dict["model.layers.0.self_attn.k_proj.weight"] is untouched
    state_dict.pop("model.layers.1.self_attn.v_proj.weight")
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight \(no such weight"):
        merge_peft_adapter(state_dict, tmp_path)


def _write_adapter(folder: Path, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: int) -> None:
    """A PEFT LoRA adapter folder in PEFT's own format (the names ``save_pretrained`` writes, as checked above)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(deltas), "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for module, (a, b) in deltas.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    torch.save(tensors, folder / "adapter_model.bin")


def test_split_e2_folder_reproduces_the_fixture(uni_moe_fixtures, converted, tmp_path):
    """A v1 checkpoint split as the released e2 ones: a sharded base model whose projector, aligner, query tokens
    and routers are stale (zeros) and whose LoRA-targeted weights are W - s * B @ A, plus non_lora_trainables.bin,
    mm_audio_aligner.bin, mlp_gates.bin (PEFT prefixes, a stray LoRA piece) and the adapter folder."""
    fixture = uni_moe_fixtures / "v1"
    full = load_file(fixture / "model.safetensors")
    groups = {
        "non_lora_trainables.bin": [k for k in full if k.startswith("model.mm_projector.")],
        "mm_audio_aligner.bin": [k for k in full if k.startswith(("model.mm_audio_aligner.", "model.query_tokens"))],
        "mlp_gates.bin": [k for k in full if k.endswith("mlp.gate.weight")],
    }
    e2, base = tmp_path / "e2", tmp_path / "base"
    e2.mkdir()
    base.mkdir()
    shutil.copy(fixture / "config.json", e2 / "config.json")
    stale = {k: torch.zeros_like(v) if any(k in g for g in groups.values()) else v.clone() for k, v in full.items()}
    generator = torch.Generator().manual_seed(3)
    targets = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.mlp.experts.3.down_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    deltas = {}
    for module in targets:
        weight = full[f"{module}.weight"]
        a = torch.randn(4, weight.shape[1], generator=generator) * 0.1
        b = torch.randn(weight.shape[0], 4, generator=generator) * 0.1
        stale[f"{module}.weight"] = (weight.double() - 2.0 * (b.double() @ a.double())).float()
        deltas[module] = (a, b)
    _write_adapter(e2 / "adapter", deltas, r=4, alpha=8)
    keys = sorted(stale)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, shard_keys in shards.items():
        save_file({k: stale[k].contiguous() for k in shard_keys}, base / name)
    index = {"weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(
        {f"base_model.model.{k}": full[k] for k in groups["non_lora_trainables.bin"]}, e2 / "non_lora_trainables.bin"
    )
    torch.save({k: full[k] for k in groups["mm_audio_aligner.bin"]}, e2 / "mm_audio_aligner.bin")
    gates = {f"base_model.model.{k}": full[k] for k in groups["mlp_gates.bin"]}
    gates["base_model.model.model.layers.0.mlp.gate.lora_A.default.weight"] = torch.zeros(4, 64)  # ignored
    torch.save(gates, e2 / "mlp_gates.bin")

    with pytest.raises(ConversionError, match="pass base_dir"):
        convert_uni_moe_original(e2, encoders_dir=fixture / "encoders")
    model = convert_uni_moe_original(
        e2, encoders_dir=fixture / "encoders", base_dir=base, adapter_dir=e2 / "adapter"
    ).eval()
    model.set_attn_implementation("eager")
    reference = converted["v1"][0].state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.allclose(tensor, reference[key], atol=1e-6, rtol=0), key
    inputs = convert_original_inputs(_load(fixture, "inputs_image_speech.pt"), model.config)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - _load(fixture, "logits_image_speech.pt")).abs().max() <= TOL

    # A gate the adapter merged into and mlp_gates.bin then replaces is ambiguous.
    a, b = torch.zeros(4, 64), torch.zeros(4, 4)
    _write_adapter(e2 / "gate_adapter", {"model.layers.0.mlp.gate": (a, b)}, r=4, alpha=8)
    with pytest.raises(ConversionError, match=r"adapter targets 1 key.*layers\.0\.mlp\.gate\.weight"):
        load_original_checkpoint(e2, base_dir=base, adapter_dir=e2 / "gate_adapter")


def test_split_8e_expert_files(uni_moe_fixtures, converted, tmp_path):
    """8e: the experts in per-expert ``{g}_mlp_experts.bin`` files (saved with the local index 0, as under
    ep_size=8); with an experts folder, its base files (shared by experts 2/6 and 5/7) win over them."""
    fixture = uni_moe_fixtures / "8e"
    full = load_file(fixture / "model.safetensors")
    src = tmp_path / "e2"
    src.mkdir()
    shutil.copy(fixture / "config.json", src / "config.json")
    expert = "mlp.deepspeed_moe.experts.deepspeed_experts."
    save_file({k: v for k, v in full.items() if expert not in k}, src / "model.safetensors")
    for g in range(8):
        own = {k.replace(f"{expert}{g}.", f"{expert}0."): v for k, v in full.items() if f"{expert}{g}." in k}
        torch.save(own, src / f"{g}_mlp_experts.bin")
    model = convert_uni_moe_original(src, encoders_dir=fixture / "encoders")
    reference = converted["8e"][0].state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in model.state_dict().items())

    experts_dir = tmp_path / "experts"
    experts_dir.mkdir()
    bases = {name: torch.full((32, 64), float(i)) for i, name in enumerate(sorted(set(EXPERT_BASE_FILES)))}
    for name, weight in bases.items():
        torch.save({"model.layers.1.mlp.gate_proj.weight": weight}, experts_dir / f"{name}.bin")
    state_dict = load_original_checkpoint(src, experts_dir=experts_dir, num_experts=8)
    for g in range(8):
        key = f"model.layers.1.{expert}{g}.gate_proj.weight"
        assert torch.equal(state_dict[key], bases[EXPERT_BASE_FILES[g]]), g  # the base file wins
        lora = f"model.layers.1.{expert}{g}.gate_proj_lora_A.weight"
        assert torch.equal(state_dict[lora], full[lora])  # the trained file's LoRA stays
    (experts_dir / "mlp_basev.bin").unlink()
    with pytest.raises(ConversionError, match="lacks mlp_basev.bin"):
        load_original_checkpoint(src, experts_dir=experts_dir, num_experts=8)


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_converts_and_reports_errors(uni_moe_fixtures, tmp_path, capsys):
    out = tmp_path / "v1"
    assert main(["convert", "uni-moe", str(uni_moe_fixtures / "v1"), str(out)]) == 0
    assert type(AutoModelForImageTextToText.from_pretrained(out)) is moe_zoo.UniMoeForConditionalGeneration
    src = tmp_path / "bad"
    src.mkdir()
    config = json.loads((uni_moe_fixtures / "v1" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    assert (
        main(
            [
                "convert",
                "uni-moe",
                str(src),
                str(tmp_path / "x"),
                "--encoders-dir",
                str(uni_moe_fixtures / "v1" / "encoders"),
            ]
        )
        == 1
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("moe-zoo convert: error:") and "mm_projector_type" in errors[0]
    assert not (tmp_path / "x").exists()
