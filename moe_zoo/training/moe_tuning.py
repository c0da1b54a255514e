"""MoE-LLaVA's three-stage MoE-tuning with the Trainer (``training_scripts/moe_tuning.py``).

The stages, as the original scripts (``scripts/v1/*/{pretrain,finetune,finetune_moe}.sh``) run them:

- **Stage I** (``pretrain.sh``): a pretrained vision tower and a pretrained LLM joined by a fresh MLP projector
  (:func:`build_dense_moe_llava`); only the projector trains (lr 1e-3). The original formats this stage's data with
  LLaVA's ``plain`` template (``<image>{caption}\\n``, the question dropped); ``conversation="plain"`` does the same
  and is this stage's default.
- **Stage II** (``finetune.sh``): from stage I's output, the whole LLM and the projector train (lr 2e-5); the vision
  tower stays frozen. The conversation template from here on is the original's
  ``{system} USER: <image>\\n{question} ASSISTANT: {answer}{eos}``.
- **Stage III** (``finetune_moe.sh``): stage II's output is upcycled (:func:`moe_zoo.upcycle_moe_llava`: every
  other FFN becomes 4 copies of itself behind a fresh top-2 router) and trained with the router loss (DeepSpeed's
  top-1 GShard loss summed over layers, coefficient 0.01) added to the LM loss (lr 2e-5). What trains is set by
  :func:`set_trainable` (the FFNs of every layer, the routers, the projector).

Each stage is one call of :func:`run_stage`: build or load the model, freeze it as the stage requires, train with
the ``Trainer``, and save model and processor into ``output_dir`` (loadable with ``AutoModelForImageTextToText`` /
``AutoProcessor`` after ``import moe_zoo``). A stopped stage continues where it stopped with
``resume_from_checkpoint`` (``True``/``"true"``: the last checkpoint in ``output_dir``, or a checkpoint path).
:func:`run_all_stages` chains the three into ``output_dir/stage{1,2,3}``.

QLoRA mode (``MoeTuningArguments.load_in_4bit`` / ``load_in_8bit``, ``qlora_rank``): a stage trains its set on a
bitsandbytes base, LoRA on the quantized weights it covers (per-expert LoRA on the expert banks) and its
full-precision parameters directly, and saves the LoRA merged onto the dequantized base as a full-precision folder
(:mod:`moe_zoo.training.qlora`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from PIL import Image
from transformers import (
    AddedToken,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from ..atomic_io import atomic_write_text
from ..core.options import parse_moe_layers
from ..modeling.moe_llava import (
    MoeLlavaConfig,
    MoeLlavaForConditionalGeneration,
    MoeLlavaProcessor,
    upcycle_moe_llava,
)
from .qlora import merge_qlora, quantize_in_memory, show_adapters_to_trainer
from .routing_stats import RoutingStatsTrainer
from .stage_utils import (
    IGNORE_INDEX,
    chat_segments,
    pad_right,
    resume_point,
    set_trainable_by_patterns,
    wants_resume,
    with_stage_defaults,
)

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# --- what each stage trains ------------------------------------------------------------------------------------------

_PROJECTOR = r"model\.multi_modal_projector\."

STAGE_TRAINABLE: dict[int, tuple[str, ...]] = {
    1: (_PROJECTOR,),
    2: (_PROJECTOR, r"model\.language_model\.", r"lm_head\."),
    3: (_PROJECTOR, r"model\.language_model\.(?:.+\.)?mlp\."),
}
"""Per stage, the regular expressions (matched at the start of a parameter name of
``MoeLlavaForConditionalGeneration``) of the parameters that train; every other parameter is frozen.

