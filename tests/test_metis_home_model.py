"""Metis-HOME as a transformers model: expansion preserves the dense function on Qwen2.5-VL, Llava, MoE-LLaVA and a
text decoder; the branch is chosen once per query and holds for every generated token; forced branches are honoured;
save / from_pretrained keeps logits and decisions; bad branches and think tags are refused clearly."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
)

import moe_zoo
from moe_zoo.core.recording import collect_routing
from moe_zoo.modeling.metis_home import MalformedThinkTagsError, MetisHomeConfig, format_response, validate_response
from moe_zoo.modeling.metis_home.branches import BranchedFFN

TEXT = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
IMAGE = 190


def _text_dense():
    return LlamaForCausalLM(LlamaConfig(**TEXT, num_key_value_heads=2, tie_word_embeddings=True))


def _qwen_vl_dense():
    config = Qwen2_5_VLConfig(
        text_config=dict(**TEXT, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, fullatt_block_indexes=[1]
        ),
        image_token_id=IMAGE,
        video_token_id=191,
        vision_start_token_id=192,
        vision_end_token_id=193,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)


def _llava_dense():
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**TEXT, num_key_value_heads=2),
        image_token_id=IMAGE,
        image_seq_length=16,
    )
    return LlavaForConditionalGeneration(config)


def _moe_llava_dense():
    config = moe_zoo.MoeLlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=Qwen2Config(**TEXT, num_key_value_heads=2),
        moe_layers="none",
        image_token_id=IMAGE,
        image_seq_length=16,
    )
    dense = moe_zoo.MoeLlavaForConditionalGeneration(config)
    moe = moe_zoo.upcycle_moe_llava(dense, num_experts=4, num_experts_per_tok=2)
    with torch.no_grad():
        for block in moe.moe_blocks():
            for p in block.experts.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return moe


def _inputs(base: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, 180, (batch, 6), generator=generator)
    if base == "text":
        return {"input_ids": text}
    if base == "qwen2_5_vl":
        image = torch.tensor([192] + [IMAGE] * 4 + [193]).expand(batch, 6)
        return {
            "input_ids": torch.cat([text[:, :2], image, text[:, 2:]], dim=1),
            "pixel_values": torch.randn(batch * 16, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * batch),
        }
    ids = torch.cat([text[:, :2], torch.full((batch, 16), IMAGE), text[:, 2:]], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


BASES = {"text": _text_dense, "qwen2_5_vl": _qwen_vl_dense, "llava": _llava_dense, "moe_llava": _moe_llava_dense}


def _pair(base: str, **options):
    torch.manual_seed(0)
    dense = BASES[base]().eval()
    return dense, moe_zoo.expand_to_metis_home(dense, **options).eval()


def _diverge(metis, scale: float = 0.3) -> None:
    """Make the branches differ, so that a wrong branch shows in the logits."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ffn in metis.branch_ffns():
            for p in ffn.branches["non_thinking"].parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())


@pytest.mark.parametrize("base", list(BASES))
def test_expansion_preserves_the_dense_function_on_every_branch(base):
    dense, metis = _pair(base)
    inputs = _inputs(base)
    with torch.no_grad():
        reference = dense(**inputs).logits
        for branch in (None, "thinking", "non_thinking"):
            out = metis(**inputs, branch=branch)
            assert torch.allclose(out.logits, reference, atol=1e-5), (base, branch)
    assert all(
        isinstance(ffn, BranchedFFN) and list(ffn.branches) == ["non_thinking", "thinking"]
        for ffn in metis.branch_ffns()
    )
    assert len(metis.branch_ffns()) == TEXT["num_hidden_layers"]
    # the dense model is untouched, and no tensor was left at a random init: every branch equals the dense FFN
    layer = metis.branch_ffns()[1]
    first = dict(layer.branches["thinking"].named_parameters())
    for name, p in layer.branches["non_thinking"].named_parameters():
        assert torch.equal(p, first[name])


def _row(inputs: dict, i: int) -> dict:
    """Row ``i`` of a batch of :func:`_inputs` (Qwen2.5-VL's pixel_values hold 16 patches per image, unbatched)."""
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    if "image_grid_thw" in inputs:
        row["pixel_values"] = inputs["pixel_values"][16 * i : 16 * (i + 1)]
    return row


