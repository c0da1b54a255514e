"""Router losses: load balancing (Switch top-k and GShard top-1 forms), z-loss, top-p entropy, DynMoE's.

Every function takes router logits of shape ``(T, E)`` (tokens flattened batch-major, as the blocks see them) and
an optional ``token_mask (T,)`` (1 for real tokens, 0 for padding, e.g. ``attention_mask.reshape(-1)``); padding
never counts. :func:`router_aux_loss` combines them for a whole model from the collected
:class:`~moe_zoo.core.recording.LayerRouting` records, as a model config asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .options import balance_slot_weights
from .recording import LayerRouting
from .routing import TopAnyRouter


def _weights(token_mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(num_tokens, device=device)
    return token_mask.reshape(-1).to(device=device, dtype=torch.float32)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the token dimension (dim 0) counting only weighted tokens."""
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * weights.view(shape)).sum(dim=0) / weights.sum().clamp_min(1)


def switch_load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None = None,
    slot_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer's loss in transformers' form (``load_balancing_loss_func``): all layers' tokens pooled,
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k assignments to expert ``e`` (summed over the k
    choices) and ``P_e`` the mean softmax probability. ``slot_weights (E,)`` makes it MoE++'s heterogeneous
    ``E * sum_e eta_e f_e P_e`` (see :func:`~moe_zoo.core.options.balance_slot_weights`)."""
    counts = 0.0
    prob_sum = 0.0
    total = 0.0
    for logits in router_logits:
        weights = _weights(token_mask, logits.shape[0], logits.device)
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        counts = counts + (F.one_hot(chosen, num_experts).sum(dim=1) * weights[:, None]).sum(dim=0)
        prob_sum = prob_sum + (probs * weights[:, None]).sum(dim=0)
        total = total + weights.sum()
    per_slot = (counts / total) * (prob_sum / total)
    return num_experts * torch.sum(_weighted(per_slot, slot_weights))


def _weighted(per_slot: torch.Tensor, slot_weights: torch.Tensor | None) -> torch.Tensor:
    return per_slot if slot_weights is None else per_slot * slot_weights.to(per_slot.device, per_slot.dtype)


def gshard_load_balancing_loss(
    router_logits: torch.Tensor, token_mask: torch.Tensor | None = None, slot_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """GShard's top-1 loss for one layer, as DeepSpeed computes it (``l_aux = E^2 * mean(me * ce)``): ``me`` the
    mean softmax probability, ``ce`` the fraction of tokens whose **first** choice is each expert; ``slot_weights``
    as in :func:`switch_load_balancing_loss`."""
    num_experts = router_logits.shape[-1]
    weights = _weights(token_mask, router_logits.shape[0], router_logits.device)
    probs = torch.softmax(router_logits.float(), dim=-1)
    first = F.one_hot(probs.argmax(dim=-1), num_experts).float()
    per_slot = _masked_mean(probs, weights) * _masked_mean(first, weights)
    return num_experts * num_experts * torch.mean(_weighted(per_slot, slot_weights))


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-sum-exp of the logits (keeps router logits small)."""
    weights = _weights(token_mask, router_logits.shape[0], router_logits.device)
    return _masked_mean(torch.logsumexp(router_logits.float(), dim=-1).square(), weights)


def router_entropy_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy of the routing distribution; top-p routing adds it so the router stays confident instead of
    spreading probability thinly to activate many experts ("Harder Tasks Need More Experts")."""
    weights = _weights(token_mask, router_logits.shape[0], router_logits.device)
    log_probs = torch.log_softmax(router_logits.float(), dim=-1)
    return _masked_mean(-(log_probs.exp() * log_probs).sum(dim=-1), weights)


def dynmoe_diverse_simple_loss(sim_matrix: torch.Tensor, experts_mask: torch.Tensor) -> torch.Tensor:
    """DynMoE's gate loss: ``||S * M - I * M||_F`` (active expert embeddings pushed towards orthogonality) plus
    ``mean_e ||W[:, e]||`` (small embeddings), with ``S`` the cosine-similarity matrix of the columns of
    ``sim_matrix (H, E)`` and ``M`` the outer product of the active-expert mask."""
    normed = F.normalize(sim_matrix.float(), dim=0)
    similarity = normed.t() @ normed
    pair_mask = experts_mask[:, None] * experts_mask[None, :]
    eye = torch.eye(similarity.shape[0], device=similarity.device)
    diverse = torch.linalg.matrix_norm((similarity - eye) * pair_mask)
    simple = sim_matrix.float().norm(dim=0).mean()
    return diverse + simple


def router_aux_loss(
    records: Sequence[LayerRouting], config: Any, token_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The weighted sum of router losses that a model adds to its LM loss, or None without MoE layers.

    - balance: ``aux_loss_type="switch_topk_mean"`` (transformers) or ``"gshard_top1_sum"`` (DeepSpeed /
      MoE-LLaVA, summed over layers), times ``router_aux_loss_coef``, with zero-computation slots weighted by
      ``zero_computation_loss_weight`` (MoE++); top-any routers use DynMoE's
      diverse-and-simple gate loss in its place (its scores are not a distribution);
    - ``router_z_loss_coef`` times the mean z-loss over layers;
    - ``router_entropy_loss_coef`` times the mean routing entropy over layers.
    """
    if not records:
        return None
    ranked = [r for r in records if not isinstance(r.router, TopAnyRouter)]
    top_any = [r for r in records if isinstance(r.router, TopAnyRouter)]
    loss = records[0].logits.new_zeros((), dtype=torch.float32)
    if ranked and config.router_aux_loss_coef:
        slot_weights = balance_slot_weights(config)
        if config.aux_loss_type == "gshard_top1_sum":
            balance = sum(gshard_load_balancing_loss(r.logits, token_mask, slot_weights) for r in ranked)
        else:
            top_k = max(1, min(config.num_experts_per_tok, ranked[0].logits.shape[-1]))
            balance = switch_load_balancing_loss(
                [r.logits for r in ranked], ranked[0].logits.shape[-1], top_k, token_mask, slot_weights
            )
        loss = loss + config.router_aux_loss_coef * balance
    if top_any and config.router_aux_loss_coef:
        gate_loss = sum(dynmoe_diverse_simple_loss(r.router.sim_matrix, r.router.experts_mask) for r in top_any)
        loss = loss + config.router_aux_loss_coef * gate_loss
    if ranked and config.router_z_loss_coef:
        loss = loss + config.router_z_loss_coef * sum(router_z_loss(r.logits, token_mask) for r in ranked) / len(ranked)
    if ranked and config.router_entropy_loss_coef:
        entropy = sum(router_entropy_loss(r.logits, token_mask) for r in ranked) / len(ranked)
        loss = loss + config.router_entropy_loss_coef * entropy
    return loss