- 1: the projector only (the original's ``--tune_mm_mlp_adapter True``: ``model.requires_grad_(False)``, then the
  projector's parameters back on).
- 2: the projector and the whole language model (embeddings, attention, norms, FFNs, LM head); the vision tower is
  frozen (the original loads it with ``requires_grad_(False)``).
- 3: the projector and everything under ``.mlp.`` in the language model: the experts and routers (``.mlp.gate.``)
  of the MoE layers **and** the dense FFNs of the other layers. The original freezes every parameter whose name
  contains none of ``--train_modules fc1 fc2 wg`` (``gate_proj up_proj down_proj wg`` for StableLM, ``mlp.w1
  mlp.w2 mlp.c_proj wg`` for Qwen); those substrings name the FFN projections of every layer, dense or expert, and
  the router (``deepspeed_moe.gate.wg``). ``initialize_vision_modules`` then sets the projector trainable again
  (its "in case it is frozen by LoRA" branch), and the vision tower, loaded after that rule ran, stays frozen.
  Attention, norms, embeddings and the LM head are frozen.
"""

DEFAULT_LEARNING_RATES = {1: 1e-3, 2: 2e-5, 3: 2e-5}
"""The original scripts' learning rates, used when ``TrainingArguments.learning_rate`` is left at its default."""

DEFAULT_QLORA_RANK = 8
"""The LoRA rank of a QLoRA stage (``load_in_4bit`` / ``load_in_8bit``) when ``qlora_rank`` is not set."""


def _check_stage(stage: int) -> int:
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage must be 1, 2 or 3 (MoE-tuning's stages), got {stage!r}.")
    return int(stage)


def set_trainable(
    model: MoeLlavaForConditionalGeneration,
    stage: int,
    qlora_rank: int | None = None,
    qlora_alpha: float | None = None,
) -> list[str]:
    """Freeze ``model`` except what MoE-tuning ``stage`` trains (see :data:`STAGE_TRAINABLE`); return the names of
    the trainable parameters, in the model's order. On a quantized model the set needs ``qlora_rank`` (QLoRA: LoRA
    on the quantized weights it covers, the rest of it trained directly; see
    :func:`~moe_zoo.training.stage_utils.set_trainable_by_patterns`).

    Stage 3 needs the upcycled model: a model without MoE blocks raises ``ValueError``.
    """
    stage = _check_stage(stage)
    if stage == 3 and not model.moe_blocks():
        raise ValueError(
            "Stage 3 trains the upcycled model, but this model has no MoE layer; upcycle the stage-2 model with "
            "moe_zoo.upcycle_moe_llava first."
        )
    return set_trainable_by_patterns(
        model, STAGE_TRAINABLE[stage], f"MoE-tuning stage {stage}", qlora_rank=qlora_rank, qlora_alpha=qlora_alpha
    )


# --- stage I's model: pretrained vision tower + pretrained LLM + fresh projector ------------------------------------


def _vision_sub_config(config: PreTrainedConfig, where: str) -> PreTrainedConfig:
    """The vision tower's config: ``config`` itself (``CLIPVisionConfig``, ``SiglipVisionConfig``, ...), or the
    ``vision_config`` of a full CLIP / SigLIP config."""
    if not (hasattr(config, "image_size") and hasattr(config, "patch_size")):
        sub = getattr(config, "vision_config", None)
        if isinstance(sub, PreTrainedConfig):
            config = sub
    if not (hasattr(config, "image_size") and hasattr(config, "patch_size")):
        raise ValueError(
            f"{where} holds a {config.model_type!r} model, not a vision tower: expected a CLIPVisionModel / "
            "SiglipVisionModel folder (or a CLIP / SigLIP model folder, whose vision model is used)."
        )
    return config


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_vision_tower(
    vision_tower_path_or_config: str | Path | PreTrainedConfig | None, image_processor: Any = None
) -> tuple[PreTrainedModel, Any]:
    """The vision tower and its image processor.

    A folder (a ``CLIPVisionModel`` / ``SiglipVisionModel`` one, or a full CLIP / SigLIP model, whose vision model is
    loaded, as the original does with ``openai/clip-vit-large-patch14-336``) gives the pretrained tower and the
    folder's image processor (unless ``image_processor`` is given). A vision config gives a randomly initialised
    tower and needs ``image_processor``. Anything else raises ``ValueError`` saying what is missing.
    """
    if vision_tower_path_or_config is None:
        raise ValueError(
            "The vision tower is missing: pass a local CLIPVisionModel / SiglipVisionModel folder (or a vision config "
            "and an image processor)."
        )
    if isinstance(vision_tower_path_or_config, PreTrainedConfig):
        vision_config = _vision_sub_config(vision_tower_path_or_config, "the given config")
        if image_processor is None:
            raise ValueError("A vision config builds a random tower and has no image processor; pass image_processor.")
        return AutoModel.from_config(vision_config), image_processor
    folder = Path(vision_tower_path_or_config)
    if not folder.is_dir():
        raise ValueError(f"The vision tower folder {folder} does not exist (expected a local CLIP / SigLIP folder).")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"The vision config is missing: {folder} has no config.json (expected a local CLIPVisionModel / "
            "SiglipVisionModel folder saved with save_pretrained)."
        )
    vision_config = _vision_sub_config(AutoConfig.from_pretrained(folder), str(folder))
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ValueError(f"{folder} holds no vision model weights (none of {_WEIGHT_FILES}).")
    tower, info = AutoModel.from_pretrained(folder, config=vision_config, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{folder} holds no complete vision model: {len(missing)} weights missing, e.g. {missing[:3]}."
        )
    if image_processor is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{folder} has no image processor (preprocessor_config.json); save one there or pass image_processor."
            ) from error
    return tower, image_processor