@pytest.mark.parametrize("base", list(BASES))
def test_a_mixed_batch_runs_each_row_on_its_branch(base):
    _, metis = _pair(base)
    _diverge(metis)
    inputs = _inputs(base, batch=3)
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad(), collect_routing() as routing:
        mixed = metis(**inputs, branch=rows, output_router_logits=True)
    for i, branch in enumerate(rows.tolist()):
        alone = _row(inputs, i)
        with torch.no_grad():
            expected = metis(**alone, branch=branch).logits
        assert torch.allclose(mixed.logits[i : i + 1], expected, atol=1e-5)
    if base == "moe_llava":
        with torch.no_grad(), collect_routing() as routed:  # the router's partial pass reports no routing
            metis(**inputs, output_router_logits=True)
        assert len(routed) == len(routing)
    if base == "moe_llava":  # the two branches' routing is merged back into one record per layer, in token order
        tokens = inputs["input_ids"].numel()
        moe_layers = len(metis.model.moe_blocks()) // 2  # each MoE layer has one block per branch
        assert moe_layers > 0 and len(routing) == moe_layers and all(r.logits.shape[0] == tokens for r in routing)
        assert mixed.aux_loss is not None and torch.isfinite(mixed.aux_loss)


def _greedy(metis, inputs: dict, branch: str, steps: int) -> torch.Tensor:
    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    for _ in range(steps):
        with torch.no_grad():
            logits = metis(input_ids=ids, branch=branch, use_cache=False, **extra).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("base", ["text", "qwen2_5_vl"])
def test_generate_picks_the_branch_once_and_keeps_it_for_every_token(base):
    _, metis = _pair(base)
    _diverge(metis)
    inputs = _inputs(base, batch=1)
    seen = []
    hook = metis.branch_ffns()[0].register_forward_pre_hook(lambda m, a: seen.append(m.selection.rows.tolist()))
    decision = metis.route(**inputs)
    generated = metis.generate(**inputs, max_new_tokens=5, do_sample=False)
    hook.remove()
    chosen = decision.names[0]
    # one prefix pass for the router (on the router-prefix branch), then every step on the chosen branch
    assert seen[0] == [metis.config.branch_index("thinking")]
    assert seen[1:] and all(rows == decision.indices.tolist() for rows in seen[2:])
    if base == "text":  # cached generation equals uncached greedy decoding on the chosen branch
        assert torch.equal(generated, _greedy(metis, inputs, chosen, 5))


def test_a_forced_branch_is_honoured_by_forward_and_generate():
    _, metis = _pair("text")
    _diverge(metis, scale=8.0)
    inputs = _inputs("text", batch=2)
    outputs = {b: metis.generate(**inputs, branch=b, max_new_tokens=6, do_sample=False) for b in metis.branch_names}
    for branch, generated in outputs.items():
        assert torch.equal(generated, _greedy(metis, inputs, branch, 6))
    assert not torch.equal(outputs["thinking"], outputs["non_thinking"])
    per_row = metis.generate(**inputs, branch=["thinking", "non_thinking"], max_new_tokens=6, do_sample=False)
    assert torch.equal(per_row[0], outputs["thinking"][0]) and torch.equal(per_row[1], outputs["non_thinking"][1])
    with torch.no_grad():
        assert metis(**inputs, branch="non_thinking").branch.tolist() == [0, 0]


@pytest.mark.parametrize("base", ["text", "qwen2_5_vl", "moe_llava"])
def test_save_and_from_pretrained_keep_logits_and_branch_decisions(base, tmp_path):
    _, metis = _pair(base)
    _diverge(metis)
    with torch.no_grad():
        for p in metis.router.parameters():
            p.add_(torch.randn_like(p))
    inputs = _inputs(base, batch=3)
    metis.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if base == "text" else AutoModelForImageTextToText
    loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert isinstance(loaded, moe_zoo.MetisHomeForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.router.fc1.weight.dtype == torch.float32
    with torch.no_grad():
        before, after = metis(**inputs), loaded(**inputs)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.branch, after.branch) and torch.equal(before.branch_logits, after.branch_logits)


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava"])
def test_a_vision_language_base_trains_with_branch_labels(base):
    _, metis = _pair(base)
    metis.train()
    inputs = _inputs(base, batch=2)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    out = metis(**inputs, labels=labels, branch_labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss) and out.branch.tolist() == [0, 1]
    out.loss.backward()
    ffn = metis.branch_ffns()[0]
    for name in ("thinking", "non_thinking"):  # one row each: both branches learn
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ffn.branches[name].parameters())
    assert metis.router.fc2.weight.grad.abs().sum() > 0


