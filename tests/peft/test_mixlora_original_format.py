"""Interoperability with the original ``mixlora`` package (0.2.3): an adapter it loads gives the same logits in our
PEFT model, ours exported in its format gives the same logits in its model, and bad files fail loudly. Every model
type the package supports and moe-zoo builds is covered (Llama, Qwen2, Mistral, Gemma, Phi, Phi-3), with LoRA,
rsLoRA and DoRA experts.

The package's own forward is run here (it patches ``mlp.forward`` on the instance and swaps attention Linears for its
``LoraLinear``; that works on transformers 5.x). Two quirks of the package the tests work around, not hide:
``act_fn`` must be in the config (its transformers path does not fall back to the FFN's activation), and its expert
``LoraLinear``s live in a plain dict, so ``model.eval()`` does not reach their dropout: we switch them to eval by hand.
DoRA: the package's format has no magnitude keys; it sets every magnitude to ``||W + s B A||`` when it loads.
"""

from __future__ import annotations

import json
import os

import mixlora
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft_test_models import (
    ARCHS,
    ATTENTION,
    FFN,
    attention_targets,
    batch,
    ffn_targets,
    randomize_dora_magnitudes,
    randomize_lora_b,
    tiny_causal_lm,
)

import moe_zoo  # noqa: F401  (registers MIXLORA)
from moe_zoo.peft import MixLoraConfig
from moe_zoo.peft.mixlora.original_format import (
    dora_magnitudes,
    export_mixlora_adapter,
    is_original_mixlora_adapter,
    load_mixlora_adapter,
)

NUM_EXPERTS, TOP_K, R = 4, 2, 4
HIDDEN = 32
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
"""Config keys of each expert flavour, as the package's ``export()`` writes them."""


def original_config(arch: str = "llama", **changes) -> dict:
    """A config as ``mixlora.MixLoraConfig.export()`` writes it (round-tripped through the package itself)."""
    raw = dict(
        bias="none",
        peft_type="MIXLORA",
        task_type="CAUSAL_LM",
        base_model_name_or_path=f"tiny-{arch}",
        r=R,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=attention_targets(arch) + ffn_targets(arch),
        routing_strategy="mixlora",
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        act_fn=tiny_causal_lm(arch).config.hidden_act,
        **changes,
    )
    return mixlora.MixLoraConfig.from_config(raw).export()


def original_weights(arch: str = "llama", seed: int = 0, expert_r: int = R) -> dict[str, torch.Tensor]:
    """Random non-zero weights under the package's key names for every target of :func:`original_config` (B
    included, so every LoRA changes the output), shaped from ``arch``'s own Linears."""
    generator = torch.Generator().manual_seed(seed)
    model = tiny_causal_lm(arch)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.3

    weights = {}
    for i, layer in enumerate(model.model.layers):
        for proj in attention_targets(arch):
            out, inp = getattr(layer.self_attn, proj).weight.shape
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = rand(R, inp)
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = rand(out, R)
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = rand(NUM_EXPERTS, HIDDEN) * 3
        for proj in ffn_targets(arch):
            out, inp = getattr(layer.mlp, proj).weight.shape
            for j in range(NUM_EXPERTS):
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_A.weight"] = rand(expert_r, inp)
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_B.weight"] = rand(out, expert_r)
    return weights


def save_original(path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write the two files the package reads (``load_adapter_weights``): config JSON and ``torch.save`` weights."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf8") as handle:
        json.dump(config, handle)
    torch.save(weights, os.path.join(path, "adapter_model.bin"))