def _extra_vision_tokens(tower: torch.nn.Module) -> int:
    """Tokens the tower outputs besides its patches (CLIP's CLS: 1; SigLIP: 0)."""
    for module in tower.modules():
        if hasattr(module, "num_positions") and hasattr(module, "num_patches"):
            return int(module.num_positions) - int(module.num_patches)
    return 0


def _load_tokenizer(tokenizer: PreTrainedTokenizerBase | str | Path | None, default: str | Path):
    if tokenizer is None:
        tokenizer = default
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # the original pads with unk
    tokenizer.padding_side = "right"
    return tokenizer


def build_dense_moe_llava(
    vision_tower_path_or_config: str | Path | PreTrainedConfig | None,
    language_model_path: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    image_processor: Any = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
) -> tuple[MoeLlavaForConditionalGeneration, MoeLlavaProcessor]:
    """Stage I's starting model: the pretrained vision tower and LLM joined by a fresh projector.

    Returns a dense ``MoeLlavaForConditionalGeneration`` (``moe_layers="none"``, fp32) whose vision tower and language
    model (LM head included) are copies of the given ones, and a ``MoeLlavaProcessor`` built from the vision
    folder's image processor and ``tokenizer`` (a tokenizer or a path; default: the LLM folder's). ``<image>`` is
    added to the tokenizer as a special token (embeddings and LM head grow by one mean-initialised row;
    ``config.image_token_id`` is its id). The tokenizer pads on the right with its pad token, else unk, else EOS.
    Features are ``hidden_states[vision_feature_layer]`` with the CLS token dropped (``"default"``), as the
    original's ``mm_vision_select_layer -2`` / ``patch``.
    """
    tower, image_processor = load_vision_tower(vision_tower_path_or_config, image_processor)
    llm_folder = Path(language_model_path)
    if not (llm_folder / "config.json").is_file():
        raise ValueError(f"The language model folder {llm_folder} has no config.json (expected a local causal LM).")
    tokenizer = _load_tokenizer(tokenizer, llm_folder)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llm = AutoModelForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)

    vision_config = tower.config
    extra = _extra_vision_tokens(tower)
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    image_seq_length = num_patches + extra - (1 if vision_feature_select_strategy == "default" else 0)
    config = MoeLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=llm.config.to_dict(),
        moe_layers="none",
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
    )
    model = MoeLlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(getattr(llm, llm.base_model_prefix).state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    generation_config = copy.deepcopy(llm.generation_config)
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.suppress_tokens = [image_token_id]  # image features replace it; it is never an output
    model.generation_config = generation_config
    processor = MoeLlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=extra,
    )
    return model, processor


# --- data ------------------------------------------------------------------------------------------------------------


