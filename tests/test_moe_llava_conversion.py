"""Converting original MoE-LLaVA checkpoints: the three fixture models made by the original code (DeepSpeed 0.9.5,
transformers 4.37) convert and reproduce its logits, router logits, aux loss and capacity-drop run; synthetic state
dicts land where they should; anything unplaceable or missing fails loudly; the CLI converts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, PhiConfig, Qwen2Config, StableLmConfig

import moe_zoo
from moe_zoo.cli import main
from moe_zoo.core.capacity import expert_capacity
from moe_zoo.core.losses import gshard_load_balancing_loss, router_aux_loss
from moe_zoo.core.recording import LayerRouting
from moe_zoo.modeling.moe_llava.convert_moe_llava_original import (
    ConversionError,
    build_config,
    convert_moe_llava_original,
    convert_state_dict,
    load_vision_config,
)

VARIANTS = ("stablelm", "phi", "qwen1_5")
# The attention the original ran (README of the fixtures): eager for StableLM and Phi, sdpa for Qwen1.5.
ATTENTION = {"stablelm": "eager", "phi": "eager", "qwen1_5": "sdpa"}
TOL = 1e-5
VOCAB, IMAGE_TOKENS, SENTINEL = 320, 16, -200


@pytest.fixture(scope="module")
def converted(moe_llava_fixtures, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {v: convert_moe_llava_original(moe_llava_fixtures / v, root / v) for v in VARIANTS}


def _load(fixtures, variant, name):
    return torch.load(fixtures / variant / name, weights_only=True)


def _model(path, variant, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=ATTENTION[variant], **kwargs).eval()


def _our_inputs(inputs, image_token_id):
    """The original's ids with each -200 sentinel expanded to 16 image tokens, padded on the right."""
    rows = []
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), strict=True):
        valid = [t for t, m in zip(ids, mask, strict=True) if m]
        rows.append([x for t in valid for x in ([image_token_id] * IMAGE_TOKENS if t == SENTINEL else [t])])
    length = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return input_ids, attention_mask