def package_model(path, arch: str = "llama") -> torch.nn.Module:
    """The base model with the adapter at ``path`` injected by the package itself, in eval mode."""
    config, weights = mixlora.load_adapter_weights(str(path), device="cpu", dtype=torch.float32)
    model = tiny_causal_lm(arch)
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:  # the package's expert LoraLinears are not submodules: eval() misses them
        for expert in layer.mlp.mixlora_moes["default"].experts_.values():
            expert.eval()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(length=12)).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_saved_by_the_package_gives_the_same_logits_in_ours(tmp_path, arch, variant):
    save_original(tmp_path, original_config(arch, **VARIANTS[variant]), original_weights(arch))
    assert is_original_mixlora_adapter(tmp_path)
    theirs = logits(package_model(tmp_path, arch))
    ours_model = load_mixlora_adapter(tiny_causal_lm(arch), tmp_path)
    ours = logits(ours_model)
    assert (theirs - logits(tiny_causal_lm(arch))).abs().max() > 1e-2, "the adapter should change the logits"
    assert (ours - theirs).abs().max() <= 1e-5
    assert not ours_model.training
    config = ours_model.peft_config["default"]
    assert (config.use_rslora, config.use_dora) == (variant == "rslora", variant == "dora")
    if variant == "dora":  # magnitudes = ||W + s B A|| of the loaded weights, per expert and on the attention LoRA
        found = list(dora_magnitudes(ours_model, "default"))
        assert len(found) == 2 * len(original_config(arch)["target_modules"])
        for name, magnitude, norms in found:
            assert torch.equal(magnitude, norms), name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exported_adapter_gives_the_same_logits_in_the_package(tmp_path, arch, variant):
    config = MixLoraConfig(
        r=R,
        lora_alpha=8,
        lora_dropout=0.05,
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        target_modules=attention_targets(arch) + ffn_targets(arch),
        **VARIANTS[variant],
    )
    ours = get_peft_model(tiny_causal_lm(arch), config).eval()
    randomize_lora_b(ours)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "moe_gate" in name:
                param.normal_(0.0, 1.0)
        for _, magnitude, norms in dora_magnitudes(ours, "default"):
            magnitude.copy_(norms)  # the only DoRA magnitudes the format can carry (see the refusal test)
    export_mixlora_adapter(ours, tmp_path / "exported")
    assert is_original_mixlora_adapter(tmp_path / "exported")
    saved = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert saved == mixlora.MixLoraConfig.from_config(saved).export(), "export() writes what the package writes"
    assert not any("magnitude" in key for key in torch.load(tmp_path / "exported" / "adapter_model.bin"))
    expected = logits(ours)
    assert (logits(package_model(tmp_path / "exported", arch)) - expected).abs().max() <= 1e-5
    again = load_mixlora_adapter(tiny_causal_lm(arch), tmp_path / "exported")
    assert (logits(again) - expected).abs().max() <= 1e-5


def _copy_magnitudes_into_the_package(ours: torch.nn.Module, theirs: torch.nn.Module) -> int:
    """Give every ``LoraLinear`` of the package the DoRA magnitude of the same expert / attention LoRA of ours."""
    copied = 0
    with torch.no_grad():
        for layer_ours, layer_theirs in zip(ours.base_model.model.model.layers, theirs.model.layers, strict=True):
            for proj in ATTENTION:
                getattr(layer_theirs.self_attn, proj).magnitude_vector_.copy_(
                    getattr(layer_ours.self_attn, proj).lora_magnitude_vector["default"].weight
                )
                copied += 1
            experts = layer_theirs.mlp.mixlora_moes["default"].experts_
            for proj in FFN:
                for j, magnitude in enumerate(getattr(layer_ours.mlp, f"lora_magnitude_{proj}")["default"]):
                    experts[f"experts.{j}.{proj}"].magnitude_vector_.copy_(magnitude)
                    copied += 1
    return copied


def test_dora_experts_have_the_packages_parameterisation(tmp_path):
    """One magnitude vector per expert and projection, ``m / ||W + s B A||`` rescaling ``W x + s B A x``: with the
    same magnitudes put into the package's ``LoraLinear``s (its files cannot carry them), it computes our logits.
    (Llama has no biases; on a biased projection the package would rescale the bias too, PEFT and we do not.)"""
    save_original(tmp_path, original_config(use_dora=True), original_weights())
    ours = load_mixlora_adapter(tiny_causal_lm(), tmp_path)
    before = logits(ours)
    randomize_dora_magnitudes(ours)
    expected = logits(ours)
    assert (expected - before).abs().max() > 1e-2, "the magnitudes should change the logits"
    theirs = package_model(tmp_path)
    assert _copy_magnitudes_into_the_package(ours, theirs) == 2 * (len(ATTENTION) + NUM_EXPERTS * len(FFN))
    assert (logits(theirs) - expected).abs().max() <= 1e-5


def test_export_refuses_dora_magnitudes_the_format_cannot_carry(tmp_path):
    save_original(tmp_path / "original", original_config(use_dora=True), original_weights())
    model = load_mixlora_adapter(tiny_causal_lm(), tmp_path / "original")
    export_mixlora_adapter(model, tmp_path / "as-loaded")  # magnitudes as the package would recompute them: fine
    randomize_dora_magnitudes(model)
    with pytest.raises(ValueError, match=r"DoRA magnitudes of .* differ from \|\|W \+ s B A\|\|.*save_pretrained"):
        export_mixlora_adapter(model, tmp_path / "trained")
    assert not (tmp_path / "trained").exists()


