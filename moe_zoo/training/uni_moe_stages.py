"""Uni-MoE's progressive training with the Trainer (``training_scripts/train_uni_moe.py``), in three stages.

The original released only the stage-3 script (``finetune_speech.sh``); stages 1 and 2 follow its README table and
the maintainers' word that they "can be done by removing the MoE structure" (issue #9):

- **Stage 1, connector alignment** (:func:`run_stage1`), one run per modality in sequence, each starting from the
  one before: a *dense* Uni-MoE (:func:`build_dense_uni_moe`: a pretrained LLM, vision tower, Whisper for speech,
  optionally an audio encoder; the speech aligner's decoder starts as Whisper's decoder, as the original's
  ``WhisperModel.from_pretrained(...).decoder``) trains only the connector of the modality being aligned on
  captions / transcripts (image: ``multi_modal_projector``; speech: ``speech_connector``, i.e. queries, decoder
  and projector; audio: ``audio_connector``).
- **Stage 2, modality-specific experts** (:func:`run_stage2`): from stage 1's model, PEFT LoRA on the LLM's
  attention and FFN projections plus that modality's projector train on single-modality data ("LoRA + relevant
  projection"); the LoRA is merged, and the dense model's FFNs become that modality's expert.
- **Stage 3, MoE integration** (:func:`run_stage3`): :func:`~moe_zoo.modeling.uni_moe.upcycle_uni_moe` builds the
  MoE from stage 1's model, each expert the FFN of one source (``base``: stage 1's own FFN, the original's LLaVA /
  Vicuna MLP; else a stage-2 model). PEFT LoRA (r=8, alpha=16, dropout 0.05) on the attention projections and on
  every expert's projections (PEFT ``target_parameters`` on the 3D expert banks: one LoRA per expert), with the
  routers and the media projectors trained fully (PEFT ``modules_to_save``, so checkpoints hold them), on mixed
  data; lr 4e-5, cosine, warmup 0.03, as ``finetune_speech.sh``. The router loss and the expert load are logged
  (:class:`~moe_zoo.training.routing_stats.RoutingStatsTrainer`). At the end the LoRA is merged (the original's
  ``merge_and_unload`` at inference) into a plain Uni-MoE checkpoint.

Every run is resumable (``resume_from_checkpoint``: true for the last checkpoint of ``output_dir``, or a path) and
ends in a folder that ``AutoModelForMultimodalLM`` / ``AutoProcessor.from_pretrained`` load after
``import moe_zoo``, saved atomically, with :data:`STAGE_MARKER` written last. :func:`run_all_stages` chains them into
``output_dir/stage1/<modality>``, ``output_dir/stage2/<name>`` and ``output_dir/stage3``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from torch import nn
from transformers import (
    AddedToken,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
    Blip2QFormerConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from ..atomic_io import atomic_write_text, save_files_atomically
from ..modeling.uni_moe import UniMoeConfig, UniMoeForConditionalGeneration, UniMoeProcessor, upcycle_uni_moe
from ..modeling.uni_moe.configuration_uni_moe import audio_hidden_size
from .distributed import DistributedTrainer, unsharded_copy
from .moe_tuning import load_vision_tower
from .routing_stats import RoutingStatsTrainer
from .stage_utils import resume_point, set_trainable_by_patterns, wants_resume, with_stage_defaults
from .uni_moe_data import MEDIA_TYPES, UniMoeCollator, filter_modality

logger = logging.getLogger(__name__)

STAGES = (1, 2, 3)

CONNECTORS = {
    "image": "model.multi_modal_projector",
    "video": "model.multi_modal_projector",
    "speech": "model.speech_connector",
    "audio": "model.audio_connector",
}
"""Stage 1's trainable module per modality (videos go through the image path, so they align its projector)."""

PROJECTORS = {
    "image": "model.multi_modal_projector",
    "video": "model.multi_modal_projector",
    "speech": "model.speech_connector.projector",
    "audio": "model.audio_connector.projector",
}
"""The media projectors stages 2 and 3 train fully. For speech and audio that is the linear projector after the
Q-Former only (the original's ``--tune_mm_audio_projector`` unfreezes ``mm_audio_aligner.projector``; the Whisper
decoder stays frozen after stage 1)."""

ENCODERS = {"image": "vision_tower", "video": "vision_tower", "speech": "speech_encoder", "audio": "audio_encoder"}

LLM_ATTENTION = r"model\.language_model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
LLM_FFN = r"model\.language_model\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2)"
"""PEFT ``target_modules`` (full-match regular expressions): the LLM's attention and dense FFN projections, not
those of the vision tower, the Whisper encoders or the speech aligner's decoder (which use the same names)."""

EXPERT_PARAMETERS = {
    True: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    False: ["mlp.experts.up_proj", "mlp.experts.down_proj"],
}
"""PEFT ``target_parameters`` of gated / plain expert banks: per-expert LoRA on the 3D weights."""

