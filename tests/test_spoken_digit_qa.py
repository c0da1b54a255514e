"""Spoken digits synthesised with espeak-ng: the split, the examples, the cache, and that the clips say their label
(Whisper tiny.en transcribes them)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from moe_zoo import speech_assets
from moe_zoo.training import spoken_digit_qa
from moe_zoo.training.image_qa import answer_is_correct
from moe_zoo.training.spoken_digit_qa import HELDOUT_ACCENTS, spoken_digit_clips, spoken_digit_examples

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")


def test_heldout_accents_are_never_in_train():
    _, train_digits, train_voices = spoken_digit_clips("train")
    _, heldout_digits, heldout_voices = spoken_digit_clips("heldout")
    accent = lambda voice: voice.split("+")[0].split("@")[0]  # noqa: E731
    assert {accent(v) for v in heldout_voices} == set(HELDOUT_ACCENTS)
    assert not {accent(v) for v in train_voices} & set(HELDOUT_ACCENTS)
    for digits in (train_digits, heldout_digits):
        assert sorted(set(digits.tolist())) == list(range(10))


def test_examples_carry_their_clip_and_a_right_answer():
    examples = spoken_digit_examples("heldout", seed=0)
    waves, _, _ = spoken_digit_clips("heldout")
    assert len(examples) == 3 * len(waves)
    for example in examples[:60]:
        assert [item["type"] for item in example["messages"][0]["content"]] == ["speech", "text"]
        assert len(example["audios"]) == 1 and example["audios"][0].ndim == 1
        assert answer_is_correct(example["answer"], example)
    digit = next(e for e in examples if e["kind"] == "digit")
    assert not answer_is_correct(str((digit["label"] + 1) % 10), digit)
    with pytest.raises(ValueError, match="kinds must be"):
        spoken_digit_examples("train", kinds=("color",))
    with pytest.raises(ValueError, match="split must be"):
        spoken_digit_clips("test")


def test_clips_are_synthesised_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_ZOO_CACHE", str(tmp_path))
    spoken_digit_clips.cache_clear()
    calls = []
    real = speech_assets.synthesize_speech
    monkeypatch.setattr(spoken_digit_qa, "synthesize_speech", lambda *a, **k: calls.append(a) or real(*a, **k))
    try:
        first = spoken_digit_clips("heldout")
        spoken_digit_clips.cache_clear()
        second = spoken_digit_clips("heldout")
    finally:
        spoken_digit_clips.cache_clear()
    assert len(calls) == len(first[0])
    assert all((a == b).all() for a, b in zip(first[0], second[0], strict=True))


@torch.no_grad()
def test_whisper_states_tell_the_numbers_apart_across_unheard_accents():
    """The labels are consistent: mean Whisper tiny.en encoder states (2-s chunks) of a held-out clip are nearest to
    the centroid of its own number among the train accents' clips. Isolated words are too short for tiny.en's
    decoder to transcribe reliably, so the check is on what Uni-MoE reads: the encoder states."""
    folder = speech_assets.whisper_tiny_en_path(show_progress=False)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    model, extractor = speech_assets.shorten_whisper_chunks(model, WhisperFeatureExtractor.from_pretrained(folder), 2)
    encoder = model.get_encoder()

    def embed(waves):
        features = extractor(list(waves), sampling_rate=16000, return_tensors="pt").input_features
        return encoder(features).last_hidden_state[:, :60].mean(1)  # the first 1.2 s, where the word is

    train_waves, train_digits, train_voices = spoken_digit_clips("train")
    plain = [i for i, voice in enumerate(train_voices) if "+" not in voice]  # one voice per train accent
    centroids = torch.stack([embed([train_waves[i] for i in plain if train_digits[i] == d]).mean(0) for d in range(10)])
    waves, digits, voices = spoken_digit_clips("heldout")
    picks = [i for i, voice in enumerate(voices) if "+" not in voice]
    states = embed([waves[i] for i in picks])
    similarity = torch.nn.functional.cosine_similarity(states[:, None], centroids[None], dim=-1)
    accuracy = (similarity.argmax(-1).numpy() == digits[picks]).mean()
    assert accuracy >= 0.8, accuracy


def test_shortened_chunks_refuse_a_length_whisper_cannot_read():
    folder = speech_assets.whisper_tiny_en_path(show_progress=False)
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"seconds must be in \[1, 30\]"):
        speech_assets.shorten_whisper_chunks(model, WhisperFeatureExtractor.from_pretrained(folder), 31)
