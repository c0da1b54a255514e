"""Uni-MoE's model: each modality alone and mixed in one batch, text-only behaviour, placeholder checks, save/load,
generate, and the 8e modality-routing losses against a loop transcription of the original's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMultimodalLM, LlamaConfig, LlamaForCausalLM

import moe_zoo  # noqa: F401  (registers the Auto classes)
from moe_zoo.modeling.uni_moe import UniMoeConfig, UniMoeForConditionalGeneration
from moe_zoo.modeling.uni_moe.modality_losses import modality_routing_losses

VOCAB = 120
IMAGE, VIDEO, SPEECH, AUDIO = VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3
PATCHES, SPEECH_Q, AUDIO_Q = 16, 4, 3


def tiny_config(**overrides) -> UniMoeConfig:
    text = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    whisper = dict(
        model_type="whisper",
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
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
    qformer = dict(model_type="blip_2_qformer", hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    fields = dict(
        text_config=text,
        vision_config=vision,
        speech_config=whisper,
        audio_config=whisper,
        audio_qformer_config={**qformer, "intermediate_size": 32},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        speech_token_id=SPEECH,
        audio_token_id=AUDIO,
        speech_query_tokens=SPEECH_Q,
        audio_query_tokens=AUDIO_Q,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return UniMoeConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model() -> UniMoeForConditionalGeneration:
    torch.manual_seed(0)
    return UniMoeForConditionalGeneration(tiny_config()).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def mels(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 8, 20, generator=torch.Generator().manual_seed(seed))


def row(*parts) -> list[int]:
    """Token ids from ints and (placeholder, count) pairs."""
    ids = []
    for part in parts:
        ids.extend([part[0]] * part[1] if isinstance(part, tuple) else [part])
    return ids


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


IMAGE_ROW = row(1, 5, (IMAGE, PATCHES), 7, 8)
SPEECH_ROW = row(1, (SPEECH, 2 * SPEECH_Q), 9, 10, 11)
TEXT_ROW = row(1, 12, 13, 14)
VIDEO_ROW = row(1, (VIDEO, PATCHES), 15)
AUDIO_ROW = row(1, 16, (AUDIO, AUDIO_Q), 17)


@torch.no_grad()
def test_each_row_of_a_mixed_batch_equals_that_row_alone(model):
    """Images, speech, text, video and audio rows batched together: every row's logits equal the row run alone,
    so the features reach their own row's placeholders in order and padding changes nothing."""
    video = torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    media = {
        "image": dict(pixel_values=images(1)),
        "speech": dict(input_features=mels(2)),
        "text": {},
        "video": dict(pixel_values_videos=video),
        "audio": dict(input_values=mels(1, seed=4)),
    }
    rows = [IMAGE_ROW, SPEECH_ROW, TEXT_ROW, VIDEO_ROW, AUDIO_ROW]
    ids, mask = pad(rows)
    batch_media = {k: v for m in media.values() for k, v in m.items()}
    batched = model(input_ids=ids, attention_mask=mask, **batch_media).logits
    for index, (ids_row, name) in enumerate(zip(rows, media, strict=True)):
        alone = model(input_ids=torch.tensor([ids_row]), **media[name]).logits[0]
        torch.testing.assert_close(batched[index, : len(ids_row)], alone, atol=2e-5, rtol=0, msg=name)


@torch.no_grad()
def test_images_fill_placeholders_in_batch_order_across_rows(model):
    ids, mask = pad([IMAGE_ROW, IMAGE_ROW])
    pixels = images(2)
    both = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    swapped = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.flip(0)).logits
    torch.testing.assert_close(both[0], swapped[1])
    assert (both[0] - both[1]).abs().max() > 1e-3  # different images give different logits


@torch.no_grad()
def test_a_video_is_the_mean_over_its_frames_of_the_image_features(model):
    frames = images(3, seed=5)
    video = model.model.get_video_features(frames.unsqueeze(0))
    per_frame = model.model.get_image_features(frames)
    torch.testing.assert_close(video[0], per_frame.mean(0))


@torch.no_grad()
def test_speech_queries_attend_causally_to_each_other(model):
    """The Whisper-decoder connector: query i sees queries <= i only, and every query sees the whole chunk."""
    connector = model.model.speech_connector
    states = model.model.speech_encoder(mels(1)).last_hidden_state
    before = connector(states)
    with torch.no_grad():
        original = connector.query_tokens.clone()
        connector.query_tokens[0, -1] += torch.randn(connector.query_tokens.shape[-1])  # not a constant: LayerNorm
        try:
            after = connector(states)
        finally:
            connector.query_tokens.copy_(original)
    torch.testing.assert_close(after[0, :-1], before[0, :-1])
    assert (after[0, -1] - before[0, -1]).abs().max() > 1e-4
    changed = connector(states + torch.randn_like(states) * 0.1)
    assert (changed[0, 0] - before[0, 0]).abs().max() > 1e-4