ROUTER = "mlp.gate"

STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"learning_rate": 1e-3},
    2: {"learning_rate": 2e-4},
    3: {"learning_rate": 4e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.03},
}
"""What a stage uses for ``TrainingArguments`` fields left at the Trainer's defaults. Stage 3 is the original's
``finetune_speech.sh``; stages 1 and 2 were never released, so they take LLaVA-1.5's connector-pretraining rate
(1e-3) and its LoRA fine-tuning rate (2e-4)."""

STAGE_MARKER = "uni_moe_stage.json"
"""Written into a run's output folder once its model and processor are saved."""


def _check_modality(modality: str | None, what: str = "modality") -> str:
    if modality not in MEDIA_TYPES:
        raise ValueError(f"Unknown {what} {modality!r}; expected one of {MEDIA_TYPES}.")
    return modality


def _split(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


# --- arguments -------------------------------------------------------------------------------------------------------


@dataclass
class UniMoeTrainingArguments:
    """One Uni-MoE run (``stage`` 1, 2 or 3) or all of them (``"all"``): where the model comes from, the modality,
    the stage-3 experts and MoE, and the LoRA. The Trainer's own options come from ``TrainingArguments``; fields it
    leaves at their defaults take :data:`STAGE_DEFAULTS`."""

    stage: str = field(default="1", metadata={"help": "1 (connector), 2 (modality expert), 3 (MoE) or all."})
    modality: str | None = field(
        default=None, metadata={"help": "Stages 1 and 2: the modality to align / train an expert for."}
    )
    init_model: str | None = field(
        default=None,
        metadata={
            "help": "Stage 1: a stage-1 output to align another modality on (default: build from the parts below). "
            "Stages 2 and 3: the stage-1 output folder."
        },
    )
    experts: str | None = field(
        default=None,
        metadata={
            "help": "Stage 3: comma-separated expert sources, 'base' (the stage-1 FFN) or a stage-2 folder; with "
            "--stage all, stage-2 names. Default for --stage all: base plus every stage-2 run."
        },
    )
    language_model: str | None = field(
        default=None, metadata={"help": "Stage 1: local causal-LM folder; default: the shipped SmolLM2-135M-Instruct."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Stage 1: tokenizer folder; default: the LLM's."})
    vision_tower: str | None = field(default=None, metadata={"help": "Stage 1: CLIP vision folder (+ processor)."})
    speech_model: str | None = field(default=None, metadata={"help": "Stage 1: Whisper folder (+ feature extractor)."})
    audio_model: str | None = field(default=None, metadata={"help": "Stage 1: audio encoder folder (Whisper)."})
    stage1_modalities: str = field(
        default="image,speech", metadata={"help": "--stage all: the modalities stage 1 aligns, in order."}
    )
    stage2_experts: str = field(
        default="image,speech",
        metadata={"help": "--stage all: stage-2 runs as 'modality' or 'name:modality', comma-separated."},
    )
    max_length: int = field(default=2048, metadata={"help": "Longest tokenized example (the original's 2048)."})
    speech_query_tokens: int = 50
    audio_query_tokens: int = 32
    num_video_frames: int = 8
    max_audio_chunks: int = 4
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "On nn.Linear LoRA (PEFT's parameter LoRA on expert banks cannot drop inputs: 0 there)."},
    )
    num_experts: int | None = field(
        default=None, metadata={"help": "Stage 3: if given, must equal the number of expert sources."}
    )
    top_k: int = 2
    router_type: str = "topk_softmax"
    moe_layers: str = "all"
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Stage 3: balance loss weight (v1 trained without one: 0; 8e: 0.01)."}
    )
    aux_loss_type: str = "gshard_top1_sum"
    capacity_factor: float | None = None

    def __post_init__(self):
        if str(self.stage) not in ("1", "2", "3", "all"):
            raise ValueError(f"stage must be 1, 2, 3 or all, got {self.stage!r}.")
        self.stage = str(self.stage)
        if self.modality is not None:
            _check_modality(self.modality)
        for modality in _split(self.stage1_modalities):
            _check_modality(modality, "stage-1 modality")
        for name, modality in self.stage2_runs():
            _check_modality(modality, f"modality of stage-2 run {name!r}")

    def stage2_runs(self) -> list[tuple[str, str]]:
        """``(name, modality)`` of each stage-2 run of ``--stage all``."""
        runs = []
        for entry in _split(self.stage2_experts):
            name, _, modality = entry.rpartition(":")
            runs.append((name or modality, modality))
        names = [name for name, _ in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"stage2_experts names must differ, got {names}; use 'name:modality' entries.")
        return runs

    def moe_options(self) -> dict[str, Any]:
        """The stage-3 options for :func:`~moe_zoo.modeling.uni_moe.upcycle_uni_moe`."""
        from ..core.options import parse_moe_layers

        options = {
            "num_experts_per_tok": self.top_k,
            "router_type": self.router_type,
            "moe_layers": parse_moe_layers(self.moe_layers) if isinstance(self.moe_layers, str) else self.moe_layers,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "aux_loss_type": self.aux_loss_type,
            "capacity_factor": self.capacity_factor,
            "output_router_logits": True,
        }
        if self.num_experts is not None:
            options["num_experts"] = self.num_experts
        return options


