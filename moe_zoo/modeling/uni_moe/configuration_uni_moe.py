# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Uni-MoE ("Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts")."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...core.options import MoeOptions, validate_moe_options
from ..config_views import InitializerRangeView, MoeLayersView

MODALITIES = ("image", "video", "speech", "audio")
"""The media Uni-MoE reads besides text, each with its own placeholder token."""


class UniMoeConfig(InitializerRangeView, MoeLayersView, PreTrainedConfig, MoeOptions):
    r"""Config of [`UniMoeForConditionalGeneration`]: a decoder LLM with MoE FFNs plus up to four media encoders.

    Sub-configs (each encoder is optional: ``None`` leaves that modality out of the model):
        text_config: the LLM (any HF decoder that upcycling supports; Llama, as the original's Vicuna, by default).
        vision_config: the image tower (CLIP-style). Images and video frames both go through it.
        speech_config: a ``WhisperConfig``. Its encoder reads 30-s log-mel chunks; its *decoder* is the speech
            connector: ``speech_query_tokens`` learned queries attend causally to each other and across to the
            encoder states, and a linear projector maps them to the LLM width (the original's ``mm_audio_aligner``).
        audio_config: the general-audio encoder (a ``WhisperConfig``, whose encoder is used, or any HF audio model
            whose output has ``last_hidden_state``). The original's BEATs is not in transformers.
        audio_qformer_config: the ``Blip2QFormerConfig`` of the audio connector (``audio_query_tokens`` learned
            queries cross-attending to the audio encoder states, then a linear projector).

    Media fields:
        image_token_id, video_token_id, speech_token_id, audio_token_id: placeholder ids. The processor expands
            each placeholder to one token per feature vector (transformers' convention), and the model scatters
            the features there. Ids at or beyond the LLM vocabulary are fine: placeholders are never embedded.
        vision_feature_layer (-2) and vision_feature_select_strategy (``"default"`` drops CLS): which CLIP states
            feed the ``mlp2x_gelu`` projector (``projector_hidden_act``, ``multimodal_projector_bias``).
        speech_query_tokens: connector outputs per speech chunk (``query_tokens_size``, 50 in the original).
        audio_query_tokens: connector outputs per audio chunk.

    MoE options are those of [`~moe_zoo.core.MoeOptions`], with Uni-MoE v1's defaults: every layer is MoE
    (``moe_layers="all"``), 4 full-FFN experts, top-2 with a softmax over the two selected logits
    (``router_type="topk_softmax"``). The 8-expert variant uses ``router_type="softmax_topk"`` with DeepSpeed's
    GShard loss (``aux_loss_type="gshard_top1_sum"``, ``router_aux_loss_coef`` 0.01). v1 trains without an aux
    loss: set ``router_aux_loss_coef=0``.

    Modality-routing losses of the 8-expert variant (added to the loss when labels are given and the coefficient is
    positive): ``modality_l1_loss_coef`` (the original's ``aux_multimodal_loss``: L1 distance between each
    modality's token gate probabilities and the multi-hot target of ``{image,video,audio}_expert_indices``) and
    ``modality_kl_loss_coef`` (``aux_kl_loss``: 1 - KL between modalities' mean gate distributions). Speech tokens
    count as the original's "audio" modality.
    """

    model_type = "uni_moe"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
        "speech_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
        "audio_qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_qformer", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    speech_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    audio_qformer_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    video_token_id: int = 32001
    speech_token_id: int = 32002
    audio_token_id: int = 32003
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    speech_query_tokens: int = 50
    audio_query_tokens: int = 32
    tie_word_embeddings: bool = False
    moe_layers: str | list[int] = "all"
    router_type: str = "topk_softmax"
    aux_loss_type: str = "gshard_top1_sum"
    modality_l1_loss_coef: float = 0.0
    modality_kl_loss_coef: float = 0.0
    image_expert_indices: list[int] | None = None
    video_expert_indices: list[int] | None = None
    audio_expert_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True  # as Llava: a tied LLM (SmolLM2) keeps its LM head tied
        if self.audio_config is not None and self.audio_qformer_config is None:
            raise ValueError(
                "`audio_qformer_config` is None, but `audio_config` is set: the audio connector is a Q-Former; pass "
                "a Blip2QFormerConfig (its `encoder_hidden_size` is set from the audio encoder)."
            )
        if self.audio_qformer_config is not None and self.audio_config is not None:
            self.audio_qformer_config.encoder_hidden_size = audio_hidden_size(self.audio_config)
        self._validate_media_fields()
        validate_moe_options(self, self.text_config.num_hidden_layers)

    def _validate_media_fields(self) -> None:
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"`vision_feature_select_strategy` is {self.vision_feature_select_strategy!r}, but it must be "
                "'default' (drop CLS, as Uni-MoE's 'patch') or 'full'."
            )
        for name in ("speech_query_tokens", "audio_query_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` is {getattr(self, name)!r}, but it must be a positive integer.")
        if self.speech_config is not None and self.speech_query_tokens > self.speech_config.max_target_positions:
            raise ValueError(
                f"`speech_query_tokens` is {self.speech_query_tokens}, but the Whisper decoder that reads the "
                f"queries has only max_target_positions={self.speech_config.max_target_positions} positions."
            )
        ids = list(self.placeholder_token_ids().values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"The placeholder token ids (image, video, speech, audio) must differ, got {ids}.")
        for name in ("modality_l1_loss_coef", "modality_kl_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` is {getattr(self, name)}, but it must be >= 0.")
        for name in ("image_expert_indices", "video_expert_indices", "audio_expert_indices"):
            value = getattr(self, name)
            if value is not None and not all(isinstance(i, int) and 0 <= i < self.num_experts for i in value):
                raise ValueError(f"`{name}` is {value}, but it must list expert indices in [0, {self.num_experts}).")
        if self.modality_l1_loss_coef > 0 and not any(
            getattr(self, f"{m}_expert_indices") for m in ("image", "video", "audio")
        ):
            raise ValueError(
                "`modality_l1_loss_coef` > 0 needs the experts each modality should use: set "
                "`image_expert_indices`, `video_expert_indices` and/or `audio_expert_indices`."
            )

    def placeholder_token_ids(self) -> dict[str, int]:
        """``{modality: placeholder id}`` for the four media, in :data:`MODALITIES` order."""
        return {m: getattr(self, f"{m}_token_id") for m in MODALITIES}


def audio_hidden_size(audio_config: PreTrainedConfig) -> int:
    """Width of the states an audio encoder config produces (Whisper's ``d_model`` or ``hidden_size``)."""
    return getattr(audio_config, "d_model", None) or audio_config.hidden_size


__all__ = ["MODALITIES", "UniMoeConfig"]