def _load_image(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _example_images(example: dict) -> list:
    if example.get("images") is not None:
        return [_load_image(image) for image in example["images"]]
    if example.get("image") is not None:
        return [_load_image(example["image"])]
    return []


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def _count_images(messages: list[dict]) -> int:
    return sum(
        1 for m in messages if not isinstance(m["content"], str) for part in m["content"] if part.get("type") == "image"
    )


def example_messages(example: dict) -> list[dict]:
    """An example as chat messages: ``{"question", "answer"}`` becomes a user turn (an image part first when the
    example has an image) and an assistant turn; ``{"messages": [...]}`` is used as is, with an image part put at
    the start of the first user turn when the example has an image and no message holds one."""
    if "messages" in example:
        messages = [dict(m) for m in example["messages"]]
    elif "question" in example:
        messages = [{"role": "user", "content": [{"type": "text", "text": example["question"]}]}]
        if example.get("answer") is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": example["answer"]}]})
    else:
        raise ValueError(f"An example needs 'question' (and 'answer') or 'messages', got keys {sorted(example)}.")
    has_image = example.get("image") is not None or bool(example.get("images"))
    if has_image and _count_images(messages) == 0:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("An example with an image needs a user turn to put it in.")
        content = messages[first_user]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        count = len(example["images"]) if example.get("images") else 1
        messages[first_user] = {**messages[first_user], "content": [{"type": "image"}] * count + parts}
    return messages


class MoeLlavaCollator:
    """Batches ``{"image": PIL image / array / path, "question": str, "answer": str}`` examples (or ``{"image",
    "messages": [...]}`` in chat format; ``"images"`` for several, none for text-only) for MoE-tuning.

    ``conversation="chat"`` renders the processor's chat template (the original's ``{system} USER: <image>\\n{q}
    ASSISTANT: {a}{eos}``); ``labels`` are -100 on the system prompt, the user turns, ``ASSISTANT:`` and padding, so
    only the answers and their EOS are supervised. ``conversation="plain"`` is LLaVA's stage-I format:
    ``<image>{answer}\\n``, the question dropped, the answer and ``\\n`` supervised.

    The text is tokenized in pieces (the prompt, then each answer), so the prompt's tokens are exactly those
    :func:`answer_questions` gives the model at inference. ``<image>`` is expanded to the number of image features.
    Padding is on the right; sequences longer than ``max_length`` are cut at the end (an example whose image
    placeholders would be cut raises ``ValueError``).
    """

    def __init__(self, processor: MoeLlavaProcessor, max_length: int = 2048, conversation: str = "chat"):
        if conversation not in ("chat", "plain"):
            raise ValueError(f"conversation must be 'chat' or 'plain', got {conversation!r}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.conversation = conversation

    def segments(self, example: dict) -> list[tuple[str, bool]]:
        """The example's text as ``(piece, supervised)`` pieces, in order."""
        messages = example_messages(example)
        if self.conversation == "plain":
            answer = next((m for m in messages if m["role"] == "assistant"), None)
            if answer is None:
                raise ValueError("A 'plain' example needs an answer (the caption).")
            images = IMAGE_TOKEN * max(1, _count_images(messages))
            return [(images, False), (_text_of(answer["content"]) + "\n", True)]
        return chat_segments(self.processor.apply_chat_template, messages)

    def prompt(self, example: dict) -> str:
        """The text the model sees before it answers (the chat template's generation prompt, or ``<image>``)."""
        messages = example_messages(example)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if self.conversation == "plain":
            return IMAGE_TOKEN * max(1, _count_images(messages))
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        processor = self.processor
        height, width = pixel_values.shape[-2:]
        count = (height // processor.patch_size) * (width // processor.patch_size)
        count += processor.num_additional_image_tokens
        return count - (1 if processor.vision_feature_select_strategy == "default" else 0)

    def encode(self, example: dict, pixel_values: torch.Tensor | None) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example; ``pixel_values`` are its images' (to count their features)."""
        image_token = self.processor.image_token
        counts = [self._num_image_tokens(p) for p in pixel_values] if pixel_values is not None else []
        input_ids, labels = [], []
        for number, (piece, supervised) in enumerate(self.segments(example)):
            parts = piece.split(IMAGE_TOKEN)
            if len(parts) - 1 > len(counts):
                raise ValueError(f"The example's text has more {IMAGE_TOKEN} placeholders than it has images.")
            expanded = parts[0]
            for part in parts[1:]:
                expanded += image_token * counts.pop(0) + part
            ids = self.tokenizer(expanded, add_special_tokens=number == 0)["input_ids"]
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        if counts:
            raise ValueError(f"The example has {len(counts)} image(s) without an {IMAGE_TOKEN} placeholder.")
        if len(input_ids) > self.max_length:
            image_id = self.processor.image_token_id
            if image_id in input_ids[self.max_length :]:
                raise ValueError(
                    f"An example's image placeholders end beyond max_length={self.max_length}; raise max_length."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        images = [_example_images(example) for example in examples]
        flat = [image for group in images for image in group]
        pixel_values = None
        if flat:
            pixel_values = self.processor.image_processor(images=flat, return_tensors="pt")["pixel_values"]
        encoded, start = [], 0
        for example, group in zip(examples, images, strict=True):
            own = pixel_values[start : start + len(group)] if group else None
            start += len(group)
            encoded.append(self.encode(example, own))
        batch = pad_right(encoded, self.tokenizer.pad_token_id)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch


def load_image_qa_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """Read a JSONL file of ``{"image": path, "question": str, "answer": str}`` (or ``"messages"`` instead of
    question/answer, ``"images"`` for several images, no image for text-only examples). Relative image paths are
    resolved against ``image_root`` (default: the file's folder); images are opened when batched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (expected a .jsonl of image QA examples).")
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" not in row and not ("question" in row and "answer" in row):
            raise ValueError(
                f"{path}, line {number}: expected 'question' and 'answer', or 'messages'; got {sorted(row)}."
            )
        for key in ("image", "images"):
            if row.get(key) is None:
                continue
            paths = [row[key]] if key == "image" else row[key]
            resolved = [str(p if Path(p).is_absolute() else root / p) for p in paths]
            missing = [p for p in resolved if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"{path}, line {number}: image file {missing[0]} does not exist.")
            row[key] = resolved[0] if key == "image" else resolved
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no examples.")
    return rows


# --- stages ----------------------------------------------------------------------------------------------------------


@dataclass
class MoeTuningArguments:
    """One MoE-tuning stage: where its model comes from and, for stage 3, the MoE (the original's stage-III
    settings by default). The Trainer's own options come from ``TrainingArguments``; its ``learning_rate`` left at
    the default (5e-5) means the original's per-stage rate (1e-3, 2e-5, 2e-5)."""

    stage: int = field(default=1, metadata={"help": "1 (projector), 2 (LLM + projector) or 3 (MoE)."})
    vision_tower: str | None = field(
        default=None,
        metadata={"help": "Stage 1: local CLIPVisionModel / SiglipVisionModel folder (+ image processor)."},
    )
    language_model: str | None = field(
        default=None, metadata={"help": "Stage 1: local causal-LM folder; default: the shipped SmolLM2-135M-Instruct."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Stage 1: tokenizer folder; default: the LLM's."})
    init_model: str | None = field(
        default=None, metadata={"help": "Stages 2 and 3: the previous stage's output folder."}
    )
    conversation: str | None = field(
        default=None,
        metadata={
            "help": "'plain' (<image>{answer}\\n) or 'chat'; default: plain for stage 1, chat after (the original's)."
        },
    )
    max_length: int = field(default=2048, metadata={"help": "Longest tokenized example (model_max_length)."})
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    num_experts: int = 4
    top_k: int = 2
    moe_layers: str = field(
        default="sparse", metadata={"help": "sparse, all, first_half, second_half, or comma-separated layer indices."}
    )
    capacity_factor: float | None = 1.5
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 0
    router_aux_loss_coef: float = 0.01
    aux_loss_type: str = "gshard_top1_sum"
    router_second_expert_gumbel: bool = field(
        default=False, metadata={"help": "DeepSpeed's random second expert (the original's gate, at inference too)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: train the stage on a bitsandbytes 4-bit base (nn.Linear layers and expert banks); its "
            "quantized weights get LoRA of rank qlora_rank, the rest of its trainable set trains directly, and the "
            "saved model is the merged full-precision one."
        },
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "QLoRA on an 8-bit (LLM.int8) base instead."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "4-bit: quantize the absmax statistics too (QLoRA's double quantization)."}
    )
    qlora_rank: int | None = field(
        default=None, metadata={"help": "QLoRA: LoRA rank on the quantized weights (default 8 when quantized)."}
    )
    qlora_alpha: float | None = field(
        default=None, metadata={"help": "QLoRA: LoRA alpha (scaling alpha / rank); default 2 * qlora_rank."}
    )

    def __post_init__(self):
        _check_stage(self.stage)
        if self.conversation is not None and self.conversation not in ("chat", "plain"):
            raise ValueError(f"conversation must be 'chat', 'plain' or None, got {self.conversation!r}.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("Set one of load_in_4bit and load_in_8bit, not both.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}.")
        if self.qlora_rank is not None and self.qlora_rank < 1:
            raise ValueError(f"qlora_rank must be >= 1, got {self.qlora_rank}.")
        if self.qlora_alpha is not None and self.qlora_alpha <= 0:
            raise ValueError(f"qlora_alpha must be > 0, got {self.qlora_alpha}.")
        if (self.qlora_rank is not None or self.qlora_alpha is not None) and not self.qlora:
            raise ValueError(
                "qlora_rank / qlora_alpha train LoRA on a quantized base: set load_in_4bit or load_in_8bit too (or "
                "drop them to train the stage in full precision)."
            )

    @property
    def qlora(self) -> bool:
        """Whether the stage trains QLoRA-style on a quantized base."""
        return self.load_in_4bit or self.load_in_8bit

    @property
    def resolved_qlora_rank(self) -> int | None:
        """The LoRA rank of a QLoRA stage (8 unless set), None for a full-precision one."""
        return (self.qlora_rank or DEFAULT_QLORA_RANK) if self.qlora else None

    def quantization_config(self) -> BitsAndBytesConfig | None:
        """The ``BitsAndBytesConfig`` a QLoRA stage loads its model with (fp32 compute), None otherwise."""
        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        if self.load_in_4bit:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype=torch.float32,
            )
        return None

    @property
    def resolved_conversation(self) -> str:
        return self.conversation or ("plain" if self.stage == 1 else "chat")

    def moe_options(self) -> dict[str, Any]:
        """The stage-III options for :func:`moe_zoo.upcycle_moe_llava`."""
        return {
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "moe_layers": parse_moe_layers(self.moe_layers) if isinstance(self.moe_layers, str) else self.moe_layers,
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "min_capacity": self.min_capacity,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "aux_loss_type": self.aux_loss_type,
            "router_second_expert_gumbel": self.router_second_expert_gumbel,
            "output_router_logits": True,
        }


def _load_previous_stage(folder: str | None, stage: int):
    if folder is None:
        raise ValueError(f"Stage {stage} starts from stage {stage - 1}'s output: set init_model to its folder.")
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"init_model {folder} holds no model (no config.json); run stage {stage - 1} first.")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    if not isinstance(model, MoeLlavaForConditionalGeneration):
        raise ValueError(f"init_model {folder} holds a {type(model).__name__}, not a MoE-LLaVA model.")
    if model.moe_blocks():
        raise ValueError(
            f"init_model {folder} is already an MoE model; stages 2 and 3 start from the dense output of the stage "
            "before (to continue a stopped run, use resume_from_checkpoint)."
        )
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "right"
    return model, processor


def prepare_stage_model(
    args: MoeTuningArguments, seed: int = 42
) -> tuple[MoeLlavaForConditionalGeneration, MoeLlavaProcessor]:
    """The model a stage starts from (trainable parameters set) and its processor: stage 1 builds it from the vision
    tower and the LLM, stage 2 loads stage 1's output, stage 3 loads stage 2's and upcycles it (router loss on).
    ``seed`` fixes the fresh projector / routers, so a resumed run rebuilds the same model before the checkpoint's
    weights are loaded."""
    stage = _check_stage(args.stage)
    set_seed(seed)
    if stage == 1:
        language_model = args.language_model
        if language_model is None:
            from ..assets import smollm2_path

            language_model = smollm2_path()
        model, processor = build_dense_moe_llava(
            args.vision_tower,
            language_model,
            args.tokenizer,
            vision_feature_layer=args.vision_feature_layer,
            vision_feature_select_strategy=args.vision_feature_select_strategy,
        )
    else:
        model, processor = _load_previous_stage(args.init_model, stage)
        if stage == 3:
            model = upcycle_moe_llava(model, **args.moe_options())
            model.config.output_router_logits = True
    if args.qlora:
        # Quantize what this stage built or upcycled in full precision, then prepare it for k-bit training as PEFT
        # does (frozen, non-quantized half-precision parameters upcast); run_stage enables input gradients when
        # the Trainer checkpoints activations.
        model = quantize_in_memory(model, args.quantization_config(), AutoModelForImageTextToText)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    trainable = set_trainable(model, stage, args.resolved_qlora_rank, args.qlora_alpha)
    counts = [sum(p.numel() for n, p in model.named_parameters() if n in trainable), model.num_parameters()]
    logger.info("MoE-tuning stage %d: %d of %d parameters train (%d tensors)", stage, *counts, len(trainable))
    return model, processor


def stage_training_arguments(
    training_args: TrainingArguments, stage: int, output_dir: str | Path | None = None
) -> TrainingArguments:
    """A copy of ``training_args`` for ``stage``: the original's learning rate when the Trainer's default is left,
    ``remove_unused_columns=False`` (the collator needs the raw examples), and ``output_dir`` when given."""
    defaults = {"learning_rate": DEFAULT_LEARNING_RATES[stage]}
    return with_stage_defaults(training_args, defaults, f"MoE-tuning stage {stage}", output_dir)


MOE_TUNING_STAGES = {
    1: ("MoE-tuning stage I", "the projector learns to map image features into the language model (captions)"),
    2: ("MoE-tuning stage II", "the dense language model and the projector learn from multimodal instructions"),
    3: ("MoE-tuning stage III", "upcycled into MoE layers; experts, routers and projector train with the router loss"),
}
"""The stages a stage's model card lists: it and the ones before it, whose output it started from."""

STAGE_MARKER = "moe_tuning_stage.json"
"""Written into a stage's output folder once its model and processor are saved."""


def run_stage(
    args: MoeTuningArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    callbacks: Iterable[TrainerCallback] | None = None,
) -> Trainer:
    """Run one MoE-tuning stage: prepare its model (:func:`prepare_stage_model`), train it with a
    :class:`~moe_zoo.training.routing_stats.RoutingStatsTrainer` (the ``Trainer``, plus ``aux_loss`` and
    ``expert_load_max_ratio`` in stage III's logs, reduced over processes under ``torchrun``), resuming from
    ``training_args.resume_from_checkpoint`` when set, and save model, processor and :data:`STAGE_MARKER` (with the
    run's expert counts in stage III) into ``training_args.output_dir``. ``train_dataset`` holds raw examples for
    :class:`MoeLlavaCollator` (a list of dicts or a ``datasets.Dataset``). Returns the Trainer."""
    training_args = stage_training_arguments(training_args, args.stage)
    if args.qlora and wants_resume(training_args.resume_from_checkpoint) is not False:
        raise ValueError(
            "A QLoRA stage (load_in_4bit / load_in_8bit) cannot resume: restoring a Trainer checkpoint's packed "
            "4-/8-bit weights into a quantized model is not implemented. Start the stage over."
        )
    resume = resume_point(training_args.resume_from_checkpoint, training_args.output_dir, required=True)
    model, processor = prepare_stage_model(args, seed=training_args.seed)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: keep a graph through checkpointed layers
    collator = MoeLlavaCollator(processor, args.max_length, args.resolved_conversation)
    hide_adapters = show_adapters_to_trainer(model) if args.qlora else None  # the Trainer's quantization check
    trainer = RoutingStatsTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=list(callbacks or []),
    )
    if hide_adapters is not None:
        hide_adapters()
    trainer.train(resume_from_checkpoint=resume)
    if args.qlora:  # the stage's output is a full model folder: LoRA merged onto the dequantized base
        model = merge_qlora(model)
        trainer.model = trainer.model_wrapped = model
    model.card_details = {"training_stages": [MOE_TUNING_STAGES[i] for i in range(1, args.stage + 1)]}
    trainer.save_model()  # the model, its card and the processor (the Trainer's processing_class), main process only
    if trainer.is_world_process_zero():
        marker = {"stage": args.stage, "global_step": trainer.state.global_step, "arguments": asdict(args)}
        if trainer.expert_counts:  # summed over processes: the global batch's counts
            marker["expert_counts"] = {name: counts.tolist() for name, counts in trainer.expert_counts.items()}
        atomic_write_text(Path(training_args.output_dir) / STAGE_MARKER, json.dumps(marker, indent=2))
    # The next stage (or the caller) reads this folder in every process: none goes on before the main one wrote it.
    trainer.accelerator.wait_for_everyone()
    return trainer


def run_all_stages(
    args: MoeTuningArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    stage_datasets: dict[int, Any] | None = None,
    callbacks: Iterable[TrainerCallback] | None = None,
) -> list[Trainer | None]:
    """Stages 1, 2 and 3 in sequence, into ``output_dir/stage1``, ``stage2``, ``stage3``, each starting from the one
    before (``args.stage`` and ``args.init_model`` are ignored). ``train_dataset`` serves every stage unless
    ``stage_datasets`` names one for a stage (the original uses different data per stage). With
    ``resume_from_checkpoint`` true, finished stages (those holding :data:`STAGE_MARKER`) are skipped (``None`` in
    the returned list) and a stopped one continues from its last checkpoint, or starts over if it saved none."""
    resume_all = wants_resume(training_args.resume_from_checkpoint)
    if resume_all is None:
        raise ValueError("run_all_stages resumes with resume_from_checkpoint=true; a checkpoint path names one stage.")
    root = Path(training_args.output_dir)
    trainers: list[Trainer | None] = []
    for stage in (1, 2, 3):
        stage_dir = root / f"stage{stage}"
        if resume_all and (stage_dir / STAGE_MARKER).is_file():
            logger.info("MoE-tuning stage %d already finished in %s; skipped", stage, stage_dir)
            trainers.append(None)
            continue
        init_model = str(root / f"stage{stage - 1}") if stage > 1 else None
        stage_args = MoeTuningArguments(**{**asdict(args), "stage": stage, "init_model": init_model})
        per_stage = stage_training_arguments(training_args, stage, stage_dir)
        per_stage.resume_from_checkpoint = resume_point(True, stage_dir, required=False) if resume_all else None
        data = (stage_datasets or {}).get(stage, train_dataset)
        trainers.append(run_stage(stage_args, per_stage, data, callbacks=callbacks))
    return trainers


# --- evaluation ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_questions(
    model: MoeLlavaForConditionalGeneration,
    processor: MoeLlavaProcessor,
    examples: Sequence[dict],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    conversation: str = "chat",
) -> list[str]:
    """Greedy answers to ``examples`` (``{"image", "question"}`` or ``{"image", "messages"}``; an assistant turn at
    the end, like an answer key, is ignored): the prompt is the chat template's generation prompt (``"plain"``:
    ``<image>``, the answer ending at the first newline), as the collator builds it. Answers are stripped."""
    collator = MoeLlavaCollator(processor, conversation=conversation)
    tokenizer = processor.tokenizer
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            prompts = [collator.prompt(example) for example in batch]
            images = [image for example in batch for image in _example_images(example)]
            inputs = processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
            inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                output_router_logits=False,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                answers.append(text.split("\n")[0].strip() if conversation == "plain" else text.strip())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


__all__ = [
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_QLORA_RANK",
    "STAGE_MARKER",
    "STAGE_TRAINABLE",
    "MoeLlavaCollator",
    "MoeTuningArguments",
    "answer_questions",
    "build_dense_moe_llava",
    "example_messages",
    "load_image_qa_jsonl",
    "load_vision_tower",
    "prepare_stage_model",
    "run_all_stages",
    "run_stage",
    "set_trainable",
    "stage_training_arguments",
]
