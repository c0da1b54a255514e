# Copyright 2026 The moe-zoo authors. Licensed under the Apache License, Version 2.0.
"""The optional modality-routing losses of Uni-MoE's 8-expert variant (``aux_multimodal_loss`` and
``aux_kl_loss`` of the original's ``llava_llama.py``), computed without loops over rows or tokens.

With ``g = softmax(router logits)`` per token, for every MoE layer and batch row:

- **L1** (``modality_l1_loss_coef``): for each of image, audio (speech and audio tokens) and video present in the
  row, the mean over its tokens and the experts of ``|g - target|``, where ``target`` is the multi-hot (count) vector
  of the modality's ``*_expert_indices``, weighted by the modality's share of the row's ``T`` positions. That sum is
  ``sum_{t in modality} sum_e |g_te - target_e| / (E * T)``.
- **KL** (``modality_kl_loss_coef``): with ``m_X`` the mean gate vector of modality X in the row (text = the
  non-placeholder tokens under the attention mask), the mean over the pairs (image, audio), (image, text),
  (audio, text), (audio, video), (video, text) present in the row of ``1 - KL(softmax(m_b) || softmax(m_a))/E``.
  The original applies a softmax to the mean probabilities and uses ``KLDivLoss(reduction="batchmean")`` on
  1-D vectors, which divides by ``E``; both are kept, so that the coefficients mean what they meant there.

Both are summed over layers and rows, times their coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...core.recording import LayerRouting

KL_PAIRS = (("image", "audio"), ("image", "text"), ("audio", "text"), ("audio", "video"), ("video", "text"))
"""The modality pairs of the original's KL loss, in its order (image-video is not among them)."""


def modality_token_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config) -> dict:
    """``{image, video, audio, text: (B, T) bool}``; speech and audio placeholders both count as audio."""
    ids = config.placeholder_token_ids()
    masks = {
        "image": input_ids == ids["image"],
        "video": input_ids == ids["video"],
        "audio": (input_ids == ids["speech"]) | (input_ids == ids["audio"]),
    }
    text = ~(masks["image"] | masks["video"] | masks["audio"])
    if attention_mask is not None and attention_mask.dim() == 2:
        text = text & attention_mask.bool()
    masks["text"] = text
    return masks


def multi_hot(indices: Sequence[int], num_experts: int, device: torch.device) -> torch.Tensor:
    """The original's target: ``sum(one_hot(indices))`` (a repeated index counts twice)."""
    target = torch.zeros(num_experts, device=device)
    target.index_add_(0, torch.as_tensor(list(indices), device=device), torch.ones(len(indices), device=device))
    return target


def modality_l1_loss(gates: torch.Tensor, masks: dict, config) -> torch.Tensor:
    """Sum over rows of the L1 term of one layer; ``gates (B, T, E)``."""
    _, length, experts = gates.shape
    loss = gates.new_zeros(())
    for modality in ("image", "audio", "video"):
        indices = getattr(config, f"{modality}_expert_indices")
        if not indices:
            continue
        distance = (gates - multi_hot(indices, experts, gates.device)).abs().sum(-1)  # (B, T)
        loss = loss + (distance * masks[modality]).sum() / (experts * length)
    return loss


def modality_kl_loss(gates: torch.Tensor, masks: dict) -> torch.Tensor:
    """Sum over rows of the KL term of one layer; ``gates (B, T, E)``."""
    experts = gates.shape[-1]
    means, present = {}, {}
    for modality, mask in masks.items():
        counts = mask.sum(-1)
        present[modality] = counts > 0
        means[modality] = (gates * mask.unsqueeze(-1)).sum(1) / counts.clamp(min=1).unsqueeze(-1)
    total = gates.new_zeros(gates.shape[0])
    pairs = gates.new_zeros(gates.shape[0])
    for first, second in KL_PAIRS:
        valid = present[first] & present[second]
        log_q = F.log_softmax(means[first], dim=-1)
        p = F.softmax(means[second], dim=-1)
        kl = (p * (torch.log(p) - log_q)).sum(-1) / experts
        total = total + torch.where(valid, 1.0 - kl, 0.0)
        pairs = pairs + valid
    return (total / pairs.clamp(min=1)).sum()


def modality_routing_losses(
    records: Sequence[LayerRouting], input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config
) -> torch.Tensor:
    """``modality_l1_loss_coef * L1 + modality_kl_loss_coef * KL``, summed over the MoE layers of ``records``."""
    masks = modality_token_masks(input_ids, attention_mask, config)
    batch, length = input_ids.shape
    loss = records[0].logits.new_zeros((), dtype=torch.float32)
    for record in records:
        if record.logits.shape[0] != batch * length:
            raise ValueError(
                f"Router logits of {record.logits.shape[0]} tokens, but input_ids hold {batch}x{length}; the "
                "modality losses need one router decision per input position."
            )
        gates = F.softmax(record.logits.float(), dim=-1).view(batch, length, -1)
        if config.modality_l1_loss_coef:
            loss = loss + config.modality_l1_loss_coef * modality_l1_loss(gates, masks, config)
        if config.modality_kl_loss_coef:
            loss = loss + config.modality_kl_loss_coef * modality_kl_loss(gates, masks)
    return loss


__all__ = ["KL_PAIRS", "modality_kl_loss", "modality_l1_loss", "modality_routing_losses", "modality_token_masks"]