def test_training_loss_is_lm_plus_router_loss_and_trains_only_the_labelled_branch():
    _, metis = _pair("text", router_loss_coef=0.5)
    metis.train()
    ids = _inputs("text", batch=2)["input_ids"]
    labels = ids.clone()
    labels[:, :3] = -100
    out = metis(input_ids=ids, labels=labels, branch_labels=torch.tensor([1, 1]))
    expected_router = torch.nn.functional.cross_entropy(out.branch_logits, torch.tensor([1, 1]))
    assert torch.allclose(out.branch_loss, expected_router)
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * expected_router)
    out.loss.backward()
    ffn = metis.branch_ffns()[-1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ffn.branches["thinking"].parameters())
    assert all(p.grad is None for p in ffn.branches["non_thinking"].parameters())
    assert metis.router.fc2.weight.grad.abs().sum() > 0
    # the router reads its input without gradient: its loss alone reaches no LLM weight
    metis.zero_grad(set_to_none=True)
    metis(input_ids=ids, labels=labels, branch_labels=torch.tensor([0, 1])).branch_loss.backward()
    assert all(p.grad is None for n, p in metis.named_parameters() if not n.startswith("router."))


def test_the_router_reads_only_the_prompt_below_its_layer_on_the_prefix_branch():
    _, metis = _pair("text", router_layer=2)
    ids = _inputs("text", batch=2)["input_ids"]
    labels = ids.clone()
    labels[:, :4] = -100
    answer_changed = ids.clone()
    answer_changed[:, 4:] = 7
    with torch.no_grad():
        logits = metis.branch_logits(input_ids=ids, labels=labels)
        assert torch.equal(logits, metis.branch_logits(input_ids=answer_changed, labels=labels))
        assert torch.allclose(logits, metis.branch_logits(input_ids=ids[:, :4]))  # = routing the prompt alone
        ffns = metis.branch_ffns()
        for p in ffns[3].branches["thinking"].parameters():  # above the router layer: not read
            p.mul_(3)
        for p in ffns[0].branches["non_thinking"].parameters():  # below it, but not the prefix branch
            p.mul_(3)
        assert torch.equal(logits, metis.branch_logits(input_ids=ids, labels=labels))
        for p in ffns[1].branches["thinking"].parameters():  # below it, on the prefix branch: read
            p.mul_(3)
        assert not torch.allclose(logits, metis.branch_logits(input_ids=ids, labels=labels))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_routing_a_left_padded_batch_equals_routing_each_query_alone(pooling):
    _, metis = _pair("text", router_pooling=pooling, router_layer=1)
    with torch.no_grad():
        for p in metis.router.parameters():
            p.add_(torch.randn_like(p))
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11, 12]])
    batch = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        together = metis.route(input_ids=batch, attention_mask=mask).probabilities
        alone = torch.cat([metis.route(input_ids=short).probabilities, metis.route(input_ids=long).probabilities])
    assert torch.allclose(together, alone, atol=1e-5)


def test_unknown_branches_and_bad_configs_are_refused_clearly():
    _, metis = _pair("text")
    ids = _inputs("text")["input_ids"]
    with pytest.raises(ValueError, match=r"no branch 'reasoning'; its branches are \['non_thinking', 'thinking'\]"):
        metis(input_ids=ids, branch="reasoning")
    with pytest.raises(ValueError, match=r"branches 0..1"):
        metis.generate(input_ids=ids, branch=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="3 branch choices for a batch of 2"):
        metis(input_ids=ids, branch=["thinking"] * 3)
    with pytest.raises(ValueError, match="router_layer must be a decoder layer index in \\[0, 3\\]"):
        MetisHomeConfig(base_config=LlamaConfig(**TEXT), router_layer=4)
    with pytest.raises(ValueError, match="router_pooling must be one of"):
        MetisHomeConfig(base_config=LlamaConfig(**TEXT), router_pooling="max")
    with pytest.raises(ValueError, match="branch_names must be at least two distinct"):
        MetisHomeConfig(base_config=LlamaConfig(**TEXT), branch_names=["thinking", "thinking"])
    with pytest.raises(ValueError, match="already a Metis-HOME"):
        moe_zoo.expand_to_metis_home(metis)
    with torch.no_grad():
        prompt = metis(input_ids=ids, use_cache=True)
        with pytest.raises(ValueError, match="cached decoding step needs the query's branch"):
            metis(input_ids=ids[:, :1], cache=prompt.cache)
        step = metis(input_ids=ids[:, :1], cache=prompt.cache, branch=prompt.branch)
    assert step.logits.shape[1] == 1
    with pytest.raises(RuntimeError, match="without a branch choice"):
        metis.model(input_ids=ids)


