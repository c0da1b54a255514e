"""moe_zoo's experts implementation: one sort, one grouped GEMM per projection, a hand-written backward.

Registered in transformers' ``ExpertsInterface`` as ``"moe_zoo"`` (on ``import moe_zoo``) and the default of the
moe_zoo models, so ``from_pretrained(..., experts_implementation="moe_zoo")`` also runs it on transformers' own
MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, ...). What it does differently from transformers' ``eager`` (a loop
over experts with a mask each and ``index_add_``) and ``grouped_mm`` (autograd through gathers, a permutation and
``_grouped_mm``):

- the pairs are sorted by expert once (:func:`~moe_zoo.core.routed_pairs.route_pairs`, which also handles empty
  slots: top-p / top-any padding, null experts and capacity-dropped tokens cost nothing, with no Python loop over
  tokens); ``gate`` and ``up`` are one ``(E, 2I, H)`` grouped GEMM (one MKL ``sgemm_batch`` for fp32 on CPU where
  ``MOE_ZOO_MKL`` asks for it, by default without a backward; one
  ``torch._grouped_mm`` or moe_zoo's Triton kernel on CUDA, else a matmul per expert);
- :class:`~moe_zoo.core.gated_combine.GatedCombine` applies ``act(gate) * up`` and differentiates it in place;
- the routing weights are applied inside the per-token sum (a gather and a ``(1, k) @ (k, H)`` product per token,
  no ``index_add_``, no per-token copy of any weight);
- on CUDA with Triton, the grouped GEMMs are moe_zoo's Triton kernels (:mod:`~moe_zoo.core.triton_grouped`),
  which read the token rows through the pairs' index (ScatterMoE's fused gather): no gathered copy is made or kept;
- :class:`_ExpertsFunction` writes the backward by hand: it saves the gathered rows (the input itself where the
  gather is fused), the pre-activations and the hidden activations (not the expert outputs: the routing weights'
  gradient is ``<W_d^T g, h> + <g, b_d>``, the product SonicMoE uses), gets every weight gradient as one outer
  product per expert, and never replays autograd's gathers and scatters;
- on CPU the weight gradients reuse memory the bank keeps between steps when the previous ones are gone
  (:mod:`~moe_zoo.core.gradient_buffers`), instead of faulting tens of MB of fresh pages in on every backward.

Layouts: gated experts (``gate_up_proj (E, 2I, H)``, ``[gate; up]`` concatenated, ``down_proj (E, H, I)``), plain
experts (``up_proj`` + activation), either with biases, transposed storage (``(E, H, 2I)``) and a class's own
``_apply_gate`` (GPT-OSS's clamped, interleaved SwiGLU, differentiated by autograd) included. A post-expert norm
or expert parallelism falls back to transformers' ``grouped_mm`` implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate, grouped_mm_experts_forward

from .gated_combine import GatedCombine, combine_backward, combine_forward
from .gradient_buffers import GradientBuffers, gradient_buffers
from .routed_pairs import RoutedPairs, Scratch, expert_linear, expert_outer, fuses_gather, route_pairs, rowdot

IMPLEMENTATION_NAME = "moe_zoo"
"""The name under which :func:`moe_zoo_experts_forward` is registered in transformers' ``ExpertsInterface``."""


@dataclass(frozen=True)
class _Spec:
    combine: Callable[..., torch.Tensor]
    differentiable: bool
    gradient_buffers: GradientBuffers


