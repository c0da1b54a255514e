"""Model cards: every family's card has valid Hub metadata that survives a round trip through ``ModelCard``, its
parameter counts match an independent count from the model's own tensors, evaluation results become ``model-index``,
and ``write_model_card`` replaces generated cards while keeping the ones a user wrote. Also: the templates ship in
the package (the packages ``pyproject.toml`` lists are every package under ``moe_zoo/`` plus the templates)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard
from peft import get_peft_model
from setuptools.config.expand import find_packages
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config

import moe_zoo
from moe_zoo.modeling.uni_moe import UniMoeConfig, UniMoeForConditionalGeneration
from moe_zoo.peft import MixLoraConfig, SmoraConfig
from moe_zoo.publishing import (
    BASE_TAGS,
    FAMILIES,
    GENERATED_MARKER,
    build_model_card,
    count_parameters,
    is_generated_card,
    looks_like_hub_id,
    template_path,
    write_model_card,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
IMAGE_TOKEN = 90


def _dense_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TEXT, num_key_value_heads=2, tie_word_embeddings=tie)).eval()


def _moe_llava(**options) -> moe_zoo.MoeLlavaForConditionalGeneration:
    config = moe_zoo.MoeLlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=Qwen2Config(**TEXT, num_key_value_heads=2),
        moe_layers="none",
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
    )
    torch.manual_seed(0)
    dense = moe_zoo.MoeLlavaForConditionalGeneration(config)
    return moe_zoo.upcycle_moe_llava(dense, **{"num_experts": 4, "num_experts_per_tok": 2, **options}).eval()


def _uni_moe(media: tuple[str, ...] = ("vision", "speech", "audio")) -> UniMoeForConditionalGeneration:
    whisper = dict(
        model_type="whisper",
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=10,
        max_target_positions=8,
        vocab_size=60,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    encoders = {
        "vision": {"vision_config": dict(model_type="clip_vision_model", **{**VISION, "hidden_size": 16})},
        "speech": {"speech_config": whisper},
        "audio": {
            "audio_config": whisper,
            "audio_qformer_config": dict(
                model_type="blip_2_qformer",
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            ),
        },
    }
    config = UniMoeConfig(
        text_config=dict(model_type="llama", **TEXT, num_key_value_heads=2, pad_token_id=0),
        **{key: value for medium in media for key, value in encoders[medium].items()},
        image_token_id=TEXT["vocab_size"],
        video_token_id=TEXT["vocab_size"] + 1,
        speech_token_id=TEXT["vocab_size"] + 2,
        audio_token_id=TEXT["vocab_size"] + 3,
        speech_query_tokens=4,
        audio_query_tokens=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_layers="sparse",
    )
    torch.manual_seed(0)
    return UniMoeForConditionalGeneration(config).eval()


def _mixlora():
    config = MixLoraConfig(
        num_experts=4,
        top_k=2,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(_dense_llama(), config)


def _smora(base=None):
    base = base if base is not None else _dense_llama()
    return get_peft_model(base, SmoraConfig(r=8, activate_r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"]))


# Each family: (builder, family key, expected pipeline tag).
MODELS = {
    "upcycled_moe": (
        lambda: moe_zoo.upcycle(
            _dense_llama(), num_experts=4, num_experts_per_tok=2, moe_layers="sparse", num_shared_experts=1
        ),
        "text-generation",
    ),
    "moe_llava": (_moe_llava, "image-text-to-text"),
    "uni_moe": (_uni_moe, "any-to-any"),
    "metis_home": (lambda: moe_zoo.expand_to_metis_home(_dense_llama()), "text-generation"),
    "metis_home_over_moe_llava": (lambda: moe_zoo.expand_to_metis_home(_moe_llava()), "image-text-to-text"),
    "mixlora": (_mixlora, "text-generation"),
    "smora": (_smora, "text-generation"),
    "smora_on_upcycled_moe": (
        lambda: _smora(moe_zoo.upcycle(_dense_llama(), num_experts=4, num_experts_per_tok=1)),
        "text-generation",
    ),
}
FAMILY_OF = {"metis_home_over_moe_llava": "metis_home", "smora_on_upcycled_moe": "smora"}


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: builder() for name, (builder, _) in MODELS.items()}


def _numel(named) -> int:
    return sum(p.numel() for _, p in named)


def expected_active(name: str, model) -> int:
    """The active count of the definition, by explicit arithmetic on the model's named tensors: each routed expert
    tensor's leading dimension is its experts (or ranks), and a token uses ``k`` of them; Metis-HOME runs one
    branch (``thinking`` here) of the two."""
    params = list(model.named_parameters())  # tied weights appear once
    if name in ("upcycled_moe", "moe_llava", "uni_moe"):
        experts = [(n, p) for n, p in params if ".mlp.experts." in n]
        k = model.config.num_experts_per_tok
        return _numel(params) - _numel(experts) + sum(p.numel() * k // p.shape[0] for _, p in experts)
    if name == "metis_home":
        other_branch = [(n, p) for n, p in params if ".mlp.branches.non_thinking." in n]
        return _numel(params) - _numel(other_branch)
    if name == "metis_home_over_moe_llava":
        kept = [(n, p) for n, p in params if ".mlp.branches.non_thinking." not in n]
        experts = [(n, p) for n, p in kept if ".mlp.branches.thinking.experts." in n]
        k = model.config.base_config.num_experts_per_tok
        return _numel(kept) - _numel(experts) + sum(p.numel() * k // p.shape[0] for _, p in experts)
    if name == "mixlora":
        experts = [(n, p) for n, p in params if re.search(r"\.mlp\.lora_[AB]_\w+\.default$", n)]
        assert len(experts) == 2 * 3 * TEXT["num_hidden_layers"]  # A and B of three projections per layer
        k = 2
        return _numel(params) - _numel(experts) + sum(p.numel() * k // p.shape[0] for _, p in experts)
    if name in ("smora", "smora_on_upcycled_moe"):
        ranks = [(n, p) for n, p in params if re.search(r"\.lora_[AB]\.default\.weight$", n)]
        # A is (r, in), B is (out, r): a token uses activate_r = 2 of the r = 8 ranks of both.
        share = sum(p.numel() * 2 // p.shape[0 if ".lora_A." in n else 1] for n, p in ranks)
        experts = [(n, p) for n, p in params if ".mlp.experts." in n]  # an MoE under the adapter: top-1 of 4
        experts_share = sum(p.numel() // p.shape[0] for _, p in experts)
        return _numel(params) - _numel(ranks) + share - _numel(experts) + experts_share
    raise KeyError(name)


@pytest.mark.parametrize("name", list(MODELS))
def test_counts_match_an_independent_count_of_the_tensors(models, name):
    model = models[name]
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.active == expected_active(name, model)
    assert 0 < counts.active < counts.total
    assert not counts.variable_routing


def test_counts_of_the_layer_structure(models):
    upcycled = count_parameters(models["upcycled_moe"])
    assert (upcycled.num_experts, upcycled.top_k, upcycled.moe_layers) == (4, 2, 2)
    ffn = 3 * TEXT["hidden_size"] * TEXT["intermediate_size"]
    assert upcycled.expert == 2 * 4 * ffn and upcycled.shared_expert == 2 * ffn  # the shared expert is the FFN's size
    metis = count_parameters(models["metis_home_over_moe_llava"])
    assert (metis.num_experts, metis.top_k, metis.moe_layers) == (2, 1, TEXT["num_hidden_layers"])
    smora = count_parameters(models["smora"])
    assert (smora.num_experts, smora.top_k, smora.moe_layers) == (8, 2, 2 * TEXT["num_hidden_layers"])
    on_moe = count_parameters(models["smora_on_upcycled_moe"])  # the adapter's rank experts, not the MoE's
    assert (on_moe.num_experts, on_moe.top_k, on_moe.moe_layers) == (8, 2, 2 * TEXT["num_hidden_layers"])
    assert (
        on_moe.expert
        == smora.expert + 4 * TEXT["num_hidden_layers"] * 3 * TEXT["hidden_size"] * TEXT["intermediate_size"]
    )
    assert smora.adapter == _numel((n, p) for n, p in models["smora"].named_parameters() if ".lora_" in n)
    dense = count_parameters(_dense_llama())
    assert dense.active == dense.total and dense.num_experts == dense.moe_layers == 0


def test_variable_routing_counts_the_most_a_token_can_use_unless_measured():
    model = _moe_llava(num_experts_per_tok=-1)  # DynMoE: top-any over half of the 4 expert slots at first
    params = list(model.named_parameters())
    experts = [(n, p) for n, p in params if ".mlp.experts." in n]
    base = _numel(params) - _numel(experts)
    counts = count_parameters(model)
    assert counts.variable_routing and counts.top_k == 2  # the two slots switched on
    assert counts.active == base + _numel(experts) // 2
    measured = count_parameters(model, experts_per_token=1.5)
    assert measured.active == round(base + _numel(experts) * 1.5 / 4)
    with pytest.raises(ValueError, match="experts_per_token"):
        count_parameters(model, experts_per_token=5)
    card = build_model_card(model)
    assert "@inproceedings{guo2025dynmoe" in card.text  # DynMoE is cited for its top-any router


@pytest.mark.parametrize("name", list(MODELS))
def test_card_metadata_round_trips_and_names_the_family(models, name):
    model, pipeline = models[name], MODELS[name][1]
    family = FAMILIES[FAMILY_OF.get(name, name)]
    card = build_model_card(model, datasets=["org/instructions"], license="apache-2.0", language="en", tags=["mine"])
    data = card.data.to_dict()
    assert ModelCard(str(card)).data.to_dict() == data
    assert data["library_name"] == family.library_name
    assert data["pipeline_tag"] == pipeline
    assert data["tags"] == [*BASE_TAGS, family.tag, *family.extra_tags, "mine"]
    assert (data["datasets"], data["license"], data["language"]) == (["org/instructions"], "apache-2.0", ["en"])
    assert "base_model" not in data  # built from configs: no Hub id to name
    assert is_generated_card(str(card)) and str(card).count(GENERATED_MARKER) == 1
    counts = count_parameters(model)
    assert f"{counts.total:,}" in card.text and f"{counts.active:,}" in card.text  # the architecture table
    assert "No training stages were recorded" in card.text
    assert "```bibtex" in card.text and "{{" not in card.text and "{%" not in card.text


def test_citations_and_loading_per_family(models):
    def text(name, **kwargs):
        return build_model_card(models[name], **kwargs).text

    assert "@inproceedings{komatsuzaki2023sparse" in text("upcycled_moe")
    moe_llava = text("moe_llava", model_name="me/moe-llava")
    assert "@article{lin2024moellava" in moe_llava and "2401.15947" in moe_llava
    assert 'AutoModelForImageTextToText.from_pretrained("me/moe-llava", trust_remote_code=True)' in moe_llava
    assert "@article{li2025unimoe" in text("uni_moe") and "AutoModelForMultimodalLM" in text("uni_moe")
    nested = text("metis_home_over_moe_llava")
    assert "@article{lan2025metishome" in nested and "@article{lin2024moellava" in nested
    assert "@article{li2024mixlora" in text("mixlora") and "PeftModel.from_pretrained" in text("mixlora")
    assert "@article{zhao2025smora" in text("smora") and "2501.15103" in text("smora")
    assert "@inproceedings{komatsuzaki2023sparse" in text("smora_on_upcycled_moe")  # the base is an upcycled MoE


def test_base_model_comes_from_a_hub_name_or_path_never_a_local_folder(tmp_path):
    dense = _dense_llama()
    dense.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    moe = moe_zoo.upcycle(dense, num_experts=2, num_experts_per_tok=1)
    card = build_model_card(moe)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct" in card.text
    moe.config.text_config._name_or_path = str(tmp_path / "local" / "smollm2")
    assert build_model_card(moe).data.base_model is None
    assert build_model_card(moe, base_model="org/base").data.base_model == "org/base"
    assert looks_like_hub_id("org/name") and not looks_like_hub_id("gpt2") and not looks_like_hub_id("runs/a/b")
    (tmp_path / "runs").mkdir()
    assert not looks_like_hub_id(str(tmp_path / "runs"))


def test_eval_results_become_model_index_and_stages_are_listed(models):
    results = [
        {
            "task_type": "text-generation",
            "dataset_type": "openai/gsm8k",
            "dataset_name": "GSM8K",
            "dataset_split": "test",
            "metric_type": "accuracy",
            "metric_value": 0.5,
        },
        EvalResult(
            task_type="text-generation",
            dataset_type="cais/mmlu",
            dataset_name="MMLU",
            metric_type="accuracy",
            metric_value=0.25,
        ),
    ]
    stages = ["upcycling", ("fine-tuning", "200 steps on chats"), {"name": "router warm-up"}]
    card = build_model_card(models["upcycled_moe"], eval_results=results, training_stages=stages, model_name="me/tiny")
    index = card.data.to_dict()["model-index"]
    assert index[0]["name"] == "me/tiny"
    assert [r["metrics"][0]["value"] for r in index[0]["results"]] == [0.5, 0.25]
    assert ModelCard(str(card)).data.eval_results[0].dataset_split == "test"
    assert "| text-generation | GSM8K (test) | accuracy | 0.5 |" in card.text
    assert re.search(
        r"1\. \*\*upcycling\*\*\n2\. \*\*fine-tuning\*\*: 200 steps on chats\n3\. \*\*router warm-up\*\*", card.text
    )
    with pytest.raises(ValueError, match="metric_value"):
        build_model_card(
            models["upcycled_moe"], eval_results=[{"task_type": "x", "dataset_type": "y", "dataset_name": "z"}]
        )


def test_write_model_card_keeps_user_cards_and_replaces_generated_ones(models, tmp_path):
    model = models["upcycled_moe"]
    readme = write_model_card(tmp_path / "new", model, tags=["first"])
    assert readme == tmp_path / "new" / "README.md" and "first" in ModelCard.load(readme).data.tags
    write_model_card(tmp_path / "new", model, tags=["second"])  # a generated card: replaced
    assert ModelCard.load(readme).data.tags[-1] == "second"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["README.md"]  # no temporary file left

    edited = readme.read_text(encoding="utf-8").replace(GENERATED_MARKER + "\n", "") + "\nMy own notes.\n"
    readme.write_text(edited, encoding="utf-8")  # the user deleted the marker: the card is theirs now
    assert write_model_card(tmp_path / "new", model, tags=["third"]) == readme
    assert readme.read_text(encoding="utf-8") == edited

    own = tmp_path / "own"
    own.mkdir()
    (own / "README.md").write_text("# Hand-written\n", encoding="utf-8")
    assert write_model_card(own, model).read_text(encoding="utf-8") == "# Hand-written\n"


def test_write_model_card_replaces_the_blank_card_peft_saves(models, tmp_path):
    adapter = models["smora"]
    adapter.save_pretrained(tmp_path)
    assert not is_generated_card((tmp_path / "README.md").read_text(encoding="utf-8"))  # PEFT's default card
    card = ModelCard.load(write_model_card(tmp_path, adapter))
    assert is_generated_card(str(card)) and card.data.library_name == "peft" and "smora" in card.data.tags


def test_templates_ship_in_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    settings = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = find_packages(include=["moe_zoo*"], root_dir=str(REPO_ROOT))
    assert sorted(settings["packages"]) == sorted({*found, "moe_zoo.model_cards"})  # no package left out
    assert settings["package-dir"]["moe_zoo.model_cards"] == "model_cards"
    for family in FAMILIES.values():
        with template_path(family) as path:
            assert path.read_text(encoding="utf-8") == (REPO_ROOT / "model_cards" / family.template).read_text(
                encoding="utf-8"
            )
            assert "{{ generated_marker }}" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(("media", "pipeline"), [(("vision",), "image-text-to-text"), ((), "text-generation")])
def test_uni_moe_pipeline_tag_follows_its_encoders(media, pipeline):
    assert build_model_card(_uni_moe(media)).data.pipeline_tag == pipeline


def test_unsupported_models_are_refused_clearly():
    with pytest.raises(ValueError, match="No model-card template for model type 'llama'"):
        build_model_card(_dense_llama())