@dataclass
class StageRun:
    """What a run leaves: its Trainer, the final model (LoRA merged for stages 2 and 3), the processor, the output
    folder, and the names of the parameters that trained (in the trained model's naming: PEFT's for 2 and 3)."""

    stage: int
    trainer: Trainer
    model: UniMoeForConditionalGeneration
    processor: UniMoeProcessor
    output_dir: Path
    trainable: list[str]


# --- stage 1's model: pretrained parts + fresh connectors -----------------------------------------------------------


def _load_tokenizer(tokenizer: PreTrainedTokenizerBase | str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # the original pads with unk
    tokenizer.padding_side = "right"
    return tokenizer


def _load_pretrained(source: str | Path, what: str, loader=AutoModel) -> PreTrainedModel:
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ValueError(f"The {what} folder {folder} holds no model (no config.json); expected a local HF folder.")
    return loader.from_pretrained(folder, dtype=torch.float32)


def _audio_parts(source: Any, feature_extractor: Any, what: str, whisper_only: bool) -> tuple[PreTrainedModel, Any]:
    """An audio model (from a folder or given; a Whisper one when ``whisper_only``) and the feature extractor: the
    given one, else the folder's. A Whisper model must read as many mel bins as the extractor makes."""
    model = _load_pretrained(source, what) if isinstance(source, (str, Path)) else source
    if whisper_only and getattr(model.config, "model_type", None) != "whisper":
        raise ValueError(f"The {what} is a {model.config.model_type!r} model; expected a Whisper model.")
    if feature_extractor is None:
        if not isinstance(source, (str, Path)):
            raise ValueError(f"A {what} given as a model has no feature extractor; pass feature_extractor.")
        try:
            feature_extractor = AutoFeatureExtractor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{source} has no feature extractor (preprocessor_config.json); save one there or pass "
                "feature_extractor."
            ) from error
    bins = getattr(model.config, "num_mel_bins", None)
    if bins is not None and feature_extractor.feature_size != bins:
        raise ValueError(
            f"The feature extractor makes {feature_extractor.feature_size} mel bins, but the {what} reads "
            f"num_mel_bins={bins} (speech and audio share one extractor)."
        )
    return model, feature_extractor