def _per_layer(router_logits, reference):
    return dict(zip(reference["moe_layers_idx"], router_logits, strict=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ids_and_pixels_reproduce_the_original(converted, moe_llava_fixtures, variant):
    model = _model(converted[variant], variant)
    inputs = _load(moe_llava_fixtures, variant, "inputs.pt")
    intermediates = _load(moe_llava_fixtures, variant, "intermediates.pt")
    reference = _load(moe_llava_fixtures, variant, "logits.pt")
    routing = _load(moe_llava_fixtures, variant, "router_logits.pt")
    input_ids, attention_mask = _our_inputs(inputs, model.config.image_token_id)
    valid = attention_mask.bool()
    assert valid.shape == (2, 27) and valid.sum(dim=1).tolist() == [27, 22]
    assert torch.equal(valid, intermediates["attention_mask"].bool())
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=inputs["images"],
            attention_mask=attention_mask,
            use_cache=False,
            output_router_logits=True,
        )
        features = model.model.get_image_features(pixel_values=inputs["images"]).pooler_output
    assert out.logits.shape == (2, 27, VOCAB + 1)
    assert (out.logits[..., :VOCAB] - reference)[valid].abs().max() <= TOL
    assert (torch.stack(list(features)) - intermediates["image_features"]).abs().max() <= TOL
    # Router logits agree on the real tokens (padded positions hold the pad token here, zeros in the original).
    for layer, logits in _per_layer(out.router_logits, routing).items():
        expected = routing["router_logits"][layer].view(2, 27, -1)
        assert (logits.view(2, 27, -1) - expected)[valid].abs().max() <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_embeddings_reproduce_the_original_routing_and_aux_loss(converted, moe_llava_fixtures, variant):
    """With the original's merged inputs (zero embeddings at padding, routed too) every router row and the loss
    match: DeepSpeed routes all B*L tokens."""
    model = _model(converted[variant], variant)
    intermediates = _load(moe_llava_fixtures, variant, "intermediates.pt")
    reference = _load(moe_llava_fixtures, variant, "logits.pt")
    routing = _load(moe_llava_fixtures, variant, "router_logits.pt")
    mask = intermediates["attention_mask"]
    with torch.no_grad():
        out = model(
            inputs_embeds=intermediates["inputs_embeds"],
            attention_mask=mask,
            use_cache=False,
            output_router_logits=True,
        )
    assert (out.logits[..., :VOCAB] - reference)[mask.bool()].abs().max() <= TOL
    l_aux = []
    for layer, logits in _per_layer(out.router_logits, routing).items():
        assert logits.shape == (54, 4)
        assert (logits - routing["router_logits"][layer]).abs().max() <= TOL
        l_aux.append(gshard_load_balancing_loss(logits))
        assert abs(l_aux[-1] - routing["l_aux"][layer]) <= TOL
    assert abs(0.01 * sum(l_aux) - intermediates["moe_loss"]) <= TOL
    # The model's loss path with the original's token set (every routed token, padding included) ...
    gates = [block.gate for block in model.moe_blocks()]
    records = [LayerRouting(logits, None, gate) for logits, gate in zip(out.router_logits, gates, strict=True)]
    assert abs(router_aux_loss(records, model.config) - intermediates["moe_loss"]) <= TOL
    # ... while the model's aux_loss leaves padding out, by design.
    assert abs(out.aux_loss - router_aux_loss(records, model.config, mask)) <= 1e-7


@pytest.mark.parametrize("variant", VARIANTS)
def test_capacity_drop_run_reproduces_the_original(converted, moe_llava_fixtures, variant):
    model = _model(converted[variant], variant, eval_capacity_factor=0.5)
    intermediates = _load(moe_llava_fixtures, variant, "intermediates.pt")
    reference = _load(moe_llava_fixtures, variant, "logits_capacity_drop.pt")
    routing = _load(moe_llava_fixtures, variant, "router_logits_capacity_drop.pt")
    assert expert_capacity(54, 4, 2, 0.5, 0) == 14 == routing["capacity"][0]
    mask = intermediates["attention_mask"]
    with torch.no_grad():
        out = model(
            inputs_embeds=intermediates["inputs_embeds"],
            attention_mask=mask,
            use_cache=False,
            output_router_logits=True,
        )
    assert (out.logits[..., :VOCAB] - reference)[mask.bool()].abs().max() <= TOL
    for layer, logits in _per_layer(out.router_logits, routing).items():
        assert (logits - routing["router_logits"][layer]).abs().max() <= TOL
    no_drop = _load(moe_llava_fixtures, variant, "logits.pt")
    assert (out.logits[..., :VOCAB] - no_drop)[mask.bool()].abs().max() > 1e-2  # the drop run is a different run


def test_converted_config_and_image_token_rows(converted, moe_llava_fixtures):
    text_types = {"stablelm": StableLmConfig, "phi": PhiConfig, "qwen1_5": Qwen2Config}
    for variant, path in converted.items():
        config = moe_zoo.MoeLlavaConfig.from_pretrained(path)
        assert type(config.text_config) is text_types[variant]
        assert (config.num_experts, config.num_experts_per_tok, config.moe_layer_indices) == (4, 2, [0, 2])
        assert (config.capacity_factor, config.eval_capacity_factor, config.min_capacity) == (1.5, 2.0, 0)
        assert (config.router_type, config.norm_topk_prob, config.aux_loss_type) == (
            "softmax_topk",
            True,
            "gshard_top1_sum",
        )
        assert config.router_aux_loss_coef == 0.01 and not config.router_second_expert_gumbel
        assert (config.image_token_id, config.text_config.vocab_size, config.image_seq_length) == (VOCAB, VOCAB + 1, 16)
        assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
        assert config.projector_hidden_act == "gelu"
        assert json.loads((path / "generation_config.json").read_text())["suppress_tokens"] == [VOCAB]
        converted_sd = load_file(path / "model.safetensors")
        original_sd = load_file(moe_llava_fixtures / variant / "model.safetensors")
        for ours, theirs in (
            ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ):
            assert torch.equal(converted_sd[ours][:VOCAB], original_sd[theirs])
            assert torch.allclose(converted_sd[ours][VOCAB], original_sd[theirs].mean(dim=0))
    rope = {v: moe_zoo.MoeLlavaConfig.from_pretrained(p).text_config.rope_parameters for v, p in converted.items()}
    assert rope["stablelm"]["partial_rotary_factor"] == 0.25 and rope["phi"]["partial_rotary_factor"] == 0.4
    assert rope["qwen1_5"]["rope_theta"] == 1e6
    stablelm = moe_zoo.MoeLlavaConfig.from_pretrained(converted["stablelm"]).text_config
    assert stablelm.use_qkv_bias and stablelm.layer_norm_eps == 1e-5
    assert moe_zoo.MoeLlavaConfig.from_pretrained(converted["qwen1_5"]).text_config.rms_norm_eps == 1e-6
    # MoE-LLaVA's Phi head has no bias; transformers' has one, which is zero.
    assert not load_file(converted["phi"] / "model.safetensors")["lm_head.bias"].any()


def test_moe_options_map_to_deepspeed_semantics(moe_llava_fixtures):
    original = json.loads((moe_llava_fixtures / "stablelm" / "config.json").read_text())
    vision = load_vision_config(moe_llava_fixtures / "stablelm" / "vision_tower_config.json")

    def config(**moe):
        return build_config({**original, "moe": {**original["moe"], **moe}}, vision, VOCAB + 1, VOCAB)

    top1 = config(top_k_experts=1)  # DeepSpeed's top-1 gate weights a token by its softmax probability
    assert (top1.num_experts_per_tok, top1.norm_topk_prob) == (1, False)
    assert config(moe_layers_idx=None, moe_mode="second_half").moe_layer_indices == [2, 3]
    assert config(moe_layers_idx=[1, 3]).moe_layer_indices == [1, 3]
    assert config(moe_enable=False).moe_layer_indices == []  # a dense stage-II checkpoint
    dynmoe = config(top_k_experts=-1)
    assert (dynmoe.router_type, dynmoe.num_experts_per_tok) == ("top_any", -1)
    with pytest.raises(ConversionError, match="top_k_experts=3"):
        config(top_k_experts=3)
    with pytest.raises(ConversionError, match="use_residual"):
        config(use_residual=True)
    cls_patch = build_config({**original, "mm_vision_select_feature": "cls_patch"}, vision, VOCAB + 1, VOCAB)
    assert (cls_patch.vision_feature_select_strategy, cls_patch.image_seq_length) == ("full", 17)


def test_an_unused_in_vocab_image_token_adds_no_row(moe_llava_fixtures, tmp_path):
    path = convert_moe_llava_original(moe_llava_fixtures / "phi", tmp_path / "phi", image_token_id=300)
    model = _model(path, "phi")
    assert (model.config.image_token_id, model.config.text_config.vocab_size) == (300, VOCAB)
    intermediates = _load(moe_llava_fixtures, "phi", "intermediates.pt")
    with torch.no_grad():
        out = model(inputs_embeds=intermediates["inputs_embeds"], attention_mask=intermediates["attention_mask"])
    valid = intermediates["attention_mask"].bool()
    assert (out.logits - _load(moe_llava_fixtures, "phi", "logits.pt"))[valid].abs().max() <= TOL
    with pytest.raises(ConversionError, match="pad, bos or eos"):
        convert_moe_llava_original(moe_llava_fixtures / "phi", tmp_path / "bad", image_token_id=2)


# --- synthetic state dicts ---------------------------------------------------------------------------------------

H, FFN, LAYERS, MOE_LAYERS, E = 8, 6, 3, [0, 2], 3


def _synthetic(variant):
    generator = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=generator)

    sd = {"model.embed_tokens.weight": t(20, H), "lm_head.weight": t(20, H)}
    sd["model.final_layernorm.weight" if variant == "phi" else "model.norm.weight"] = t(H)
    sd["model.mm_projector.image_spatial_proj.0.weight"] = t(H, 4)
    sd["model.mm_projector.image_spatial_proj.0.bias"] = t(H)
    sd["model.mm_projector.image_spatial_proj.2.weight"] = t(H, H)
    sd["model.mm_projector.image_spatial_proj.2.bias"] = t(H)
    sd["model.image_tower.image_tower.vision_model.post_layernorm.weight"] = t(4)
    ffn = (
        {"fc1.weight": (FFN, H), "fc1.bias": (FFN,), "fc2.weight": (H, FFN), "fc2.bias": (H,)}
        if variant == "phi"
        else {"gate_proj.weight": (FFN, H), "up_proj.weight": (FFN, H), "down_proj.weight": (H, FFN)}
    )
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        sd[prefix + "self_attn.q_proj.weight"] = t(H, H)
        sd[prefix + "input_layernorm.weight"] = t(H)
        if layer in MOE_LAYERS:
            sd[prefix + "mlp.deepspeed_moe.gate.wg.weight"] = t(E, H)
            for e in range(E):
                for name, shape in ffn.items():
                    sd[f"{prefix}mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = t(*shape)
        else:
            for name, shape in ffn.items():
                sd[f"{prefix}mlp.{name}"] = t(*shape)
    return sd


@pytest.mark.parametrize("variant", VARIANTS)
def test_synthetic_state_dict_lands_where_expected(variant):
    sd = _synthetic(variant)
    out = convert_state_dict(sd, f"moe_llava_{variant}", LAYERS, MOE_LAYERS, num_experts=E)
    norm = "final_layernorm" if variant == "phi" else "norm"
    assert torch.equal(out[f"model.language_model.{norm}.weight"], sd[f"model.{norm}.weight"])
    assert out["model.language_model.embed_tokens.weight"] is sd["model.embed_tokens.weight"]
    assert out["lm_head.weight"] is sd["lm_head.weight"]
    for n, i in (("1", "0"), ("2", "2")):
        for p in ("weight", "bias"):
            mm = sd[f"model.mm_projector.image_spatial_proj.{i}.{p}"]
            assert out[f"model.multi_modal_projector.linear_{n}.{p}"] is mm
    assert (
        out["model.vision_tower.post_layernorm.weight"]
        is (sd["model.image_tower.image_tower.vision_model.post_layernorm.weight"])
    )
    for layer in range(LAYERS):
        ours, theirs = f"model.language_model.layers.{layer}.", f"model.layers.{layer}."
        assert out[ours + "self_attn.q_proj.weight"] is sd[theirs + "self_attn.q_proj.weight"]
        assert out[ours + "input_layernorm.weight"] is sd[theirs + "input_layernorm.weight"]
        if layer not in MOE_LAYERS:
            dense = [k for k in sd if k.startswith(theirs + "mlp.")]
            assert all(out[ours + k.removeprefix(theirs)] is sd[k] for k in dense)
            continue
        assert torch.equal(out[ours + "mlp.gate.weight"], sd[theirs + "mlp.deepspeed_moe.gate.wg.weight"])
        expert = theirs + "mlp.deepspeed_moe.experts.deepspeed_experts.{}.{}"
        for e in range(E):
            if variant == "phi":
                pairs = {
                    "up_proj": "fc1.weight",
                    "up_proj_bias": "fc1.bias",
                    "down_proj": "fc2.weight",
                    "down_proj_bias": "fc2.bias",
                }
                for name, original in pairs.items():
                    assert torch.equal(out[ours + "mlp.experts." + name][e], sd[expert.format(e, original)])
            else:
                gate_up = torch.cat([sd[expert.format(e, "gate_proj.weight")], sd[expert.format(e, "up_proj.weight")]])
                assert torch.equal(out[ours + "mlp.experts.gate_up_proj"][e], gate_up)
                assert torch.equal(out[ours + "mlp.experts.down_proj"][e], sd[expert.format(e, "down_proj.weight")])
    # Every MoE layer's router and expert tensors became a router plus 4 (Phi) or 2 stacked tensors.
    moe_keys = [k for k in sd if ".deepspeed_moe." in k]
    assert len(out) == len(sd) - len(moe_keys) + len(MOE_LAYERS) * (1 + (4 if variant == "phi" else 2))
    assert not any("deepspeed" in k for k in out)


@pytest.mark.parametrize(
    "extra",
    [
        "model.some_new_module.weight",
        "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.w1.weight",
        "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight",  # expert 3 of 3
        "model.layers.1.mlp.coefficient.weight",
        "model.layers.3.input_layernorm.weight",  # a layer beyond num_layers
        "transformer.h.0.attn.c_attn.weight",
    ],
)
def test_an_unknown_key_is_refused_by_name(extra):
    sd = _synthetic("stablelm")
    sd[extra] = torch.zeros(1)
    with pytest.raises(ConversionError, match="cannot place 1 key") as error:
        convert_state_dict(sd, "stablelm", LAYERS, MOE_LAYERS, num_experts=E)
    assert extra in str(error.value)


@pytest.mark.parametrize("variant", ["phi", "qwen1_5"])
def test_a_missing_expert_or_router_is_refused_by_name(variant):
    sd = _synthetic(variant)
    part = "fc2.bias" if variant == "phi" else "up_proj.weight"
    missing = f"model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1.{part}"
    del sd[missing], sd["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"]
    with pytest.raises(ConversionError, match="lacks 2 key") as error:
        convert_state_dict(sd, variant, LAYERS, MOE_LAYERS, num_experts=E)
    assert missing in str(error.value) and "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in str(error.value)
    sd = _synthetic(variant)
    for key in [k for k in sd if ".deepspeed_experts.2." in k and k.startswith("model.layers.0.")]:
        del sd[key]  # a whole expert
    with pytest.raises(ConversionError, match=r"deepspeed_experts\.2\."):
        convert_state_dict(sd, variant, LAYERS, MOE_LAYERS, num_experts=E)


# --- whole folders -----------------------------------------------------------------------------------------------


def _copy_fixture(moe_llava_fixtures, tmp_path, variant="phi"):
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("config.json", "vision_tower_config.json", "model.safetensors"):
        shutil.copy(moe_llava_fixtures / variant / name, folder / name)
    return folder


def test_pytorch_model_bin_converts_like_safetensors(moe_llava_fixtures, converted, tmp_path):
    src = _copy_fixture(moe_llava_fixtures, tmp_path)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    vision = tmp_path / "clip.json"
    (src / "vision_tower_config.json").rename(vision)
    with pytest.raises(ConversionError, match="--vision-config"):
        convert_moe_llava_original(src, tmp_path / "out")
    out = convert_moe_llava_original(src, tmp_path / "out", vision_config=vision)
    ours, reference = load_file(out / "model.safetensors"), load_file(converted["phi"] / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_whole_folder_errors_are_loud_and_leave_no_output(moe_llava_fixtures, tmp_path):
    src = _copy_fixture(moe_llava_fixtures, tmp_path)
    sd = load_file(src / "model.safetensors")
    save_file({**sd, "model.image_newline": torch.zeros(64)}, src / "model.safetensors")
    with pytest.raises(ConversionError, match="model.image_newline"):
        convert_moe_llava_original(src, tmp_path / "out")
    del sd["model.image_tower.image_tower.vision_model.pre_layrnorm.weight"]
    save_file(sd, src / "model.safetensors")
    with pytest.raises(ConversionError, match=r"never filled from the checkpoint: 1 key.*pre_layrnorm\.weight"):
        convert_moe_llava_original(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config = json.loads((src / "config.json").read_text())
    for change, message in (
        ({"model_type": "moe_llava_qwen"}, "moe_llava_qwen.*Qwen-1.*not supported"),
        ({"moe": {**config["moe"], "num_experts": [4, 8]}}, "varies by layer"),
        ({"image_projector_type": "qformer"}, "projector type 'qformer'"),
    ):
        (src / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError, match=message):
            convert_moe_llava_original(src, tmp_path / "out")


def test_cli_converts_and_reports_errors(moe_llava_fixtures, tmp_path, capsys):
    out = tmp_path / "stablelm"
    assert main(["convert", "moe-llava", str(moe_llava_fixtures / "stablelm"), str(out)]) == 0
    assert type(AutoModelForImageTextToText.from_pretrained(out)) is moe_zoo.MoeLlavaForConditionalGeneration
    assert main(["convert", "moe-llava", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("moe-zoo convert: error:") and "missing" in errors[0]
    assert not (tmp_path / "x").exists()