def test_three_branches_work_and_the_think_format_is_checked():
    torch.manual_seed(0)
    metis = moe_zoo.expand_to_metis_home(_text_dense().eval(), branch_names=["non_thinking", "short", "thinking"])
    assert metis.route(input_ids=_inputs("text")["input_ids"]).probabilities.shape == (2, 3)
    assert format_response("4", "2 + 2 = 4") == "<think>2 + 2 = 4</think><answer>4</answer>"
    assert validate_response(format_response("Paris"), "non_thinking").answer == "Paris"
    bad = {
        "<think>x</think>4": "exactly once",
        "<answer>4</answer><think></think>": "out of order",
        "<think></think><answer>4</answer>": "needs reasoning",
        "<think>because</think><answer></answer>": "answer> block is empty",
        "<think><think>x</think><answer>4</answer>": "exactly once",
    }
    for text, message in bad.items():
        with pytest.raises(MalformedThinkTagsError, match=message):
            validate_response(text, "thinking", where="sample 3")
    with pytest.raises(MalformedThinkTagsError, match="sample 3: a non_thinking sample must have an empty think"):
        validate_response("<think>x</think><answer>4</answer>", "non_thinking", where="sample 3")


def test_gradient_checkpointing_gives_the_same_gradients():
    _, metis = _pair("text")
    _diverge(metis)
    ids = _inputs("text", batch=2)["input_ids"]
    labels = ids.clone()
    labels[:, :2] = -100

    def gradients():
        metis.zero_grad(set_to_none=True)
        metis(input_ids=ids, labels=labels, branch_labels=torch.tensor([0, 1]), use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in metis.named_parameters() if p.grad is not None}

    metis.train()
    plain = gradients()
    metis.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any(".branches.non_thinking." in n for n in plain)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_eager_and_sdpa_attention_agree_and_bf16_keeps_the_router_in_fp32(tmp_path):
    _, metis = _pair("qwen2_5_vl")
    _diverge(metis)
    metis.save_pretrained(tmp_path)
    inputs = _inputs("qwen2_5_vl", batch=2)
    outputs = {}
    for attention in ("eager", "sdpa"):
        model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation=attention).eval()
        with torch.no_grad():
            outputs[attention] = model(**inputs)
    assert torch.allclose(outputs["eager"].logits, outputs["sdpa"].logits, atol=1e-4)
    assert torch.equal(outputs["eager"].branch, outputs["sdpa"].branch)
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.router.fc1.weight.dtype == torch.float32
    assert half.model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        decision = half.route(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()})
    assert decision.probabilities.dtype == torch.float32 and decision.indices.shape == (2,)


def test_peft_lora_on_the_branches_trains_and_its_adapter_reloads_with_the_same_decisions(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    _, metis = _pair("text", router_layer=2)
    metis.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "down_proj"], modules_to_save=["router"])
    peft = get_peft_model(metis, config)
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any(".branches.thinking.gate_proj.lora_A" in n for n in trainable)
    assert any(".branches.non_thinking.gate_proj.lora_A" in n for n in trainable)
    assert any("router" in n and "modules_to_save" in n for n in trainable)
    ids = _inputs("text", batch=2)["input_ids"]
    labels = ids.clone()
    labels[:, :3] = -100
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for _ in range(3):
        out = peft(input_ids=ids, labels=labels, branch_labels=torch.tensor([0, 1]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    peft.eval()
    peft.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        before, after = peft(input_ids=ids), loaded(input_ids=ids)
    assert torch.allclose(before.logits, after.logits, atol=1e-6)
    assert torch.equal(before.branch, after.branch) and torch.allclose(before.branch_logits, after.branch_logits)
    generated = loaded.generate(input_ids=ids, branch="thinking", max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 3)


def test_device_map_auto_keeps_each_decoder_layer_whole(tmp_path):
    _, metis = _pair("qwen2_5_vl")
    metis.save_pretrained(tmp_path)
    assert "Qwen2_5_VLDecoderLayer" in metis._no_split_modules  # the wrapped model's, so big models shard cleanly
    placed = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto").eval()
    inputs = _inputs("qwen2_5_vl")
    with torch.no_grad():
        assert torch.equal(placed(**inputs).logits, metis(**inputs).logits)
