# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Uni-MoE's processor: text with ``<image>``, ``<video>``, ``<speech>`` and ``<audio>`` placeholders, plus any mix
of images, videos and audio clips, into the model's inputs.

Each placeholder is expanded to one token per feature vector the model will scatter there (transformers'
convention; the original used one sentinel id and spliced): an image gives ``image_seq_length`` tokens, a video the
same (its frames are pooled), and a clip ``query tokens x chunks``, where a clip is cut into ``chunk_length``-second
chunks (30 s for Whisper) of which at most ``max_audio_chunks`` (the original's ``audio_time = 4``) are kept.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

UNI_MOE_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

MEDIA_TYPES = ("image", "video", "speech", "audio")

# The original's ``vicuna_v1`` conversation: "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ...".
# Media items of a message come first, one placeholder and a newline each, in the order given.
UNI_MOE_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + UNI_MOE_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set media = '' -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') -%}{%- set media = namespace(value='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'video', 'speech', 'audio'] -%}"
    "{%- set media.value = media.value + '<' + item['type'] + '>\\n' -%}{%- endif -%}"
    "{%- endfor -%}{%- set media = media.value -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + media + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


class UniMoeProcessor(ProcessorMixin):
    """Tokenizer + image processor + Whisper feature extractor for [`UniMoeForConditionalGeneration`].

    ``processor(text=..., images=[...], videos=[...], audios=[...])``: ``images`` and ``videos`` are consumed in
    the order their placeholders appear (row by row), ``audios`` likewise across both ``<speech>`` and ``<audio>``
    placeholders. Returns ``input_ids``, ``attention_mask`` and, as present, ``pixel_values``
    ``(images, C, H, W)``, ``pixel_values_videos`` ``(videos, frames, C, H, W)``, ``input_features``
    ``(speech chunks, mel, frames)`` and ``input_values`` ``(audio chunks, mel, frames)``.

    Args:
        image_seq_length: tokens per image (the tower's patches, plus CLS with ``vision_feature_select_strategy
            ="full"``); :meth:`from_model_config` derives it and the other counts from a model config.
        speech_query_tokens, audio_query_tokens: tokens per chunk of speech / audio (the model config's values).
        num_video_frames: frames sampled uniformly from every video (8 in the original).
        max_audio_chunks: chunks kept per clip; longer clips are cut.

    The placeholder tokens are added to the tokenizer as special tokens if it lacks them; the model config's
    ``*_token_id`` must equal :meth:`placeholder_token_ids`.
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 576,
        speech_query_tokens: int = 50,
        audio_query_tokens: int = 32,
        num_video_frames: int = 8,
        max_audio_chunks: int = 4,
        **kwargs,
    ):
        tokens = [f"<{m}>" for m in MEDIA_TYPES]
        missing = [t for t in tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        self.image_seq_length = image_seq_length
        self.speech_query_tokens = speech_query_tokens
        self.audio_query_tokens = audio_query_tokens
        self.num_video_frames = num_video_frames
        self.max_audio_chunks = max_audio_chunks
        super().__init__(image_processor, feature_extractor, tokenizer, chat_template=chat_template, **kwargs)
        if self.chat_template is None:
            self.chat_template = UNI_MOE_CHAT_TEMPLATE

    @classmethod
    def from_model_config(cls, config, image_processor, feature_extractor, tokenizer, **kwargs) -> UniMoeProcessor:
        """A processor whose token counts match ``config`` (a ``UniMoeConfig``)."""
        image_seq_length = 0
        if config.vision_config is not None:
            vision = config.vision_config
            image_seq_length = (vision.image_size // vision.patch_size) ** 2
            image_seq_length += config.vision_feature_select_strategy == "full"
        return cls(
            image_processor,
            feature_extractor,
            tokenizer,
            image_seq_length=image_seq_length,
            speech_query_tokens=config.speech_query_tokens,
            audio_query_tokens=config.audio_query_tokens,
            **kwargs,
        )

    def placeholder_token_ids(self) -> dict[str, int]:
        """``{"image_token_id": ..., "video_token_id": ..., "speech_token_id": ..., "audio_token_id": ...}``, for
        the model config."""
        return {f"{m}_token_id": self.tokenizer.convert_tokens_to_ids(f"<{m}>") for m in MEDIA_TYPES}

    def _audio_chunks(self, clip) -> np.ndarray:
        """A clip's log-mel chunks ``(chunks, mel, frames)``: ``chunk_length`` seconds each, at most
        ``max_audio_chunks``."""
        waveform = np.asarray(clip, dtype=np.float32)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError(f"An audio clip must be a non-empty mono waveform (1-D), got shape {waveform.shape}.")
        samples = self.feature_extractor.n_samples
        count = min(self.max_audio_chunks, -(-waveform.size // samples))
        pieces = [waveform[i * samples : (i + 1) * samples] for i in range(count)]
        rate = self.feature_extractor.sampling_rate
        features = self.feature_extractor(pieces, sampling_rate=rate, return_tensors="np")["input_features"]
        return features

    def _sample_frames(self, video) -> list:
        frames = list(video)
        if not frames:
            raise ValueError("A video must hold at least one frame.")
        picks = np.linspace(0, len(frames) - 1, self.num_video_frames).round().astype(int)
        return [frames[i] for i in picks]

    def __call__(self, text=None, images=None, videos=None, audios=None, return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("UniMoeProcessor needs `text` (with a placeholder for each image, video or clip).")
        texts = [text] if isinstance(text, str) else list(text)
        media = {"image": list(images or []), "video": list(videos or []), "audio_clips": list(audios or [])}
        counts = {m: sum(t.count(f"<{m}>") for t in texts) for m in MEDIA_TYPES}
        expected = {
            "image": counts["image"],
            "video": counts["video"],
            "audio_clips": counts["speech"] + counts["audio"],
        }
        names = {"image": "images", "video": "videos", "audio_clips": "audios"}
        for key, count in expected.items():
            if count != len(media[key]):
                raise ValueError(
                    f"The text holds {count} placeholders for `{names[key]}`, but {len(media[key])} were given "
                    f"({'<speech> and <audio>' if key == 'audio_clips' else '<' + key + '>'} placeholders; one each)."
                )
        data: dict = {}
        if media["image"]:
            data["pixel_values"] = self.image_processor(media["image"], return_tensors="pt")["pixel_values"]
        if media["video"]:
            frames = [self._sample_frames(v) for v in media["video"]]
            flat = self.image_processor([f for v in frames for f in v], return_tensors="pt")["pixel_values"]
            data["pixel_values_videos"] = flat.view(len(frames), self.num_video_frames, *flat.shape[1:])
        expanded, speech, audio = self._expand(texts, media["audio_clips"])
        if speech:
            data["input_features"] = torch.from_numpy(np.concatenate(speech))
        if audio:
            data["input_values"] = torch.from_numpy(np.concatenate(audio))
        kwargs.setdefault("padding", True)
        data.update(self.tokenizer(expanded, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand(self, texts: list[str], clips: list) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        """Texts with every placeholder repeated to its token count, and the speech and audio chunks in order."""
        speech, audio, expanded = [], [], []
        clip_iter = iter(clips)
        for text in texts:
            pieces = []
            for piece in _split_keeping_placeholders(text):
                if piece in ("<image>", "<video>"):
                    pieces.append(piece * self.image_seq_length)
                elif piece in ("<speech>", "<audio>"):
                    chunks = self._audio_chunks(next(clip_iter))
                    (speech if piece == "<speech>" else audio).append(chunks)
                    per_chunk = self.speech_query_tokens if piece == "<speech>" else self.audio_query_tokens
                    pieces.append(piece * (per_chunk * chunks.shape[0]))
                else:
                    pieces.append(piece)
            expanded.append("".join(pieces))
        return expanded, speech, audio

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_videos", "input_features", "input_values"]


_PLACEHOLDER = re.compile("(" + "|".join(f"<{m}>" for m in MEDIA_TYPES) + ")")


def _split_keeping_placeholders(text: str) -> list[str]:
    return [piece for piece in _PLACEHOLDER.split(text) if piece]


__all__ = ["UNI_MOE_CHAT_TEMPLATE", "UNI_MOE_SYSTEM_PROMPT", "UniMoeProcessor"]