@torch.no_grad()
def test_without_media_it_is_its_language_model():
    """A text-only batch runs the LLM alone; with ``moe_layers="none"`` that is exactly a LlamaForCausalLM with
    the same weights."""
    torch.manual_seed(0)
    dense = UniMoeForConditionalGeneration(tiny_config(moe_layers="none")).eval()
    llama = LlamaForCausalLM(LlamaConfig(**dense.config.text_config.to_dict())).eval()
    weights = {k.removeprefix("model.language_model."): v for k, v in dense.state_dict().items()}
    weights = {("model." + k if not k.startswith("lm_head") else k): v for k, v in weights.items()}
    llama.load_state_dict({k: weights[k] for k in llama.state_dict()})
    ids, mask = pad([TEXT_ROW, row(1, 30, 31)])
    torch.testing.assert_close(
        dense(input_ids=ids, attention_mask=mask).logits, llama(input_ids=ids, attention_mask=mask).logits
    )


def test_placeholder_and_feature_count_mismatches_are_refused(model):
    ids = torch.tensor([IMAGE_ROW])
    with pytest.raises(ValueError, match=r"Image placeholder tokens and features do not match: .* 16 tokens .* 32"):
        model(input_ids=ids, pixel_values=images(2))
    with pytest.raises(ValueError, match=r"16 image placeholder tokens .* no image inputs .*pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"Speech placeholder tokens and features do not match"):
        model(input_ids=torch.tensor([SPEECH_ROW]), input_features=mels(1))
    with pytest.raises(ValueError, match=r"vision tower expects \(num_images, 3, 32, 32\)"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))


def test_media_for_a_missing_encoder_is_refused():
    text_only = UniMoeForConditionalGeneration(
        tiny_config(vision_config=None, speech_config=None, audio_config=None, audio_qformer_config=None)
    )
    assert not hasattr(text_only.model, "vision_tower")
    with pytest.raises(ValueError, match=r"no image encoder .*vision_config"):
        text_only(input_ids=torch.tensor([IMAGE_ROW]), pixel_values=images(1))


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="placeholder token ids"):
        tiny_config(video_token_id=IMAGE)
    with pytest.raises(ValueError, match="speech_query_tokens.*max_target_positions=8"):
        tiny_config(speech_query_tokens=9)
    with pytest.raises(ValueError, match="audio_qformer_config"):
        tiny_config(audio_qformer_config=None)
    with pytest.raises(ValueError, match="modality_l1_loss_coef"):
        tiny_config(modality_l1_loss_coef=0.1)
    with pytest.raises(ValueError, match=r"image_expert_indices.*\[0, 4\)"):
        tiny_config(image_expert_indices=[4])
    with pytest.raises(ValueError, match="router_type"):
        tiny_config(router_type="nope")


@torch.no_grad()
def test_save_then_from_pretrained_gives_identical_logits_and_generate_works(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMultimodalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is UniMoeForConditionalGeneration
    ids, mask = pad([IMAGE_ROW, SPEECH_ROW])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(1), input_features=mels(2))
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    generated = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 5)
    # generate's cached steps reproduce the uncached argmax continuation of the first row
    first = torch.tensor([IMAGE_ROW])
    step = loaded.generate(input_ids=first, pixel_values=images(1), max_new_tokens=3, do_sample=False)
    greedy = first
    for _ in range(3):
        logits = loaded(input_ids=greedy, pixel_values=images(1), use_cache=False).logits
        greedy = torch.cat([greedy, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(step, greedy)


def test_router_logits_and_balance_loss_are_returned_and_added(model):
    ids, mask = pad([TEXT_ROW, IMAGE_ROW])
    labels = ids.masked_fill(ids >= VOCAB, -100)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=images(1), labels=labels, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (ids.numel(), 4)
    plain = model(input_ids=ids, attention_mask=mask, pixel_values=images(1), labels=labels)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss)


def test_the_lm_loss_follows_the_trainers_num_items_in_batch(model):
    """Given ``num_items_in_batch`` (the label tokens of a whole step, all processes and accumulation steps), the LM
    loss is this batch's token sum over it, so that the Trainer can weigh batches by tokens; without it, the mean."""
    ids, mask = pad([TEXT_ROW, IMAGE_ROW])
    labels = ids.masked_fill(ids >= VOCAB, -100)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(1), labels=labels)
    mean = model(**inputs).loss
    tokens = int((labels[:, 1:] != -100).sum())
    step_total = torch.tensor(3 * tokens)
    torch.testing.assert_close(model(**inputs, num_items_in_batch=step_total).loss, mean * tokens / step_total)