def _weight_gradient(
    spec: _Spec,
    name: str,
    left: torch.Tensor,
    right: torch.Tensor,
    routed: RoutedPairs,
    right_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(E, a, b)`` weight gradient :func:`expert_outer` of ``left (P, a)`` and ``right (P, b)`` (rows
    ``right[right_index]`` where given), in the bank's kept memory where it is free (see
    :mod:`~moe_zoo.core.gradient_buffers`)."""
    out = spec.gradient_buffers.take(name, (routed.num_experts, left.shape[1], right.shape[1]), left)
    return expert_outer(left, right, routed, out=out, right_index=right_index)


def _add_expert_bias(rows: torch.Tensor, bias: torch.Tensor | None, routed: RoutedPairs) -> None:
    """``rows[p] += bias[expert of p]`` in place, one broadcast add per expert's row block."""
    if bias is None:
        return
    for expert, span in routed.spans():
        rows[span].add_(bias[expert].to(rows.dtype))


def _expert_sums(rows: torch.Tensor, routed: RoutedPairs) -> torch.Tensor:
    """``out[e] = sum of the rows of expert e``: the gradient of a per-expert bias."""
    out = rows.new_zeros(routed.num_experts, rows.shape[1])
    for expert, span in routed.spans():
        torch.sum(rows[span], 0, out=out[expert])
    return out