def test_dora_adapter_keeps_its_magnitudes_in_our_own_format(tmp_path):
    save_original(tmp_path / "original", original_config(use_dora=True), original_weights())
    model = load_mixlora_adapter(tiny_causal_lm(), tmp_path / "original")
    randomize_dora_magnitudes(model)
    model.save_pretrained(tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path / "ours").eval()
    assert torch.equal(logits(reloaded), logits(model))


def test_our_own_format_still_loads_with_peft_and_is_told_apart(tmp_path):
    save_original(tmp_path / "original", original_config(), original_weights())
    ours = load_mixlora_adapter(tiny_causal_lm(), tmp_path / "original")
    ours.save_pretrained(tmp_path / "ours")
    assert not is_original_mixlora_adapter(tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path / "ours").eval()
    assert torch.equal(logits(reloaded), logits(ours))
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        load_mixlora_adapter(tiny_causal_lm(), tmp_path / "ours")
    # The other way round, PEFT's own loader would leave the experts random; it refuses and names the right loader.
    with pytest.raises(ValueError, match="load_mixlora_adapter"):
        PeftModel.from_pretrained(tiny_causal_lm(), tmp_path / "original")


def test_unknown_key_raises_value_error_naming_it(tmp_path):
    weights = original_weights()
    weights["mixlora.layers.0.mlp.gate_proj.experts.9.lora_A.weight"] = torch.zeros(R, HIDDEN)
    save_original(tmp_path, original_config(), weights)
    with pytest.raises(ValueError, match=r"unknown keys \['mixlora\.layers\.0\.mlp\.gate_proj\.experts\.9\.lora_A"):
        load_mixlora_adapter(tiny_causal_lm(), tmp_path)


def test_missing_key_raises_value_error_naming_it(tmp_path):
    weights = original_weights()
    del weights["mixlora.layers.1.mlp.moe_gate.weight"]
    save_original(tmp_path, original_config(), weights)
    with pytest.raises(ValueError, match=r"missing keys \['mixlora\.layers\.1\.mlp\.moe_gate\.weight'\]"):
        load_mixlora_adapter(tiny_causal_lm(), tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"routing_strategy": "mixlora-top-any"}, "mixlora-top-any"),
        ({"expert_lora": {"use_dora": True}}, r"`expert_lora\.use_dora` differs from `use_dora`"),
        ({"ffn_dropout": 0.1}, "ffn_dropout"),
        ({"temperature": 0.5, "routing_strategy": "mixlora-dynamic"}, "temperature"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_unsupported_options_raise_value_error_naming_them(tmp_path, change, message):
    save_original(tmp_path, {**original_config(), **change}, original_weights())
    with pytest.raises(ValueError, match=message):
        load_mixlora_adapter(tiny_causal_lm(), tmp_path)


def test_expert_lora_overrides_are_placed_and_survive_export(tmp_path):
    """``expert_lora`` as the package writes it (it copies bias, task_type ... in too): the experts get its rank, the
    attention LoRA keeps the top-level one. (The package's own inject ignores ``expert_lora``, so only ours runs.)"""
    expert_r = 2
    expert_lora = {"bias": "none", "task_type": "CAUSAL_LM", "r": expert_r, "lora_alpha": 6, "lora_dropout": 0.1}
    config = {**original_config(), "expert_lora": expert_lora}
    weights = original_weights()
    for key in [k for k in weights if ".experts." in k]:
        weights[key] = weights[key][:expert_r] if key.endswith("lora_A.weight") else weights[key][:, :expert_r]
    save_original(tmp_path / "original", config, weights)
    model = load_mixlora_adapter(tiny_causal_lm(), tmp_path / "original")
    ffn = model.base_model.model.model.layers[1].mlp
    assert torch.equal(
        ffn.lora_B_down_proj["default"][3], weights["mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"]
    )
    assert ffn.expert_scaling["default"] == 6 / expert_r
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == R
    export_mixlora_adapter(model, tmp_path / "exported")
    again = load_mixlora_adapter(tiny_causal_lm(), tmp_path / "exported")
    assert torch.equal(logits(again), logits(model))


def test_shape_mismatch_raises_value_error_naming_the_key(tmp_path):
    weights = original_weights()
    weights["mixlora.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(R + 1, HIDDEN)
    save_original(tmp_path, original_config(), weights)
    with pytest.raises(
        ValueError, match=r"mixlora\.layers\.0\.self_attn\.q_proj\.lora_A\.weight gives shape \(5, 32\)"
    ):
        load_mixlora_adapter(tiny_causal_lm(), tmp_path)
