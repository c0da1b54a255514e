"""Routers: token states -> (router logits, combine weights, expert indices).

Every router follows transformers' router contract (``Qwen3MoeTopKRouter``): ``forward(x)`` takes ``(T, H)`` token
states and returns ``(router_logits (T, E), weights (T, K), indices (T, K))``. Routers that pick a variable number
of experts per token (top-p, top-any, dense-to-sparse) pad their rows with the sentinel index ``E`` and weight 0;
:class:`~moe_zoo.core.block.SparseMoeBlock` drops those slots before the experts run, so no work is spent on them.

Routers always compute in at least fp32 (the weight may be stored in bf16): routing decisions are discrete, and a bf16
softmax flips near-ties, which is the accuracy loss DeepSpeed and MixLoRA avoid the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .options import num_routed_slots

RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
FP32_BUFFERS = ("selection_bias", "pending_load")


def routing_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, the input's own dtype when it is wider (a float64 model routes in float64)."""
    return torch.promote_types(hidden_states.dtype, torch.float32)


class Router(nn.Module):
    """Shared parts of the linear routers: the ``(E, H)`` weight, fp32 logits, jitter and the selection bias.

    The selection bias is DeepSeek's auxiliary-loss-free balancing: a per-expert offset added to the scores **only
    to choose** experts, never to the combine weights. It is a persistent buffer (it changes the model's function,
    so checkpoints keep it); ``router_bias_update_rate`` > 0 turns on its update rule, see :meth:`update_bias`.
    """

    def __init__(self, config: Any, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_routed_slots(config)
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.bias_update_rate = config.router_bias_update_rate
        if config.router_type == "bias_balanced" and self.bias_update_rate == 0.0:
            self.bias_update_rate = 1e-3
        self.weight = nn.Parameter(torch.zeros(self.num_experts, hidden_size))
        self.register_buffer("selection_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # Expert loads since the last bias update; only the update rule reads it, so it is not saved.
        self.register_buffer("pending_load", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        self.logit_offset: torch.Tensor | None = None

    def reset_parameters(self, std: float) -> None:
        """Fresh router: weight from normal(0, std), no selection bias, no pending loads. Tensors already loaded
        from a checkpoint are left alone (transformers' ``initialization`` functions skip them)."""
        init.normal_(self.weight, mean=0.0, std=std)
        init.zeros_(self.selection_bias)
        init.zeros_(self.pending_load)

    @property
    def uses_selection_bias(self) -> bool:
        return self.bias_update_rate > 0.0

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size).to(routing_dtype(hidden_states))
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x, self.weight.to(x.dtype))
        if self.logit_offset is not None:  # MoE++'s gating residual, set by the block for this call
            logits = logits + self.logit_offset.to(logits.dtype)
        return logits

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` would round the balancing bias and loads, whose updates of ~1e-3 then vanish;
        # they follow the module's device but stay fp32 (as DeepSeek-V3 keeps e_score_correction_bias).
        kept = {name: self._buffers[name] for name in FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            if self._buffers[name].dtype != torch.float32:  # a dtype cast, not a move or materialisation
                self._buffers[name] = value.to(device=self._buffers[name].device)
        return self

    def record_load(self, indices: torch.Tensor) -> None:
        """Accumulate how many tokens each expert received (training only, for the bias update)."""
        if self.training and self.uses_selection_bias:
            with torch.no_grad():
                flat = indices.reshape(-1)
                flat = flat[flat < self.num_experts]
                self.pending_load += torch.bincount(flat, minlength=self.num_experts).float()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply ``b_e += u * sign(mean_load - load_e)`` once, from the loads gathered since the last call.

        Call it once per optimizer step (``moe_zoo.core.update_selection_biases(model)`` does it for a whole
        model); overloaded experts become less likely to be chosen, starved ones more likely.
        """
        if not self.uses_selection_bias:
            return
        load = self.pending_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.pending_load.zero_()


class TopKRouter(Router):
    """Fixed top-k routing with softmax or sigmoid scores.

    ``router_type``:
      - ``softmax_topk``: softmax over all experts, top-k, optionally renormalised (Mixtral, Qwen-MoE, MixLoRA).
        With ``router_second_expert_gumbel`` the second expert is the argmax of logits + Gumbel noise with the
        first masked out, as DeepSpeed's ``top2gating`` does in training *and* eval (off by default).
      - ``topk_softmax``: top-k over the logits, softmax over the k selected (Uni-MoE v1).
      - ``sigmoid_topk`` / ``bias_balanced``: sigmoid scores, top-k of scores + selection bias, weights gathered
        from the unbiased scores, optionally renormalised, times ``routed_scaling_factor`` (DeepSeek-V3).
    """

    def __init__(self, config: Any, hidden_size: int):
        super().__init__(config, hidden_size)
        self.router_type = config.router_type
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.second_expert_gumbel = config.router_second_expert_gumbel

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        logits = self.logits(hidden_states)
        if self.router_type == "topk_softmax":
            indices = torch.topk(logits + self.selection_bias, self.top_k, dim=-1).indices
            weights = torch.softmax(logits.gather(-1, indices), dim=-1)
        else:
            scores = torch.sigmoid(logits) if self.router_type in ("sigmoid_topk", "bias_balanced") else None
            if scores is None:
                scores = torch.softmax(logits, dim=-1)
            indices = self._select(logits, scores)
            weights = self._combine_scores(scores).gather(-1, indices)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            weights = weights * self.routed_scaling_factor
        self.record_load(indices)
        return logits, weights, indices

    def _combine_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores the combine weights are gathered from: the unbiased ones, so that the selection bias only
        chooses experts (DeepSeek-V3). A subclass reproducing code that lets the bias into the weights as well (the
        original SMoRA) returns ``scores + selection_bias`` here; a hook rather than an option, because no model
        config should offer that behaviour."""
        return scores

    def _select(self, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        choice = scores + self.selection_bias
        if not self.second_expert_gumbel:
            return torch.topk(choice, self.top_k, dim=-1).indices
        first = choice.argmax(dim=-1, keepdim=True)
        gumbel = -torch.log((-torch.log(torch.rand_like(logits).clamp_min(1e-20))).clamp_min(1e-20))
        second_choice = (logits + gumbel).scatter(-1, first, float("-inf"))
        return torch.cat([first, second_choice.argmax(dim=-1, keepdim=True)], dim=-1)


def pad_to_sentinel(active: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a ``(T, E)`` activity mask and weights into ``(T, K)`` indices/weights, ``K`` = most active experts.

    Inactive slots get the sentinel index ``E`` and weight 0. ``K`` is at least 1 so shapes stay valid when no
    token picked anything.
    """
    num_experts = active.shape[-1]
    width = max(int(active.sum(dim=-1).max().item()) if active.numel() else 0, 1)
    expert_ids = torch.arange(num_experts, device=active.device).expand_as(active)
    # Active experts first (stable on the key "inactive"), then cut to the widest row.
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[:, :width]
    picked = active.gather(-1, order)
    indices = torch.where(picked, expert_ids.gather(-1, order), num_experts)
    return indices, torch.where(picked, weights.gather(-1, order), 0.0)


class TopPRouter(Router):
    """Dynamic top-p routing ("Harder Tasks Need More Experts"): each token takes the smallest set of experts,
    by descending probability, whose probabilities sum to at least ``top_p_threshold`` (the expert that crosses the
    threshold is included). The combine weights are the raw, **not renormalised** probabilities."""

    def __init__(self, config: Any, hidden_size: int):
        super().__init__(config, hidden_size)
        self.threshold = config.top_p_threshold

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        logits = self.logits(hidden_states)
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, order = torch.sort(probs + self.selection_bias, dim=-1, descending=True)
        sorted_probs = probs.gather(-1, order)
        # An expert is kept while the mass *before* it is still below p.
        keep_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) < self.threshold
        active = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        indices, weights = pad_to_sentinel(active, probs)
        self.record_load(indices)
        return logits, weights, indices


class _StraightThroughStep(torch.autograd.Function):
    """``sign(x)`` for ``x >= 0`` in the forward pass, identity in the backward pass (DynMoE's gate)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class TopAnyRouter(nn.Module):
    """DynMoE's top-any gate: a token activates **every** expert whose score exceeds that expert's threshold.

    ``score_e = sigmoid(cos(x, w_e))`` with ``w_e`` a column of the orthogonally initialised ``sim_matrix``;
    ``threshold_e = sigmoid(gates_e)`` with trainable ``gates`` (0 at init, so 0.5). The on/off decision goes
    through a straight-through step, so the scores and thresholds get gradients. Active experts are combined with
    uniform weights ``1 / K_token``. In training a token that activates nothing gets no expert (only the residual
    carries it); at eval it falls back to its argmax expert. ``experts_mask`` (a persistent buffer) switches expert
    slots on and off for DynMoE's adaptive add/remove process; slots beyond ``top_any_init_experts`` start off.
    The returned logits are the cosine scores of the active slots (``-inf`` for switched-off slots).
    """

    def __init__(self, config: Any, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_routed_slots(config)
        self.initial_experts = config.top_any_init_experts or self.num_experts
        self.sim_matrix = nn.Parameter(torch.empty(hidden_size, self.num_experts))
        self.gates = nn.Parameter(torch.zeros(self.num_experts))
        self.register_buffer("experts_mask", torch.zeros(self.num_experts))
        # DynMoE's adaptive process: what the experts received while recording (not saved: a window's statistics).
        self.recording = False
        self.register_buffer("routing_records", torch.zeros(self.num_experts), persistent=False)
        self.register_buffer("unrouted_sum", torch.zeros(hidden_size), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Orthogonal expert embeddings, thresholds at sigmoid(0) = 0.5, the first ``top_any_init_experts`` slots on
        (``std`` is accepted for a uniform router interface and unused)."""
        init.orthogonal_(self.sim_matrix)
        init.zeros_(self.gates)
        init.copy_(self.experts_mask, (torch.arange(self.num_experts) < self.initial_experts).float())
        init.zeros_(self.routing_records)
        init.zeros_(self.unrouted_sum)

    @torch.no_grad()
    def adapt_experts(self) -> tuple[list[int], list[int]]:
        """DynMoE's add/remove step, from what was recorded since recording started (all processes' records when
        distributed): switch off every active expert that received no token, and when some tokens activated no
        expert, switch on the first inactive slot with its embedding set to the normalised sum of those tokens and
        its threshold reset. Returns ``(removed, added)`` slot indices and clears the records."""
        records, unrouted = self.routing_records, self.unrouted_sum
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(records)
            torch.distributed.all_reduce(unrouted)
        active = self.experts_mask > 0
        removed = (active & (records == 0)).nonzero().flatten().tolist() if records.sum() > 0 else []
        self.experts_mask[removed] = 0.0
        added = []
        inactive = (self.experts_mask == 0).nonzero().flatten().tolist()
        if unrouted.abs().sum() > 0 and inactive:
            slot = inactive[0]
            self.experts_mask[slot] = 1.0
            self.sim_matrix[:, slot] = F.normalize(unrouted.to(self.sim_matrix.dtype), dim=0)
            self.gates[slot] = 0.0
            added.append(slot)
        records.zero_()
        unrouted.zero_()
        return removed, added

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        x = hidden_states.reshape(-1, self.hidden_size).to(routing_dtype(hidden_states))
        cosine = F.normalize(x, dim=-1) @ F.normalize(self.sim_matrix.to(x.dtype), dim=0)
        scores = torch.sigmoid(cosine) * self.experts_mask
        gate = _StraightThroughStep.apply(scores - torch.sigmoid(self.gates.to(x.dtype)))
        active = gate.detach() > 0
        if self.recording and self.training:
            with torch.no_grad():
                self.routing_records += active.sum(dim=0).to(self.routing_records.dtype)
                self.unrouted_sum += x[~active.any(dim=-1)].sum(dim=0).to(self.unrouted_sum.dtype)
        if not self.training:
            fallback = ~active.any(dim=-1, keepdim=True)
            argmax = torch.zeros_like(active).scatter(-1, scores.argmax(dim=-1, keepdim=True), True)
            active = active | (fallback & argmax)
            gate = torch.where(active, torch.ones_like(gate), gate)
        weights = gate * active / active.sum(dim=-1, keepdim=True).clamp_min(1)
        indices, weights = pad_to_sentinel(active, weights)
        logits = cosine.masked_fill(self.experts_mask == 0, float("-inf"))
        return logits, weights, indices


class DenseToSparseRouter(Router):
    """EvoMoE's dense-to-sparse gate: Gumbel-softmax over the logits at temperature ``tau``; the experts whose gate
    value exceeds ``gumbel_selection_threshold`` are selected and combined with those gate values. ``tau`` anneals
    from ``gumbel_tau_max`` to ``gumbel_tau_min`` as ``tau_max * (tau_min / tau_max) ** (step / decay_steps)``, so
    routing starts nearly dense and becomes sparse. ``step`` counts training forward passes (a persistent buffer,
    so a resumed run keeps its temperature). At eval no noise is drawn; the softmax at the current ``tau`` is used.
    """

    def __init__(self, config: Any, hidden_size: int):
        super().__init__(config, hidden_size)
        self.tau_max = config.gumbel_tau_max
        self.tau_min = config.gumbel_tau_min
        self.decay_steps = config.gumbel_tau_decay_steps
        self.threshold = config.gumbel_selection_threshold
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def reset_parameters(self, std: float) -> None:
        super().reset_parameters(std)
        init.zeros_(self.step)

    @property
    def temperature(self) -> float:
        progress = float(self.step.item()) / self.decay_steps
        return max(self.tau_max * math.exp(math.log(self.tau_min / self.tau_max) * progress), self.tau_min)

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        logits = self.logits(hidden_states)
        tau = self.temperature
        if self.training:
            gates = F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
            self.step += 1
        else:
            gates = torch.softmax(logits / tau, dim=-1)
        active = gates > self.threshold
        indices, weights = pad_to_sentinel(active, gates)
        self.record_load(indices)
        return logits, weights, indices


ROUTER_CLASSES: dict[str, type[nn.Module]] = {
    "softmax_topk": TopKRouter,
    "topk_softmax": TopKRouter,
    "sigmoid_topk": TopKRouter,
    "bias_balanced": TopKRouter,
    "top_p": TopPRouter,
    "top_any": TopAnyRouter,
    "dense_to_sparse": DenseToSparseRouter,
}


def build_router(config: Any, hidden_size: int) -> nn.Module:
    """The router named by ``config.router_type``."""
    try:
        router_cls = ROUTER_CLASSES[config.router_type]
    except KeyError:
        raise ValueError(
            f"`router_type` is {config.router_type!r}, but it must be one of {tuple(ROUTER_CLASSES)}."
        ) from None
    return router_cls(config, hidden_size)


def routes_variable_experts(config: Any) -> bool:
    """Whether the router can leave sentinel slots (a variable number of experts per token)."""
    return config.router_type in ("top_p", "top_any", "dense_to_sparse")