class _ExpertsFunction(torch.autograd.Function):
    """Forward and hand-written backward of the expert bank for the expert-sorted pairs of ``routed``.

    Inputs: ``x (T, H)``, ``pair_weights (P,)`` (routing weight of each sorted pair; its gradient reaches
    ``top_k_weights`` through the caller's gather), ``up_weight (E, U, H)`` (``U = 2I`` for gated experts),
    ``up_bias (E, U)`` or None, ``down_weight (E, H, I)``, ``down_bias (E, H)`` or None.
    """

    @staticmethod
    def forward(ctx, spec: _Spec, routed: RoutedPairs, x, pair_weights, up_weight, up_bias, down_weight, down_bias):
        gather_fused = fuses_gather(routed, x, up_weight)  # the Triton kernels read x[tokens] in place
        rows, row_index = (x, routed.tokens) if gather_fused else (x.index_select(0, routed.tokens), None)
        pre = expert_linear(rows, up_weight, routed, index=row_index)
        _add_expert_bias(pre, up_bias, routed)
        hidden, hidden_graph = combine_forward(spec.combine, (pre,), spec.differentiable)
        down = expert_linear(hidden, down_weight, routed)
        _add_expert_bias(down, down_bias, routed)
        slot_weights = routed.slot_values(pair_weights.to(down.dtype))
        out = routed.sum_per_token(down, slot_weights)
        if not spec.differentiable:
            return out
        ctx.spec, ctx.routed, ctx.hidden_graph, ctx.row_index = spec, routed, hidden_graph, row_index
        ctx.save_for_backward(rows, pair_weights, hidden, pre, up_weight, down_weight, down_bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        spec, routed = ctx.spec, ctx.routed
        rows, pair_weights, hidden, pre, up_weight, down_weight, down_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad  # False for the biases a bank does not have (None inputs)
        scratch = Scratch()
        grad_pair_out = grad_out.to(hidden.dtype).index_select(0, routed.tokens)  # g of each pair's token
        grad_hidden = expert_linear(grad_pair_out, down_weight.transpose(1, 2), routed)  # W_d^T g, unweighted
        grad_weights = None
        if needs[3]:
            grad_weights = rowdot(grad_hidden, hidden, scratch)
            if down_bias is not None:
                for expert, span in routed.spans():
                    grad_weights[span] += grad_pair_out[span] @ down_bias[expert].to(grad_pair_out.dtype)
            grad_weights = grad_weights.to(pair_weights.dtype)
        weights = pair_weights.to(hidden.dtype).unsqueeze(-1)
        grad_down_weight = grad_down_bias = None
        if needs[6] or needs[7]:
            weighted = grad_pair_out.mul_(weights)
            if needs[6]:
                grad_down_weight = _weight_gradient(spec, "down", weighted, hidden, routed).to(down_weight.dtype)
            if needs[7]:
                grad_down_bias = _expert_sums(weighted, routed).to(down_weight.dtype)
        del grad_pair_out
        grad_hidden.mul_(weights)
        (grad_pre,) = combine_backward(spec.combine, (pre,), ctx.hidden_graph, grad_hidden)
        del grad_hidden
        grad_up_weight = None
        if needs[4]:
            grad_up_weight = _weight_gradient(spec, "up", grad_pre, rows, routed, ctx.row_index).to(up_weight.dtype)
        grad_up_bias = _expert_sums(grad_pre, routed).to(up_weight.dtype) if needs[5] else None
        grad_x = None
        if needs[2]:
            grad_rows = expert_linear(grad_pre, up_weight.transpose(1, 2), routed)
            grad_x = routed.sum_per_token(grad_rows, routed.slot_mask, scratch=scratch).to(rows.dtype)
        return None, None, grad_x, grad_weights, grad_up_weight, grad_up_bias, grad_down_weight, grad_down_bias


def _combine_of(module: nn.Module) -> Callable[..., torch.Tensor]:
    """The activation step of ``module``'s experts, built once per module (GatedCombine probes for SiLU):
    :class:`GatedCombine` for the default gate, else the module's own ``_apply_gate`` or ``act_fn`` (then
    differentiated by autograd on a local graph)."""
    act_fn = getattr(module, "act_fn", None)  # a class with its own _apply_gate may have none (GPT-OSS)
    cached = module.__dict__.get("_moe_zoo_combine")
    if cached is not None and cached[0] is act_fn:
        return cached[1]
    if not module.has_gate:
        combine = act_fn
    elif _uses_default_gate(module):
        combine = GatedCombine(act_fn, chunked=True)
    else:
        combine = module._apply_gate
    module.__dict__["_moe_zoo_combine"] = (act_fn, combine)
    return combine


def _uses_default_gate(module: nn.Module) -> bool:
    return getattr(type(module)._apply_gate, "__func__", type(module)._apply_gate) is _default_apply_gate


def _expert_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(up (E, U, H), up bias, down (E, H, I), down bias)`` of a decorated experts module, untransposed (a view)."""
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up, down = getattr(module, up_name), module.down_proj
    if module.is_transposed:
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    up_bias = getattr(module, f"{up_name}_bias", None) if module.has_bias else None
    down_bias = getattr(module, "down_proj_bias", None) if module.has_bias else None
    return up, up_bias, down, down_bias


def supports(module: nn.Module) -> bool:
    """Whether :func:`moe_zoo_experts_forward` handles ``module``'s layout (else it defers to ``grouped_mm``)."""
    interleaved_default_gate = not getattr(module, "is_concatenated", True) and _uses_default_gate(module)
    return not (
        interleaved_default_gate
        or getattr(module, "has_post_expert_norm", False)
        or getattr(module, "_is_expert_parallel", False)
    )


def moe_zoo_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``ExpertsInterface`` function: ``(T, H)`` states, ``(T, k)`` expert indices (``num_experts`` or more
    marks an empty slot) and routing weights -> ``(T, H)``, for any experts module decorated with transformers'
    ``use_experts_implementation`` (see the module docstring)."""
    if not supports(self):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    up, up_bias, down, down_bias = _expert_weights(self)
    inputs = (hidden_states, top_k_weights, up, up_bias, down, down_bias)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    # any index >= num_experts is an empty slot
    routed = route_pairs(top_k_index, self.num_experts, backward=differentiable)
    pair_weights = top_k_weights.reshape(-1)[routed.pairs]
    tensors = (hidden_states, pair_weights, up, up_bias, down, down_bias)
    spec = _Spec(_combine_of(self), differentiable, gradient_buffers(self))
    out = _ExpertsFunction.apply(spec, routed, *tensors)
    return out.to(hidden_states.dtype)


def register_experts_implementation() -> None:
    """Make ``experts_implementation="moe_zoo"`` valid for every transformers model (harmless if repeated)."""
    ExpertsInterface.register(IMPLEMENTATION_NAME, moe_zoo_experts_forward)
