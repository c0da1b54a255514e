# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""Uni-MoE as a native transformers model: image, video, speech and audio encoders with their connectors, and a
decoder LLM whose FFNs are sparse MoE blocks.

Data flow: each medium is encoded and projected to the LLM width (images: CLIP states of ``vision_feature_layer``
through an ``mlp2x_gelu`` projector; videos: the same per frame, then the mean over frames; speech: Whisper's
encoder per 30-s chunk, then its decoder over learned query tokens and a linear projector; audio: an audio encoder
per chunk, then a Q-Former over learned queries and a linear projector). The processor has expanded each
placeholder to one token per feature vector, and the features are scattered there in order (``masked_scatter``),
the transformers way. The original's sentinel ids (-200, -300, -400) and its per-row splicing become that.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder
from transformers.utils.generic import can_return_tuple

from ...core.experts import GATED_LAYOUT, PLAIN_LAYOUT, GatedExpertsBase, PlainExpertsBase
from ...core.recording import collect_routing
from ..moe_backbone import MoeModelMixin, backbone_hidden_act, build_backbone, install_moe_blocks
from .configuration_uni_moe import UniMoeConfig
from .modality_losses import modality_routing_losses


@use_experts_implementation(**GATED_LAYOUT)
class UniMoeGatedExperts(GatedExpertsBase):
    pass


@use_experts_implementation(**PLAIN_LAYOUT)
class UniMoePlainExperts(PlainExpertsBase):
    pass