def original_modality_losses(router_logits, batch_size, spans, config):
    """A transcription of the original 8e loop (``llava_llama.py``): per layer and row, L1 of each modality's gates
    to its multi-hot target weighted by its share of the row, and the mean of ``1 - KL`` over the modality pairs."""
    l1_terms, kl_terms = [], []
    for logits in router_logits:
        gates = F.softmax(logits.reshape(batch_size, -1, logits.shape[-1]).float(), dim=-1)
        length, experts = gates.shape[1:]
        for b in range(batch_size):
            layer_loss, means = 0.0, {}
            for name in ("image", "audio", "video", "text"):
                positions = spans[b].get(name, [])
                if not positions:
                    continue
                picked = gates[b, positions]
                means[name] = picked.mean(0)
                if name == "text":
                    continue
                target = F.one_hot(torch.tensor(getattr(config, f"{name}_expert_indices")), experts).sum(0)
                target = target.unsqueeze(0).expand(len(positions), -1).float()
                layer_loss = layer_loss + len(positions) / length * nn.L1Loss()(picked, target)
            l1_terms.append(layer_loss)
            pairs = []
            for a, c in (
                ("image", "audio"),
                ("image", "text"),
                ("audio", "text"),
                ("audio", "video"),
                ("video", "text"),
            ):
                if a in means and c in means:
                    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(means[a], 0), F.softmax(means[c], 0))
                    pairs.append(1.0 - kl)
            if pairs:
                kl_terms.append(sum(pairs) / len(pairs))
    return config.modality_l1_loss_coef * sum(l1_terms) + config.modality_kl_loss_coef * sum(kl_terms)


def test_modality_routing_losses_equal_the_original_loop():
    config = tiny_config(
        modality_l1_loss_coef=0.3,
        modality_kl_loss_coef=0.2,
        image_expert_indices=[0, 2, 2],
        audio_expert_indices=[1, 3],
        video_expert_indices=[2],
    )
    ids, mask = pad([IMAGE_ROW + row((AUDIO, 2)), SPEECH_ROW, VIDEO_ROW, TEXT_ROW])
    generator = torch.Generator().manual_seed(0)
    router_logits = [torch.randn(ids.numel(), 4, generator=generator) for _ in range(2)]

    def positions(b, test):
        return [t for t in range(ids.shape[1]) if test(int(ids[b, t]), int(mask[b, t]))]

    spans = [
        {
            "image": positions(b, lambda i, m: i == IMAGE),
            "audio": positions(b, lambda i, m: i in (SPEECH, AUDIO)),
            "video": positions(b, lambda i, m: i == VIDEO),
            "text": positions(b, lambda i, m: i < VOCAB and m == 1),
        }
        for b in range(ids.shape[0])
    ]
    records = [type("R", (), {"logits": logits})() for logits in router_logits]
    ours = modality_routing_losses(records, ids, mask, config)
    reference = original_modality_losses(router_logits, ids.shape[0], spans, config)
    torch.testing.assert_close(ours, torch.as_tensor(reference, dtype=torch.float32), atol=1e-6, rtol=1e-6)
    assert ours > 0


def test_modality_losses_join_the_loss_given_labels():
    torch.manual_seed(0)
    config = tiny_config(modality_l1_loss_coef=0.5, image_expert_indices=[1], audio_expert_indices=[2])
    model = UniMoeForConditionalGeneration(config).eval()
    ids, mask = pad([IMAGE_ROW, SPEECH_ROW])
    labels = ids.masked_fill(ids >= VOCAB, -100)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(1), input_features=mels(2))
    with_losses = model(**inputs, labels=labels)
    config.modality_l1_loss_coef = 0.0
    without = model(**inputs, labels=labels)
    assert with_losses.loss > without.loss
    torch.testing.assert_close(with_losses.loss - without.loss, with_losses.aux_loss)


@torch.no_grad()
def test_eager_and_sdpa_attention_agree_in_every_tower(model, tmp_path):
    """The attention implementation reaches the LLM and every encoder (transformers' attention interface)."""
    model.save_pretrained(tmp_path)
    eager = UniMoeForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = UniMoeForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    for name in ("language_model", "vision_tower", "speech_encoder", "audio_encoder"):
        assert getattr(eager.model, name).config._attn_implementation == "eager", name
        assert getattr(sdpa.model, name).config._attn_implementation == "sdpa", name
    ids, mask = pad([IMAGE_ROW, SPEECH_ROW, AUDIO_ROW])
    inputs = dict(
        input_ids=ids, attention_mask=mask, pixel_values=images(1), input_features=mels(2), input_values=mels(1)
    )
    torch.testing.assert_close(eager(**inputs).logits, sdpa(**inputs).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_with_router_logits_on(model):
    """Cached steps route only the new positions while the attention mask covers the past: the router loss must
    mask the new positions only (it raised a shape error before)."""
    ids, mask = pad([TEXT_ROW, IMAGE_ROW])
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=images(1), max_new_tokens=3, output_router_logits=True
    )
    assert out.shape == (2, ids.shape[1] + 3)


@torch.no_grad()
def test_a_tied_language_model_keeps_its_lm_head_through_save_and_load(tmp_path):
    """SmolLM2 ties its LM head to the embeddings: the composite must tie too, or the saved checkpoint would lack
    ``lm_head.weight`` and reload it at random."""
    text = {**tiny_config().text_config.to_dict(), "tie_word_embeddings": True}
    model = UniMoeForConditionalGeneration(tiny_config(text_config=text)).eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = UniMoeForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([TEXT_ROW])  # an untied random head would differ by O(1); kernels on reloaded memory by 1e-8
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
