"""Uni-MoE's processor: placeholder expansion per medium, audio chunking, ordering, errors, chat template and a
save/load round trip; and the processor's output running through the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, PreTrainedTokenizerFast, WhisperFeatureExtractor

import moe_zoo  # noqa: F401  (registers AutoProcessor)
from moe_zoo.modeling.uni_moe import UniMoeForConditionalGeneration, UniMoeProcessor
from moe_zoo.vision_tower import digits_image_processor
from tests.test_uni_moe_model import tiny_config

WORDS = ["<pad>", "</s>", "USER:", "ASSISTANT:", "what", "is", "this", "a", "cat", "hi", "there", "x", "?"]
RATE = 16000


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def tiny_feature_extractor() -> WhisperFeatureExtractor:
    """8 mel bins, 1-s chunks of 20 frames (hop 800): the tiny Whisper of ``tiny_config`` reads 20 frames."""
    return WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE, hop_length=800, chunk_length=1, n_fft=1600)


@pytest.fixture()
def processor() -> UniMoeProcessor:
    return UniMoeProcessor(
        digits_image_processor(),
        tiny_feature_extractor(),
        word_tokenizer(),
        image_seq_length=16,
        speech_query_tokens=4,
        audio_query_tokens=3,
        num_video_frames=3,
    )


def image(value: int = 0) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


def test_placeholders_expand_to_their_feature_counts(processor):
    clips = [np.zeros(int(2.5 * RATE), np.float32), np.ones(RATE // 2, np.float32)]
    out = processor(
        text=["<image> what is this ? <speech>", "<video> hi <audio>"],
        images=[image()],
        videos=[[image(i) for i in range(7)]],
        audios=clips,
    )
    ids = processor.placeholder_token_ids()
    counts = {name: int((out["input_ids"] == token).sum()) for name, token in ids.items()}
    assert counts == {"image_token_id": 16, "video_token_id": 16, "speech_token_id": 3 * 4, "audio_token_id": 3}
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert out["pixel_values_videos"].shape == (1, 3, 3, 32, 32)
    assert out["input_features"].shape == (3, 8, 20)  # 2.5 s -> three 1-s chunks
    assert out["input_values"].shape == (1, 8, 20)
    assert out["attention_mask"].sum(1).tolist() == [16 + 4 + 12, 16 + 1 + 3]  # no BOS in this vocabulary


def test_long_clips_keep_at_most_max_audio_chunks_and_videos_sample_frames_uniformly(processor):
    out = processor(text="<speech>", audios=[np.zeros(10 * RATE, np.float32)])
    assert out["input_features"].shape[0] == processor.max_audio_chunks == 4
    assert int((out["input_ids"] == processor.placeholder_token_ids()["speech_token_id"]).sum()) == 4 * 4
    frames = [image(40 * i) for i in range(5)]
    video = processor(text="<video>", videos=[frames])["pixel_values_videos"][0]
    singles = processor(text="<image> <image> <image>", images=[frames[0], frames[2], frames[4]])["pixel_values"]
    torch.testing.assert_close(video, singles)  # frames 0, 2 and 4 of 5


def test_media_are_consumed_in_order_across_rows(processor):
    out = processor(text=["<image>", "<image> <image>"], images=[image(0), image(100), image(200)])
    expected = processor(text="<image>", images=[image(100)])["pixel_values"][0]
    torch.testing.assert_close(out["pixel_values"][1], expected)


def test_media_and_placeholder_counts_must_match(processor):
    with pytest.raises(ValueError, match=r"2 placeholders for `images`, but 1 were given"):
        processor(text="<image> <image>", images=[image()])
    with pytest.raises(ValueError, match=r"1 placeholders for `audios`, but 0 were given .*<speech> and <audio>"):
        processor(text="<speech>")
    with pytest.raises(ValueError, match="mono waveform"):
        processor(text="<speech>", audios=[np.zeros((2, RATE), np.float32)])


def test_chat_template_is_vicuna_v1_with_media_first(processor):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "speech"}, {"type": "text", "text": "what is this ?"}],
        },
        {"role": "assistant", "content": "a cat"},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.endswith("USER: <image>\n<speech>\nwhat is this ? ASSISTANT: a cat</s>")
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")


def test_save_and_auto_processor_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    tiny_config().save_pretrained(tmp_path)  # AutoProcessor finds the class through the model type
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is UniMoeProcessor
    assert (loaded.image_seq_length, loaded.speech_query_tokens, loaded.audio_query_tokens) == (16, 4, 3)
    assert loaded.placeholder_token_ids() == processor.placeholder_token_ids()
    clip = np.sin(np.arange(RATE) / 7).astype(np.float32)
    for key, value in processor(text="<speech> hi", audios=[clip]).items():
        torch.testing.assert_close(loaded(text="<speech> hi", audios=[clip])[key], value)


@torch.no_grad()
def test_processor_output_runs_through_the_model(processor):
    ids = processor.placeholder_token_ids()
    config = tiny_config(text_config={**tiny_config().text_config.to_dict(), "vocab_size": len(WORDS)}, **ids)
    model = UniMoeForConditionalGeneration(config).eval()
    batch = processor(
        text=["<image> what is this ?", "<speech> hi there", "hi", "<video> <audio> x"],
        images=[image(10)],
        videos=[[image(1), image(2)]],
        audios=[np.zeros(RATE, np.float32), np.ones(RATE, np.float32)],
    )
    out = model(**batch)
    assert out.logits.shape == (4, batch["input_ids"].shape[1], len(WORDS))
    assert torch.isfinite(out.logits).all()


@torch.no_grad()
def test_a_clip_of_real_digit_images_is_a_video_pooled_over_its_frames(processor):
    """A short frame clip made of scikit-learn's real digit images: the processor samples its frames uniformly and
    the model's video features are the frame mean of its image features."""
    from moe_zoo.vision_tower import digit_image, load_digit_images

    digits, _ = load_digit_images()
    frames = [digit_image(digits[i]) for i in range(5)]
    ids = processor.placeholder_token_ids()
    config = tiny_config(text_config={**tiny_config().text_config.to_dict(), "vocab_size": len(WORDS)}, **ids)
    model = UniMoeForConditionalGeneration(config).eval()
    batch = processor(text=["<video> what is this ?"], videos=[frames])
    assert batch["pixel_values_videos"].shape == (1, 3, 3, 32, 32)
    sampled = processor(text="<image> <image> <image>", images=[frames[0], frames[2], frames[4]])["pixel_values"]
    video = model.model.get_video_features(batch["pixel_values_videos"])
    torch.testing.assert_close(video[0], model.model.get_image_features(sampled).mean(0))
    assert torch.isfinite(model(**batch).logits).all()