class UniMoeVisionProjector(nn.Module):
    """``mlp2x_gelu``: Linear(vision -> text), activation, Linear(text -> text)."""

    def __init__(self, config: UniMoeConfig):
        super().__init__()
        text_size = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_size, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_size, text_size, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class UniMoeSpeechConnector(nn.Module):
    """The original's ``mm_audio_aligner``: a Whisper decoder over learned queries, then a linear projector.

    The queries attend causally to each other and across to one chunk's encoder states (a Q-Former built from the
    Whisper decoder). The decoder never reads token ids, so it is built with a one-row token embedding instead of
    Whisper's 51,865 rows.
    """

    def __init__(self, config: UniMoeConfig):
        super().__init__()
        decoder_config = copy.deepcopy(config.speech_config)
        decoder_config.vocab_size = 1
        decoder_config.pad_token_id = None
        width = decoder_config.d_model
        self.query_tokens = nn.Parameter(torch.zeros(1, config.speech_query_tokens, width))
        self.decoder = WhisperDecoder(decoder_config)
        self.projector = nn.Linear(width, config.text_config.hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(encoder_states.shape[0], -1, -1).to(encoder_states.dtype)
        states = self.decoder(inputs_embeds=queries, encoder_hidden_states=encoder_states, use_cache=False)
        return self.projector(states.last_hidden_state)


class UniMoeAudioConnector(nn.Module):
    """Uni-MoE-audio's connector: a BLIP-2 Q-Former over learned queries, then a linear projector."""

    def __init__(self, config: UniMoeConfig):
        super().__init__()
        qformer_config = config.audio_qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.audio_query_tokens, qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(qformer_config)
        self.projector = nn.Linear(qformer_config.hidden_size, config.text_config.hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(encoder_states.shape[0], -1, -1).to(encoder_states.dtype)
        states = self.qformer(query_embeds=queries, encoder_hidden_states=encoder_states)
        return self.projector(states.last_hidden_state)


def build_audio_encoder(audio_config) -> nn.Module:
    """Whisper's encoder for a ``WhisperConfig`` (the decoder is not needed), else the audio model itself."""
    if audio_config.model_type == "whisper":
        return WhisperEncoder(audio_config)
    return AutoModel.from_config(audio_config)


class UniMoePreTrainedModel(MoeModelMixin, PreTrainedModel):
    config_class = UniMoeConfig
    config: UniMoeConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (UniMoeSpeechConnector, UniMoeAudioConnector)):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class UniMoeModel(UniMoePreTrainedModel):
    """The encoders, connectors and the MoE language model, without the LM head."""

    def __init__(self, config: UniMoeConfig, language_model: nn.Module | None = None):
        super().__init__(config)
        if config.vision_config is not None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.multi_modal_projector = UniMoeVisionProjector(config)
        if config.speech_config is not None:
            self.speech_encoder = WhisperEncoder(config.speech_config)
            self.speech_connector = UniMoeSpeechConnector(config)
        if config.audio_config is not None:
            self.audio_encoder = build_audio_encoder(config.audio_config)
            self.audio_connector = UniMoeAudioConnector(config)
        self.language_model = language_model if language_model is not None else build_backbone(config.text_config)[0]
        install_moe_blocks(
            self.language_model,
            config,
            config.text_config.num_hidden_layers,
            backbone_hidden_act(config.text_config),
            (UniMoeGatedExperts, UniMoePlainExperts),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _require(self, modality: str, module: str) -> nn.Module:
        if not hasattr(self, module):
            raise ValueError(
                f"This Uni-MoE has no {modality} encoder (its config's "
                f"`{'vision' if modality in ('image', 'video') else modality}_config` is None), but {modality} "
                "inputs were given."
            )
        return getattr(self, module)

    def _vision_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self._require("image", "vision_tower")
        size = getattr(self.config.vision_config, "image_size", None)
        if pixel_values.dim() != 4 or (size is not None and tuple(pixel_values.shape[-2:]) != (size, size)):
            raise ValueError(
                f"Image pixel values have shape {tuple(pixel_values.shape)}, but the vision tower expects "
                f"(num_images, {self.config.vision_config.num_channels}, {size}, {size}); use the processor."
            )
        outputs = tower(pixel_values.to(self.dtype), output_hidden_states=True)
        states = outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            states = states[:, 1:]
        return self.multi_modal_projector(states)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(num_images, C, H, W)`` -> ``(num_images, patches, hidden)``."""
        return self._vision_states(pixel_values)

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """``(num_videos, frames, C, H, W)`` -> ``(num_videos, patches, hidden)``: every frame through the image
        path, then the mean over frames (as the original)."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos has shape {tuple(pixel_values_videos.shape)}, but it must be "
                "(num_videos, num_frames, channels, height, width)."
            )
        videos, frames = pixel_values_videos.shape[:2]
        features = self._vision_states(pixel_values_videos.flatten(0, 1))
        return features.view(videos, frames, *features.shape[1:]).mean(dim=1)

    def get_speech_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """``(num_chunks, mel_bins, frames)`` log-mel chunks -> ``(num_chunks, speech_query_tokens, hidden)``."""
        encoder = self._require("speech", "speech_encoder")
        states = encoder(input_features.to(self.dtype)).last_hidden_state
        return self.speech_connector(states)

    def get_audio_features(self, input_values: torch.Tensor) -> torch.Tensor:
        """Audio-encoder input chunks -> ``(num_chunks, audio_query_tokens, hidden)``."""
        encoder = self._require("audio", "audio_encoder")
        states = encoder(input_values.to(self.dtype)).last_hidden_state
        return self.audio_connector(states)

    def embed_with_media(
        self,
        input_ids: torch.Tensor,
        media: dict[str, torch.Tensor | None],
    ) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its medium's features, in order.

        Raises ``ValueError`` naming the modality when the number of placeholder tokens differs from the number of
        feature vectors, or when placeholders have no inputs.
        """
        placeholder_ids = self.config.placeholder_token_ids()
        is_placeholder = torch.isin(input_ids, torch.tensor(list(placeholder_ids.values()), device=input_ids.device))
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))
        if all(values is None for values in media.values()) and not is_placeholder.any():
            return embeds  # text, and every cached decoding step: one check instead of one per modality
        encoders = {
            "image": self.get_image_features,
            "video": self.get_video_features,
            "speech": self.get_speech_features,
            "audio": self.get_audio_features,
        }
        for modality, token_id in placeholder_ids.items():
            mask = input_ids == token_id
            values = media.get(modality)
            count = int(mask.sum())
            if values is None:
                if count:
                    raise ValueError(
                        f"input_ids hold {count} {modality} placeholder tokens (id {token_id}), but no {modality} "
                        f"inputs were given ({MEDIA_INPUT_NAMES[modality]})."
                    )
                continue
            features = encoders[modality](values)
            features = features.reshape(-1, features.shape[-1])
            if count != features.shape[0]:
                raise ValueError(
                    f"{modality.capitalize()} placeholder tokens and features do not match: input_ids hold {count} "
                    f"tokens with id {token_id}, but the {modality} inputs give {features.shape[0]} feature vectors "
                    f"({FEATURES_PER_ITEM[modality]}). Let the processor expand the placeholders."
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        media = {"image": pixel_values, "video": pixel_values_videos, "speech": input_features, "audio": input_values}
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_media(input_ids, media)
        elif any(v is not None for v in media.values()):
            raise ValueError("Media inputs need input_ids (to find their placeholders), not inputs_embeds.")
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )


MEDIA_INPUT_NAMES = {
    "image": "pixel_values",
    "video": "pixel_values_videos",
    "speech": "input_features",
    "audio": "input_values",
}
FEATURES_PER_ITEM = {
    "image": "one per image patch",
    "video": "one per frame patch, pooled over frames",
    "speech": "speech_query_tokens per 30-s chunk",
    "audio": "audio_query_tokens per chunk",
}


class UniMoeForConditionalGeneration(UniMoePreTrainedModel, GenerationMixin):
    """Uni-MoE. ``forward`` takes ``input_ids`` with expanded placeholders and any of ``pixel_values`` (images),
    ``pixel_values_videos``, ``input_features`` (speech chunks) and ``input_values`` (audio chunks), and returns
    ``MoeCausalLMOutputWithPast``. With ``output_router_logits`` (argument or config) it carries one ``(B*S, E)``
    router-logit tensor per MoE layer and ``aux_loss``: the balance loss plus, given labels, the modality-routing
    losses; ``aux_loss`` is added to ``loss``."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: UniMoeConfig):
        super().__init__(config)
        language_model, self.lm_head = build_backbone(config.text_config)
        self.model = UniMoeModel(config, language_model=language_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if "past_key_values" in kwargs:  # the pre-5.24 name, still used by some callers
            cache = kwargs.pop("past_key_values")
        use_cache = self.packed_use_cache(position_ids, attention_mask, cache, use_cache)
        modality_losses = labels is not None and input_ids is not None and self._has_modality_losses()
        with collect_routing(enabled=output_router_logits or modality_losses) as routing:
            outputs = self.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                input_features=input_features,
                input_values=input_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            # **kwargs carries the Trainer's num_items_in_batch: the token sum over the whole step's label tokens, so
            # that processes and accumulation steps weigh the LM loss as one process with the whole batch would.
            vocab_size = self.config.text_config.vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        routed = self.router_outputs(loss, routing, attention_mask, output_router_logits)
        if modality_losses and routing:
            extra = modality_routing_losses(routing, input_ids, attention_mask, self.config)
            routed["loss"] = routed["loss"] + extra.to(routed["loss"].device)
            routed["aux_loss"] = extra if routed["aux_loss"] is None else routed["aux_loss"] + extra
        return MoeCausalLMOutputWithPast(
            **routed,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _has_modality_losses(self) -> bool:
        return self.config.modality_l1_loss_coef > 0 or self.config.modality_kl_loss_coef > 0


__all__ = [
    "UniMoeAudioConnector",
    "UniMoeForConditionalGeneration",
    "UniMoeGatedExperts",
    "UniMoeModel",
    "UniMoePlainExperts",
    "UniMoePreTrainedModel",
    "UniMoeSpeechConnector",
    "UniMoeVisionProjector",
]
