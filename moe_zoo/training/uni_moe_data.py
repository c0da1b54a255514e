"""Uni-MoE's training data: chat examples with images, videos, speech and audio, batched for the model.

TRL's collators handle text and images only, so Uni-MoE has its own. An example is

```python
{
    "messages": [
        {"role": "user", "content": [{"type": "speech"}, {"type": "text", "text": "What is said?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ],
    "images": [...],  # one per {"type": "image"} item, in order of appearance
    "videos": [...],  # one per {"type": "video"} item: a list of frames, or a folder of frame images
    "audios": [...],  # one per {"type": "speech"} or {"type": "audio"} item: 16 kHz mono waveforms or audio files
}
```

Content may also be a plain string (text only); an item may carry its medium inline instead
(``{"type": "image", "image": ...}``, ``{"type": "speech", "audio": ...}``, ``{"type": "video", "video": ...}``) when
the example has no list for it. Media may be file paths (loaded when batched: images with PIL, audio with
:func:`load_audio`) or loaded objects.

:class:`UniMoeCollator` renders the chat with the processor's template (the original's ``vicuna_v1``), runs the
processor on each piece (which expands every placeholder to its feature count and turns the media into
``pixel_values`` / ``pixel_values_videos`` / ``input_features`` / ``input_values``), and supervises only the
assistant answers and the EOS that ends them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..speech_assets import load_waveform
from .stage_utils import IGNORE_INDEX, chat_segments, pad_right

MEDIA_TYPES = ("image", "video", "speech", "audio")
"""The content item types that stand for a medium (each becomes a placeholder in the rendered chat)."""

MEDIA_LISTS = {"image": "images", "video": "videos", "speech": "audios", "audio": "audios"}
"""The example key whose list holds the media of each item type (speech and audio clips share ``audios``)."""

INLINE_KEYS = {"image": ("image", "path", "url"), "video": ("video", "path"), "speech": ("audio", "path")}
INLINE_KEYS["audio"] = INLINE_KEYS["speech"]

MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "input_features", "input_values")
"""The batch keys of the media inputs, concatenated over the batch in order of appearance."""

_ITEM_NAMES = {"images": "'image'", "videos": "'video'", "audios": "'speech'/'audio'"}
_ROLES = ("system", "user", "assistant")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# --- loading media ---------------------------------------------------------------------------------------------------


def load_audio(path: str | Path) -> np.ndarray:
    """An audio file as float32 mono at 16 kHz (what Whisper's feature extractor takes), through
    :func:`moe_zoo.speech_assets.load_waveform` (any WAV encoding, resampled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist.")
    return np.asarray(load_waveform(path), dtype=np.float32)


def load_image(image: Any) -> Any:
    """A path (opened with PIL) or an image object, as RGB."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_video(video: Any) -> Any:
    """A video as a list of frames: a folder of frame images (sorted by name), a list of frames or frame paths, a
    ``.npy`` file of ``(frames, H, W, C)``, or an array already."""
    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not frames:
                raise ValueError(f"video folder {path} holds no frame images ({', '.join(_IMAGE_SUFFIXES)}).")
            return [load_image(frame) for frame in frames]
        if path.suffix == ".npy":
            return np.load(path)
        raise ValueError(f"video {path} is neither a folder of frames nor a .npy array of frames.")
    if isinstance(video, np.ndarray | torch.Tensor):
        return video
    return [load_image(frame) for frame in video]


def _load_clip(clip: Any) -> Any:
    return load_audio(clip) if isinstance(clip, (str, Path)) else clip


# --- examples --------------------------------------------------------------------------------------------------------


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """``messages`` with every content as a list of items (a string becomes one text item); raises ``ValueError``
    for an unknown role or item type, naming the allowed ones."""
    if not messages:
        raise ValueError("An example needs a non-empty 'messages' list.")
    normalized = []
    for number, message in enumerate(messages):
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{number}] has role {role!r}; expected one of {_ROLES}.")
        content = message.get("content", "")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        for item in items:
            kind = item.get("type")
            if kind != "text" and kind not in MEDIA_TYPES:
                raise ValueError(
                    f"messages[{number}] has a content item of type {kind!r}; expected 'text' or one of {MEDIA_TYPES}."
                )
            if kind == "text" and any(f"<{m}>" in item.get("text", "") for m in MEDIA_TYPES):
                raise ValueError(
                    f"messages[{number}] has a media placeholder written in its text ({item['text']!r}); put a "
                    f"{{'type': 'image'|'video'|'speech'|'audio'}} item there instead."
                )
        normalized.append({"role": role, "content": items})
    return normalized


def media_order(messages: Sequence[dict]) -> list[str]:
    """The media item types of a (normalized) chat in order of appearance."""
    return [item["type"] for m in messages for item in m["content"] if item["type"] in MEDIA_TYPES]


def example_modalities(example: dict) -> set[str]:
    """The media types an example holds (empty for text-only)."""
    return set(media_order(normalize_messages(example["messages"])))


def example_media(example: dict, messages: Sequence[dict] | None = None) -> dict[str, list]:
    """``{"images", "videos", "audios"}`` of an example, each in order of appearance and loaded.

    Media come from the example's lists, or inline from the items when the example has no list for that key. A
    count that differs from the number of items raises ``ValueError`` saying which.
    """
    messages = normalize_messages(example["messages"]) if messages is None else messages
    order = media_order(messages)
    media: dict[str, list] = {"images": [], "videos": [], "audios": []}
    for key in media:
        kinds = [kind for kind in order if MEDIA_LISTS[kind] == key]
        given = example.get(key)
        if given is None:
            inline = []
            for m in messages:
                for item in m["content"]:
                    if item["type"] in kinds:
                        value = next((item[k] for k in INLINE_KEYS[item["type"]] if item.get(k) is not None), None)
                        if value is None:
                            raise ValueError(
                                f"A {item['type']!r} item has no medium: give the example a {key!r} list (one per "
                                f"{'/'.join(kinds)} item, in order) or put it in the item as "
                                f"{INLINE_KEYS[item['type']][0]!r}."
                            )
                        inline.append(value)
            given = inline
        given = list(given)
        if len(given) != len(kinds):
            raise ValueError(
                f"The example lists {len(given)} {key}, but its messages hold {len(kinds)} {_ITEM_NAMES[key]} items; "
                f"give one per item, in order of appearance."
            )
        loader = load_image if key == "images" else load_video if key == "videos" else _load_clip
        media[key] = [loader(value) for value in given]
    return media


def filter_modality(examples: Iterable[dict], modality: str) -> list[dict]:
    """The single-modality examples of ``modality``: those whose only media type is ``modality`` (stages 1 and 2
    train one modality's connector / expert on such data)."""
    if modality not in MEDIA_TYPES:
        raise ValueError(f"Unknown modality {modality!r}; expected one of {MEDIA_TYPES}.")
    return [example for example in examples if example_modalities(example) == {modality}]


def load_uni_moe_jsonl(path: str | Path, media_root: str | Path | None = None) -> list[dict]:
    """Read a JSONL of examples (see the module docstring) whose ``images``, ``videos`` and ``audios`` are file paths
    (images: image files; videos: folders of frames, lists of frame files or ``.npy``; audios: ``.wav``). Relative
    paths are resolved against ``media_root`` (default: the file's folder) and must exist; media are read when
    batched. Raises ``ValueError`` / ``FileNotFoundError`` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (expected a .jsonl of Uni-MoE chat examples).")
    root = Path(media_root) if media_root is not None else path.parent

    def resolve(value: Any, number: int) -> Any:
        if isinstance(value, list):
            return [resolve(v, number) for v in value]
        resolved = Path(value) if Path(value).is_absolute() else root / value
        if not resolved.exists():
            raise FileNotFoundError(f"{path}, line {number}: media file {resolved} does not exist.")
        return str(resolved)

    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" not in row:
            raise ValueError(f"{path}, line {number}: expected a 'messages' list, got keys {sorted(row)}.")
        try:
            messages = normalize_messages(row["messages"])
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        for key in ("images", "videos", "audios"):
            if row.get(key) is not None:
                row[key] = [resolve(value, number) for value in row[key]]
        counts = {key: sum(MEDIA_LISTS[kind] == key for kind in media_order(messages)) for key in MEDIA_LISTS.values()}
        for key, count in counts.items():
            if len(row.get(key) or []) != count:
                raise ValueError(
                    f"{path}, line {number}: the messages hold {count} items for {key!r}, but the row lists "
                    f"{len(row.get(key) or [])}."
                )
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


# --- the collator ----------------------------------------------------------------------------------------------------


def _render_items(messages: Sequence[dict]) -> list[dict]:
    """Messages with media items reduced to their type (the template writes only the placeholder)."""
    return [
        {
            "role": m["role"],
            "content": [
                {"type": i["type"], "text": i["text"]} if i["type"] == "text" else {"type": i["type"]}
                for i in m["content"]
            ],
        }
        for m in messages
    ]


class UniMoeCollator:
    """Batches Uni-MoE chat examples (see the module docstring) for training.

    Each example's chat is rendered with the processor's chat template and cut into pieces: the prompt before each
    assistant turn (unsupervised) and the answer with its EOS (supervised). Each piece goes through the processor
    with the media it holds, so the prompt's tokens are those the processor gives at inference, and every
    placeholder is expanded to its feature count. ``labels`` are the answer tokens and -100 elsewhere (system
    prompt, user turns, ``ASSISTANT:``, placeholders, padding). Rows are padded on the right; media inputs are
    concatenated over the batch in order of appearance (the order the model scatters them in). Text-only examples
    and mixed batches (an image example beside a speech one beside a text-only one) work.

    Sequences longer than ``max_length`` are cut at the end; an example whose placeholders would be cut raises
    ``ValueError`` (its features could not all be placed).
    """

    def __init__(self, processor: Any, max_length: int = 2048):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.placeholder_ids = set(processor.placeholder_token_ids().values())

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False, tokenize: bool = False) -> str:
        return self.processor.apply_chat_template(
            _render_items(messages), add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )

    def segments(self, example: dict) -> list[tuple[str, bool]]:
        """The example's rendered text as ``(piece, supervised)`` pieces, in order."""
        return chat_segments(self._render, normalize_messages(example["messages"]))

    def prompt(self, example: dict) -> str:
        """The text the model sees before it answers: the chat up to (without) a final assistant turn, with the
        generation prompt (``ASSISTANT:``)."""
        messages = normalize_messages(example["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self._render(messages, add_generation_prompt=True)

    def encode(self, example: dict) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """``(input_ids, labels, media inputs)`` of one example."""
        messages = normalize_messages(example["messages"])
        media = example_media(example, messages)
        queues = {key: list(values) for key, values in media.items()}
        input_ids: list[int] = []
        labels: list[int] = []
        inputs: dict[str, list[torch.Tensor]] = {key: [] for key in MEDIA_INPUTS}
        for number, (piece, supervised) in enumerate(chat_segments(self._render, messages)):
            take = {"images": piece.count("<image>"), "videos": piece.count("<video>"), "audios": _count_clips(piece)}
            given = {key: [queues[key].pop(0) for _ in range(n)] for key, n in take.items()}
            out = self.processor(
                text=[piece],
                images=given["images"] or None,
                videos=given["videos"] or None,
                audios=given["audios"] or None,
                add_special_tokens=number == 0,
                padding=False,
                return_tensors="pt",
            )
            ids = out["input_ids"][0].tolist()
            input_ids += ids
            labels += [i if supervised and i not in self.placeholder_ids else IGNORE_INDEX for i in ids]
            for key in MEDIA_INPUTS:
                if key in out:
                    inputs[key].append(out[key])
        if len(input_ids) > self.max_length:
            if any(i in self.placeholder_ids for i in input_ids[self.max_length :]):
                raise ValueError(
                    f"An example's media placeholders end beyond max_length={self.max_length} (it needs "
                    f"{len(input_ids)} tokens); raise max_length."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels, {key: torch.cat(v) for key, v in inputs.items() if v}

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(example) for example in examples]
        batch = pad_right([(ids, labels) for ids, labels, _ in encoded], self._pad_id())
        for key in MEDIA_INPUTS:
            parts = [media[key] for _, _, media in encoded if key in media]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    def _pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def generation_inputs(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The inputs of ``model.generate`` for the examples' prompts (:meth:`prompt`; a final assistant turn, like
        an answer key, is left out): left-padded ``input_ids`` / ``attention_mask`` and the media inputs."""
        prompts, media = [], {"images": [], "videos": [], "audios": []}
        for example in examples:
            messages = normalize_messages(example["messages"])
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            prompts.append(self._render(messages, add_generation_prompt=True))
            for key, values in example_media({**example, "messages": messages}, messages).items():
                media[key] += values
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            out = self.processor(
                text=prompts,
                images=media["images"] or None,
                videos=media["videos"] or None,
                audios=media["audios"] or None,
                padding=True,
                return_tensors="pt",
            )
        finally:
            self.tokenizer.padding_side = side
        return dict(out)


def _count_clips(text: str) -> int:
    return text.count("<speech>") + text.count("<audio>")


__all__ = [
    "MEDIA_INPUTS",
    "MEDIA_LISTS",
    "MEDIA_TYPES",
    "UniMoeCollator",
    "example_media",
    "example_modalities",
    "filter_modality",
    "load_audio",
    "load_image",
    "load_uni_moe_jsonl",
    "load_video",
    "media_order",
    "normalize_messages",
]