def build_dense_uni_moe(
    language_model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    vision_tower: str | Path | PreTrainedModel | None = None,
    image_processor: Any = None,
    speech_model: str | Path | PreTrainedModel | None = None,
    feature_extractor: Any = None,
    audio_model: str | Path | PreTrainedModel | None = None,
    audio_qformer_config: Blip2QFormerConfig | dict | None = None,
    speech_query_tokens: int = 50,
    audio_query_tokens: int = 32,
    num_video_frames: int = 8,
    max_audio_chunks: int = 4,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
) -> tuple[UniMoeForConditionalGeneration, UniMoeProcessor]:
    """Stage 1's starting model: a dense Uni-MoE (``moe_layers="none"``, fp32) from pretrained parts, and its
    processor.

    Args:
        language_model: any HF Llama-like causal LM (a folder or a model); its base model and LM head are copied.
        tokenizer: a tokenizer or folder (default: the LLM folder's). ``<image>``, ``<video>``, ``<speech>`` and
            ``<audio>`` are added as special tokens (ids past the LLM vocabulary are fine: placeholders are never
            embedded). It pads on the right with its pad token, else unk (the original's), else EOS.
        vision_tower, image_processor: a CLIP-style vision folder (with its image processor), or a vision model
            and an image processor. ``None`` leaves images and videos out.
        speech_model, feature_extractor: a Whisper folder (with its feature extractor), or a ``WhisperModel`` /
            ``WhisperForConditionalGeneration`` and a feature extractor. Its encoder becomes ``speech_encoder``,
            and its decoder initialises the speech aligner's decoder (everything but the token embedding, which the
            aligner has a single row of); the learned queries and the projector start fresh. ``None``: no speech.
        audio_model: the general-audio encoder (a Whisper folder or model, whose encoder is used; it reads the same
            log-mel features, so its ``num_mel_bins`` must match the speech model's). ``audio_qformer_config``
            defaults to a 2-layer Q-Former of the encoder's width. ``None``: no audio.
        speech_query_tokens, audio_query_tokens, num_video_frames, max_audio_chunks, vision_feature_layer,
            vision_feature_select_strategy: the Uni-MoE config / processor values (the original's by default).

    Raises ``ValueError`` naming the part that is missing or inconsistent.
    """
    if isinstance(language_model, (str, Path)):
        llm = _load_pretrained(language_model, "language model", AutoModelForCausalLM)
        tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else language_model)
    else:
        if tokenizer is None:
            raise ValueError("A language model given as a model has no tokenizer; pass tokenizer.")
        llm, tokenizer = language_model, _load_tokenizer(tokenizer)
    missing = [f"<{m}>" for m in MEDIA_TYPES if f"<{m}>" not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    token_ids = {f"{m}_token_id": tokenizer.convert_tokens_to_ids(f"<{m}>") for m in MEDIA_TYPES}

    tower = None
    if vision_tower is not None:
        if isinstance(vision_tower, PreTrainedModel):
            if image_processor is None:
                raise ValueError("A vision tower given as a model has no image processor; pass image_processor.")
            tower = vision_tower
        else:
            tower, image_processor = load_vision_tower(vision_tower, image_processor)
    whisper = audio = None
    if speech_model is not None:
        whisper, feature_extractor = _audio_parts(speech_model, feature_extractor, "speech model", whisper_only=True)
    if audio_model is not None:
        audio, feature_extractor = _audio_parts(audio_model, feature_extractor, "audio model", whisper_only=False)
    audio_config = audio.config if audio is not None else None
    if audio_config is not None and audio_qformer_config is None:
        width = audio_hidden_size(audio_config)
        heads = getattr(audio_config, "encoder_attention_heads", None) or audio_config.num_attention_heads
        audio_qformer_config = Blip2QFormerConfig(
            hidden_size=width, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=4 * width
        )
    if isinstance(audio_qformer_config, Blip2QFormerConfig):
        audio_qformer_config = audio_qformer_config.to_dict()

    config = UniMoeConfig(
        text_config=llm.config.to_dict(),
        vision_config=tower.config.to_dict() if tower is not None else None,
        speech_config=whisper.config.to_dict() if whisper is not None else None,
        audio_config=audio_config.to_dict() if audio_config is not None else None,
        audio_qformer_config=audio_qformer_config,
        moe_layers="none",
        speech_query_tokens=speech_query_tokens,
        audio_query_tokens=audio_query_tokens,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        **token_ids,
    )
    model = UniMoeForConditionalGeneration(config)
    inner = model.model
    inner.language_model.load_state_dict(getattr(llm, llm.base_model_prefix).state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if tower is not None:
        inner.vision_tower.load_state_dict(tower.state_dict())
    if whisper is not None:
        inner.speech_encoder.load_state_dict(whisper.get_encoder().state_dict())
        decoder = {k: v for k, v in whisper.get_decoder().state_dict().items() if k != "embed_tokens.weight"}
        result = inner.speech_connector.decoder.load_state_dict(decoder, strict=False)
        if list(result.missing_keys) != ["embed_tokens.weight"] or result.unexpected_keys:
            raise ValueError(
                f"The Whisper decoder does not fit the speech aligner's decoder (missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys})."
            )
    if audio is not None:
        source = audio.get_encoder() if audio.config.model_type == "whisper" else audio
        inner.audio_encoder.load_state_dict(source.state_dict())

    generation_config = copy.deepcopy(llm.generation_config)
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    vocab = config.text_config.vocab_size
    suppressed = [i for i in token_ids.values() if i < vocab]  # placeholders inside the vocabulary: never outputs
    if suppressed:
        generation_config.suppress_tokens = suppressed
    model.generation_config = generation_config
    processor = UniMoeProcessor.from_model_config(
        config,
        image_processor,
        feature_extractor,
        tokenizer,
        num_video_frames=num_video_frames,
        max_audio_chunks=max_audio_chunks,
    )
    return model, processor


# --- what each stage trains ------------------------------------------------------------------------------------------


def _present_modalities(model: nn.Module) -> list[str]:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return [m for m in MEDIA_TYPES if hasattr(base.model, ENCODERS[m])]


def _require_modality(model: nn.Module, modality: str) -> None:
    if modality not in _present_modalities(model):
        sub = "vision_config" if modality in ("image", "video") else f"{modality}_config"
        raise ValueError(
            f"This Uni-MoE has no {modality} encoder (its `{sub}` is None), so it cannot train the {modality} "
            f"connector; build it with one (build_dense_uni_moe's "
            f"{'vision_tower' if sub == 'vision_config' else modality + '_model'})."
        )


def _stage3_modalities(model: nn.Module, modalities: str | Sequence[str] | None) -> list[str]:
    chosen = _split(modalities) if modalities is not None else _present_modalities(model)
    for modality in chosen:
        _check_modality(modality)
        _require_modality(model, modality)
    return chosen


def set_trainable(model: nn.Module, stage: int, modality: str | Sequence[str] | None = None) -> list[str]:
    """Freeze ``model`` except what ``stage`` trains; return the trainable parameter names in the model's order.

    - 1: the connector of ``modality`` (:data:`CONNECTORS`); ``model`` is the dense Uni-MoE.
    - 2: the LoRA weights and ``modality``'s projector (:data:`PROJECTORS`); ``model`` is the PEFT-wrapped dense
      model of :func:`add_stage_lora`.
    - 3: the LoRA weights (attention and experts), the routers and the projectors of ``modality`` (a name, a
      list, or ``None`` for every modality the model has); ``model`` is the PEFT-wrapped MoE.

    Raises ``ValueError`` for an unknown stage or modality, a modality the model has no encoder for, stage 2 / 3
    without the LoRA wrapper, or stage 3 on a dense model.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3 (Uni-MoE's stages), got {stage!r}.")
    if stage == 1:
        if isinstance(model, PeftModel):
            raise ValueError("Stage 1 trains a connector of the plain dense model, not a PEFT-wrapped one.")
        modality = _check_modality(modality)
        _require_modality(model, modality)
        return set_trainable_by_patterns(model, [re.escape(CONNECTORS[modality] + ".")], f"stage 1 ({modality})")
    if not isinstance(model, PeftModel):
        raise ValueError(f"Stage {stage} trains LoRA: wrap the model with add_stage_lora(model, {stage}, ...) first.")
    prefix = r"base_model\.model\."
    lora = r".*\.lora_(?:A|B)\."
    if stage == 2:
        modality = _check_modality(modality)
        _require_modality(model, modality)
        saved = [prefix + re.escape(PROJECTORS[modality]) + r"\.modules_to_save\."]
    else:
        if not model.get_base_model().moe_blocks():
            raise ValueError("Stage 3 trains the MoE, but this model has no MoE layer; build it with upcycle_uni_moe.")
        saved = [prefix + r".*\.mlp\.gate\.modules_to_save\."]
        saved += [
            prefix + re.escape(PROJECTORS[m]) + r"\.modules_to_save\." for m in _stage3_modalities(model, modality)
        ]
    return set_trainable_by_patterns(model, [lora, *saved], f"stage {stage}")


def stage_lora_config(
    model: UniMoeForConditionalGeneration,
    stage: int,
    modalities: Sequence[str],
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
) -> LoraConfig:
    """The PEFT config of stage 2 (LoRA on the LLM's attention and dense FFN projections) or stage 3 (LoRA on the
    attention projections and, through ``target_parameters``, on every expert's projections), with the projectors of
    ``modalities`` (and in stage 3 the routers) in ``modules_to_save``, i.e. trained fully and saved with the
    adapter, so that a resumed run gets them back from its checkpoint."""
    projectors = list(dict.fromkeys(PROJECTORS[m].removeprefix("model.") for m in modalities))
    if stage == 2:
        return LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=f"(?:{LLM_ATTENTION}|{LLM_FFN})",
            modules_to_save=projectors,
        )
    if stage != 3:
        raise ValueError(f"Only stages 2 and 3 train LoRA, got stage {stage!r}.")
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("Stage 3's LoRA targets the experts, but this model has no MoE layer.")
    gated = hasattr(blocks[0].experts, "gate_up_proj")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,  # PEFT's ParamWrapper refuses dropout; add_stage_lora puts it on the nn.Linear LoRA
        target_modules=LLM_ATTENTION,
        target_parameters=EXPERT_PARAMETERS[gated],
        modules_to_save=[ROUTER, *projectors],
    )


def add_stage_lora(
    model: UniMoeForConditionalGeneration,
    stage: int,
    modalities: str | Sequence[str] | None,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
) -> PeftModel:
    """``model`` wrapped with stage 2's or 3's LoRA (:func:`stage_lora_config`) and frozen as :func:`set_trainable`
    says. ``lora_dropout`` applies to the ``nn.Linear`` LoRA layers; parameter LoRA on the expert banks computes
    ``W + BA`` and cannot drop its inputs (PEFT refuses it), so the experts' LoRA has none (the original's
    per-expert ``nn.Linear`` LoRA had 0.05)."""
    if stage == 2:
        chosen = [_check_modality(modalities if isinstance(modalities, str) else None)]
    else:
        chosen = _stage3_modalities(model, modalities)
    for modality in chosen:
        _require_modality(model, modality)
    wrapped = get_peft_model(model, stage_lora_config(model, stage, chosen, r, lora_alpha, lora_dropout))
    if stage == 3 and lora_dropout > 0:
        for module in wrapped.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = nn.Dropout(p=lora_dropout)
    set_trainable(wrapped, stage, chosen[0] if stage == 2 else chosen)
    return wrapped


# --- loading a previous stage ----------------------------------------------------------------------------------------


def load_dense_stage(
    folder: str | Path | None, stage: int, what: str = "init_model", previous: int = 1
) -> tuple[UniMoeForConditionalGeneration, UniMoeProcessor]:
    """The dense Uni-MoE and processor saved by a stage-``previous`` run, for ``stage`` to start from. Raises
    ``ValueError`` naming the folder when it is missing, holds no model, or holds an MoE."""
    if folder is None:
        raise ValueError(f"Stage {stage} starts from a stage-{previous} output: set {what} to its folder.")
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{what} {path} does not exist; run stage {previous} first (its output folder is needed).")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} {path} holds no model (no config.json); run stage {previous} first.")
    model = AutoModelForMultimodalLM.from_pretrained(path, dtype=torch.float32)
    if not isinstance(model, UniMoeForConditionalGeneration):
        raise ValueError(f"{what} {path} holds a {type(model).__name__}, not a Uni-MoE model.")
    if model.config.moe_layer_indices:
        raise ValueError(
            f"{what} {path} is already an MoE model; stages 2 and 3 start from dense outputs (to continue a stopped "
            "run, use resume_from_checkpoint)."
        )
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "right"
    return model, processor


def resolve_experts(experts: str | Sequence[str] | None, stage2_root: str | Path | None = None) -> list[str | None]:
    """Stage-3 expert sources: ``"base"`` gives ``None`` (the base model's FFN); anything else is a stage-2 folder,
    or with ``stage2_root`` a stage-2 run name under it."""
    names = _split(experts)
    if not names:
        raise ValueError(
            "Stage 3 needs its experts: e.g. experts='base,runs/stage2/image,runs/stage2/speech' ('base' is the "
            "stage-1 FFN; the others stage-2 output folders)."
        )
    resolved: list[str | None] = []
    for name in names:
        if name == "base":
            resolved.append(None)
        elif stage2_root is not None and not Path(name).is_dir():
            resolved.append(str(Path(stage2_root) / name))
        else:
            resolved.append(name)
    return resolved


# --- training --------------------------------------------------------------------------------------------------------


def stage_training_arguments(
    training_args: TrainingArguments, stage: int, output_dir: str | Path | None = None
) -> TrainingArguments:
    """A copy of ``training_args`` for ``stage`` (:data:`STAGE_DEFAULTS` where the Trainer's defaults are left;
    ``remove_unused_columns=False``; ``label_names=["labels"]``, which the Trainer cannot find on a PEFT model)."""
    stage_args = with_stage_defaults(training_args, STAGE_DEFAULTS[stage], f"Uni-MoE stage {stage}", output_dir)
    stage_args.label_names = stage_args.label_names or ["labels"]
    return stage_args


def _save_final(model: PreTrainedModel, processor: UniMoeProcessor, output_dir: Path, marker: dict) -> None:
    """Model, processor and marker into ``output_dir``, each file whole or not at all, the marker last."""
    # The processor first: save_files_atomically deletes weight files its own write did not make.
    save_files_atomically(output_dir, processor.save_pretrained)
    model.save_pretrained(output_dir)  # atomic per file (MoeModelMixin), config.json last
    atomic_write_text(output_dir / STAGE_MARKER, json.dumps(marker, indent=2))


def _train(
    stage: int,
    model: nn.Module,
    processor: UniMoeProcessor,
    args: UniMoeTrainingArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    callbacks: Iterable[TrainerCallback] | None,
    resume: str | None,
    marker: dict,
) -> StageRun:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())
    logger.info("Uni-MoE stage %d: %d of %d parameters train (%d tensors)", stage, *counts, len(trainable))
    trainer_class = RoutingStatsTrainer if stage == 3 else DistributedTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=UniMoeCollator(processor, args.max_length),
        processing_class=processor,
        callbacks=list(callbacks or []),
    )
    trainer.train(resume_from_checkpoint=resume)
    # FSDP's shards can be neither merged nor saved: the main process merges and saves a plain copy with the full
    # weights; the other processes return their (sharded, unmerged) model.
    trained = unsharded_copy(trainer) if trainer.is_fsdp_enabled else model
    if trained is None:
        final = model
    else:
        final = trained.merge_and_unload() if isinstance(trained, PeftModel) else trained
    # Router logits (and the router loss) were for training; the saved model leaves them off by default, as any
    # MoE checkpoint for inference (generate's cached steps see fewer tokens than the attention mask holds).
    final.config.output_router_logits = False
    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        marker = {**marker, "stage": stage, "global_step": trainer.state.global_step, "arguments": asdict(args)}
        if isinstance(trainer, RoutingStatsTrainer) and trainer.expert_counts:  # stage 3: global, over processes
            marker["expert_counts"] = {name: counts.tolist() for name, counts in trainer.expert_counts.items()}
        final.card_details = {"training_stages": [f"Uni-MoE stage {i}" for i in range(1, stage + 1)]}
        _save_final(final, processor, output_dir, marker)
    # The next stage reads this folder in every process: none goes on before the main one wrote it.
    trainer.accelerator.wait_for_everyone()
    return StageRun(stage, trainer, final, processor, output_dir, trainable)


def _gradient_checkpointing_inputs(model: PreTrainedModel, training_args: TrainingArguments) -> None:
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: keep a graph through checkpointed layers


def run_stage1(
    args: UniMoeTrainingArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    callbacks: Iterable[TrainerCallback] | None = None,
) -> StageRun:
    """One connector-alignment run for ``args.modality``: the model is ``args.init_model`` (a stage-1 output that
    already aligned other modalities) or, without it, :func:`build_dense_uni_moe` from ``args``' parts (seeded by
    ``training_args.seed``, so a resumed run rebuilds the same connectors before its checkpoint is loaded). Only
    that modality's connector trains; the result is saved into ``training_args.output_dir``."""
    modality = _check_modality(args.modality)
    training_args = stage_training_arguments(training_args, 1)
    resume = resume_point(training_args.resume_from_checkpoint, training_args.output_dir, required=True)
    set_seed(training_args.seed)
    if args.init_model is not None:
        model, processor = load_dense_stage(args.init_model, 1)
    else:
        model, processor = build_dense_uni_moe(
            args.language_model if args.language_model is not None else _default_language_model(),
            args.tokenizer,
            vision_tower=args.vision_tower,
            speech_model=args.speech_model,
            audio_model=args.audio_model,
            speech_query_tokens=args.speech_query_tokens,
            audio_query_tokens=args.audio_query_tokens,
            num_video_frames=args.num_video_frames,
            max_audio_chunks=args.max_audio_chunks,
            vision_feature_layer=args.vision_feature_layer,
            vision_feature_select_strategy=args.vision_feature_select_strategy,
        )
    set_trainable(model, 1, modality)
    _gradient_checkpointing_inputs(model, training_args)
    marker = {"modality": modality}
    return _train(1, model, processor, args, training_args, train_dataset, eval_dataset, callbacks, resume, marker)


def _default_language_model() -> Path:
    from ..assets import smollm2_path

    return smollm2_path()


def run_stage2(
    args: UniMoeTrainingArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    callbacks: Iterable[TrainerCallback] | None = None,
) -> StageRun:
    """One modality-expert run: stage 1's model (``args.init_model``) with LoRA on the LLM plus ``args.modality``'s
    projector, trained on that modality's data, then merged; the dense result (whose FFNs are the new expert) is
    saved into ``training_args.output_dir``."""
    modality = _check_modality(args.modality)
    training_args = stage_training_arguments(training_args, 2)
    resume = resume_point(training_args.resume_from_checkpoint, training_args.output_dir, required=True)
    set_seed(training_args.seed)
    model, processor = load_dense_stage(args.init_model, 2)
    _gradient_checkpointing_inputs(model, training_args)
    wrapped = add_stage_lora(model, 2, modality, args.lora_r, args.lora_alpha, args.lora_dropout)
    marker = {"modality": modality}
    return _train(2, wrapped, processor, args, training_args, train_dataset, eval_dataset, callbacks, resume, marker)


def prepare_stage3_model(args: UniMoeTrainingArguments, seed: int = 42) -> tuple[PeftModel, UniMoeProcessor]:
    """Stage 3's model before training: :func:`upcycle_uni_moe` of ``args.init_model`` (the stage-1 output) with the
    experts of ``args.experts`` (see :func:`resolve_experts`), wrapped with stage 3's LoRA. ``seed`` fixes the fresh
    routers and LoRA, so a resumed run rebuilds the same model before its checkpoint is loaded."""
    set_seed(seed)
    base, processor = load_dense_stage(args.init_model, 3)
    sources = []
    for index, source in enumerate(resolve_experts(args.experts)):
        sources.append(None if source is None else load_dense_stage(source, 3, f"expert {index}", previous=2)[0])
    if args.num_experts is not None and args.num_experts != len(sources):
        raise ValueError(
            f"num_experts={args.num_experts}, but experts lists {len(sources)} sources ({args.experts}); give one "
            f"source per expert or num_experts={len(sources)}."
        )
    moe = upcycle_uni_moe(base, sources, **args.moe_options())
    moe.config.output_router_logits = True  # the router loss joins the loss, and RoutingStatsTrainer logs it
    return add_stage_lora(moe, 3, None, args.lora_r, args.lora_alpha, args.lora_dropout), processor


def run_stage3(
    args: UniMoeTrainingArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    callbacks: Iterable[TrainerCallback] | None = None,
) -> StageRun:
    """The MoE-integration run (:func:`prepare_stage3_model`) on mixed data, with the aux loss and expert load
    logged; the LoRA is merged and the plain Uni-MoE saved into ``training_args.output_dir``."""
    training_args = stage_training_arguments(training_args, 3)
    resume = resume_point(training_args.resume_from_checkpoint, training_args.output_dir, required=True)
    model, processor = prepare_stage3_model(args, seed=training_args.seed)
    _gradient_checkpointing_inputs(model.get_base_model(), training_args)
    marker = {"experts": resolve_experts(args.experts)}
    return _train(3, model, processor, args, training_args, train_dataset, eval_dataset, callbacks, resume, marker)


RUNNERS = {1: run_stage1, 2: run_stage2, 3: run_stage3}


def run_all_stages(
    args: UniMoeTrainingArguments,
    training_args: TrainingArguments,
    train_dataset: Any,
    stage_datasets: Mapping[str, Any] | None = None,
    callbacks: Iterable[TrainerCallback] | None = None,
) -> list[StageRun | None]:
    """Stage 1 for each of ``args.stage1_modalities`` in order (``output_dir/stage1/<modality>``, each from the one
    before, the first from the parts), stage 2 for each of ``args.stage2_runs()`` (``output_dir/stage2/<name>``,
    from the last stage-1 output), then stage 3 (``output_dir/stage3``, from the last stage-1 output, with
    ``args.experts``, by default ``base`` plus every stage-2 run).

    Data: ``stage_datasets["stage1/<modality>"]``, ``["stage2/<name>"]`` and ``["stage3"]`` when given; else the
    stage-1 and stage-2 runs take ``stage_datasets["stage1"]`` / ``["stage2"]`` (or ``train_dataset``) filtered to
    the examples of their modality alone, and stage 3 takes ``train_dataset`` whole. With
    ``resume_from_checkpoint`` true, finished runs (those holding :data:`STAGE_MARKER`) are skipped (``None`` in the
    returned list) and a stopped one continues from its last checkpoint, or starts over if it saved none.
    """
    resume_all = wants_resume(training_args.resume_from_checkpoint)
    if resume_all is None:
        raise ValueError("run_all_stages resumes with resume_from_checkpoint=true; a checkpoint path names one run.")
    stage1 = _split(args.stage1_modalities)
    if not stage1:
        raise ValueError("stage1_modalities is empty; name the modalities stage 1 aligns, e.g. 'image,speech'.")
    root = Path(training_args.output_dir)
    stage_datasets = dict(stage_datasets or {})
    runs: list[tuple[int, str, Path, dict[str, Any], Any]] = []
    previous = None
    for modality in stage1:
        folder = root / "stage1" / modality
        data = stage_datasets.get(f"stage1/{modality}")
        if data is None:
            data = _single_modality(stage_datasets.get("stage1", train_dataset), modality, "stage 1")
        runs.append((1, modality, folder, {"modality": modality, "init_model": previous}, data))
        previous = str(folder)
    base = previous
    for name, modality in args.stage2_runs():
        data = stage_datasets.get(f"stage2/{name}")
        if data is None:
            data = _single_modality(stage_datasets.get("stage2", train_dataset), modality, f"stage-2 run {name!r}")
        runs.append((2, name, root / "stage2" / name, {"modality": modality, "init_model": base}, data))
    experts = args.experts or ",".join(["base", *(name for name, _ in args.stage2_runs())])
    experts = ",".join("base" if e is None else e for e in resolve_experts(experts, root / "stage2"))
    runs.append(
        (
            3,
            "stage3",
            root / "stage3",
            {"init_model": base, "experts": experts},
            stage_datasets.get("stage3", train_dataset),
        )
    )

    results: list[StageRun | None] = []
    for stage, name, folder, overrides, data in runs:
        if resume_all and (folder / STAGE_MARKER).is_file():
            logger.info("Uni-MoE stage %d (%s) already finished in %s; skipped", stage, name, folder)
            results.append(None)
            continue
        run_args = dataclasses.replace(args, stage=str(stage), **overrides)
        per_run = stage_training_arguments(training_args, stage, folder)
        per_run.resume_from_checkpoint = resume_point(True, folder, required=False) if resume_all else None
        results.append(RUNNERS[stage](run_args, per_run, data, callbacks=callbacks))
    return results


def _single_modality(data: Any, modality: str, what: str) -> list[dict]:
    examples = filter_modality(data, modality)
    if not examples:
        raise ValueError(
            f"{what} trains on {modality} examples alone, but the data holds none whose only medium is {modality}."
        )
    return examples


__all__ = [
    "CONNECTORS",
    "PROJECTORS",
    "STAGE_DEFAULTS",
    "STAGE_MARKER",
    "StageRun",
    "UniMoeTrainingArguments",
    "add_stage_lora",
    "build_dense_uni_moe",
    "load_dense_stage",
    "prepare_stage3_model",
    "resolve_experts",
    "run_all_stages",
    "run_stage1",
    "run_stage2",
    "run_stage3",
    "set_trainable",
    "stage_lora_config",
    "stage_training_arguments",
]
