"""LoRA experts on one shared frozen FFN (MixLoRA-style), computed for all routed (token, expert) pairs at once.

Expert ``e`` is the frozen FFN with a LoRA pair on some projections: ``proj_e(x) = W x + b + s B_e A_e x``. The
mixture ``sum_e w_e expert_e(x)`` is computed without running the frozen weights once per expert:

- every input projection (``gate_proj`` and ``up_proj``, Phi's ``fc1``, Phi-3's ``gate_up_proj``) runs its frozen
  weight **once over all tokens**; each routed pair gathers its token's row and adds only its expert's LoRA delta;
- the layout's ``combine`` (``act(gate) * up``, ``act(h)``, ...) turns each pair's pre-activations into its hidden
  activation ``h_p``;
- the frozen output projection runs **once** on the routing-weighted sum ``sum_p w_p h_p`` of each token (exact,
  since it is linear; its bias is added with weight ``sum_p w_p``), plus the weighted output LoRA deltas.

So the frozen FLOPs equal the dense FFN's, and the per-pair work is the rank-``r`` LoRA matmuls and a few
elementwise passes over ``(pairs, intermediate)`` rows, which is what this module keeps few:

- the pairs are sorted by expert once and the per-expert LoRA matmuls and per-token sums run in the layout of
  :mod:`moe_zoo.core.routed_pairs` (grouped matmuls, no ``index_add_``, chunked temporaries on CPU); on CPU the
  input LoRA B products accumulate into the gathered rows in place (``addmm_``), and the frozen products' buffer is
  reused, because a fresh tensor of tens of MB costs page faults on every call;
- :class:`_LoraExpertsFunction` writes the backward by hand instead of letting autograd store and replay every
  gather and scatter: no gradient for the frozen weights unless they require one, the LoRA weight gradients as
  grouped outer products, the routing weights' gradient as row-wise dot products, and buffers reused in place.
  ``combine`` runs through :func:`~moe_zoo.core.gated_combine.combine_forward` / ``combine_backward``;
- for large fp32 CPU calls of the SiLU-gated layout, everything between the matmuls runs in one fused C pass per
  direction (:mod:`moe_zoo.core.lora_pairs_kernel`): per token, each routed pair adds its rank-``r`` LoRA deltas to
  the frozen products, applies ``silu(gate) * up`` and is mixed in with its weight, so no ``(pairs,
  intermediate)`` tensor is written in the forward; the backward recomputes the pre-activations (the layer saves the
  ``(tokens, intermediate)`` frozen products and the ``(pairs, r)`` LoRA A products instead of three ``(pairs,
  intermediate)`` tensors) and writes its per-pair gradients into buffers kept from call to call. On CPU those
  passes over ``(pairs, intermediate)`` tensors, not the arithmetic, were what the mixture cost beyond the dense FFN.

Sentinel index ``num_experts`` (top-p padding, capacity-dropped tokens) marks an empty slot: it gets no pair, no
compute and weight 0, and a token with only empty slots gets a zero output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import lora_pairs_kernel
from .gated_combine import combine_backward, combine_forward
from .lora_pairs_kernel import workspace
from .routed_pairs import RoutedPairs, Scratch, expert_linear, expert_outer, route_pairs, rowdot


@dataclass(frozen=True)
class LoraProjection:
    """One projection of the shared FFN: the frozen ``weight (out, in)`` and ``bias (out,)`` (or None), and the
    experts' LoRA pairs stacked over experts, ``lora_A (E, r, in)`` and ``lora_B (E, out, r)``, or None when the
    projection is not adapted (then every expert uses the frozen projection)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.weight, self.bias, self.lora_A, self.lora_B)


@dataclass(frozen=True)
class _Spec:
    """What :class:`_LoraExpertsFunction` needs besides its tensors."""

    num_inputs: int
    combine: Callable[..., torch.Tensor]
    scaling: float
    dropout: float
    differentiable: bool


def _dropout_masks(
    routed: RoutedPairs, widths: Sequence[int | None], like: torch.Tensor, p: float
) -> list[torch.Tensor | None]:
    """Inverted-dropout masks (0 or ``1 / (1 - p)``), ``(P, width)`` for each adapted projection (None where the
    width is None), one draw per element as ``nn.Dropout`` makes.

    They are drawn expert by expert and, within an expert, projection by projection: the order in which a loop over
    experts (the naive path, the original package) calls its dropout, so under one seed both draw the same masks."""
    if not p:
        return [None] * len(widths)
    masks = [None if w is None else like.new_empty(routed.num_pairs, w) for w in widths]
    for _, span in routed.spans():
        for mask in masks:
            if mask is not None:
                mask[span].bernoulli_(1.0 - p).div_(1.0 - p)
    return masks


def _lora_input(rows: torch.Tensor, dtype: torch.dtype, mask: torch.Tensor | None) -> torch.Tensor:
    """What a LoRA A reads: ``dropout(rows)`` (the mask applied in the rows' dtype), in the LoRA dtype."""
    return (rows if mask is None else rows * mask).to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor | None):
    """``F.linear(x, weight, bias)``, written into ``buffer`` when it is free and has the right shape and dtype."""
    shape = (x.shape[0], weight.shape[0])
    if buffer is None or buffer.shape != shape or buffer.dtype != x.dtype or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=buffer)
    return torch.addmm(bias.to(x.dtype), x, weight.t(), out=buffer)


def _split(flat: Sequence[torch.Tensor | None], num_inputs: int):
    projections = [tuple(flat[4 * i : 4 * i + 4]) for i in range(num_inputs + 1)]
    return projections[:num_inputs], projections[num_inputs]


class _LoraExpertsFunction(torch.autograd.Function):
    """Forward and hand-written backward of :func:`lora_experts_ffn` (see the module docstring).

    Inputs: ``x (T, H)``, ``pair_weights (P,)`` (routing weight of each expert-sorted pair; its gradient reaches the
    router through the caller's gather), then ``(weight, bias, lora_A, lora_B)`` of every input projection and of
    the output projection.
    """

    @staticmethod
    def forward(ctx, spec: _Spec, routed: RoutedPairs, x: torch.Tensor, pair_weights: torch.Tensor, *flat):
        inputs, output = _split(flat, spec.num_inputs)
        tokens = routed.tokens
        token_rows = x.index_select(0, tokens) if any(p[2] is not None for p in inputs) else None
        adapted = [p[2] is not None for p in (*inputs, output)]
        widths = [p[0].shape[1] if a else None for p, a in zip((*inputs, output), adapted, strict=True)]
        *input_masks, mask_o = _dropout_masks(routed, widths, x, spec.dropout)
        pair_elements = routed.num_pairs * sum(p[0].shape[0] for p in inputs)
        fused = spec.num_inputs == 2 and lora_pairs_kernel.usable(
            spec.combine, x, [x, pair_weights, *flat], pair_elements
        )
        pre_activations, input_saved, loras = [], [], []
        frozen = None  # eager: one (T, out) buffer for the frozen products, reused (fresh tensors cost page faults)
        for (weight, bias, lora_a, lora_b), mask in zip(inputs, input_masks, strict=True):
            lora_rows = scaled_a = None
            if lora_a is not None:
                lora_rows = _lora_input(token_rows, lora_a.dtype, mask)
                scaled_a = expert_linear(lora_rows, lora_a, routed).mul_(spec.scaling)
            input_saved.append((lora_rows, mask, scaled_a))
            if fused:  # the fused pass gathers the frozen product and adds the LoRA delta itself
                pre_activations.append(F.linear(x, weight, bias))
                loras.append(None if lora_a is None else (scaled_a, lora_b.transpose(1, 2).contiguous()))
                continue
            frozen = _linear(x, weight, bias, frozen)
            pre = frozen.index_select(0, tokens)
            if lora_a is not None:
                expert_linear(scaled_a, lora_b, routed, out=pre)
            pre_activations.append(pre)
        slot_weights = routed.slot_values(pair_weights.to(pre_activations[0].dtype))
        weight_o, bias_o, lora_a_o, lora_b_o = output
        scratch = Scratch()
        hidden = hidden_graph = lora_hidden = lora_a_out = routed_scale = None
        if fused:  # pre-activations and hidden states stay in cache; the backward recomputes them
            kept = spec.differentiable and output[0].requires_grad  # the output weight's gradient reads it
            like, shape = pre_activations[0], (x.shape[0], output[0].shape[1])
            mixed = like.new_empty(shape) if kept else workspace("mixed", shape, like)
            lora_a_out = None if lora_a_o is None else like.new_empty(routed.num_pairs, lora_a_o.shape[1])
            pre_activations = (pre_activations, loras)
            lora_pairs_kernel.forward(*pre_activations, routed, slot_weights, lora_a_o, mask_o, mixed, lora_a_out)
        else:
            hidden, hidden_graph = combine_forward(spec.combine, pre_activations, spec.differentiable)
            mixed = routed.sum_per_token(hidden, slot_weights, out=frozen, scratch=scratch)
            if lora_a_o is not None:
                lora_hidden = _lora_input(hidden, lora_a_o.dtype, mask_o)
                lora_a_out = expert_linear(lora_hidden, lora_a_o, routed)
        del frozen, loras

        out = F.linear(mixed.to(weight_o.dtype), weight_o)
        if bias_o is not None:
            out.addr_(slot_weights.sum(-1).to(out.dtype), bias_o)
        if lora_a_o is not None:
            routed_scale = pair_weights.to(lora_a_out.dtype).mul(spec.scaling).unsqueeze(-1)
            deltas = expert_linear(lora_a_out * routed_scale, lora_b_o, routed)
            out.add_(routed.sum_per_token(deltas, routed.slot_mask, scratch=scratch).to(out.dtype))
        if not spec.differentiable:
            return out

        ctx.spec, ctx.routed, ctx.fused = spec, routed, fused
        ctx.combine_state = (pre_activations, hidden_graph)
        ctx.input_saved = input_saved
        ctx.output_saved = (lora_hidden, mask_o, lora_a_out, routed_scale)
        ctx.mixed = mixed if weight_o.requires_grad else None
        ctx.save_for_backward(x, pair_weights, hidden, slot_weights, *flat)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        spec, routed = ctx.spec, ctx.routed
        x, pair_weights, hidden, slot_weights, *flat = ctx.saved_tensors
        inputs, output = _split(flat, spec.num_inputs)
        needs = ctx.needs_input_grad
        grad_flat: list[torch.Tensor | None] = [None] * len(flat)
        out_offset = 4 * spec.num_inputs
        tokens = routed.tokens
        grad_out = grad_out.contiguous()

        # Output projection: out = W_o (sum_p w_p h_p) + b_o sum_p w_p + sum_p w_p s B_e A_e drop(h_p).
        weight_o, bias_o, lora_a_o, lora_b_o = output
        hidden_width = weight_o.shape[1]
        # Fused: dead after the kernel, so a kept buffer (see lora_pairs_kernel.workspace); eager: reused below.
        buffer = workspace("grad_mixed", (grad_out.shape[0], hidden_width), weight_o) if ctx.fused else None
        grad_mixed = torch.mm(grad_out.to(weight_o.dtype), weight_o, out=buffer)
        if needs[4 + out_offset]:
            grad_flat[out_offset] = grad_out.t().to(ctx.mixed.dtype) @ ctx.mixed
        if bias_o is not None and needs[5 + out_offset]:
            grad_flat[out_offset + 1] = (slot_weights.sum(-1).to(grad_out.dtype) @ grad_out).to(bias_o.dtype)
        scratch = Scratch()
        grad_weights = grad_hidden = free = None
        if not ctx.fused:  # fused: the kernel computes these terms from grad_mixed
            grad_hidden = grad_mixed.to(hidden.dtype).index_select(0, tokens)
            free = grad_mixed  # dead from here on: the buffer of the per-token gradients below
            grad_weights = rowdot(grad_hidden, hidden, scratch) if needs[3] else None
            grad_hidden.mul_(pair_weights.to(hidden.dtype).unsqueeze(-1))
        if bias_o is not None and needs[3]:
            bias_term = (grad_out @ bias_o.to(grad_out.dtype)).index_select(0, tokens).to(slot_weights.dtype)
            grad_weights = bias_term if grad_weights is None else grad_weights.add_(bias_term)
        output_lora = mask_o = None
        if lora_a_o is not None:
            lora_hidden, mask_o, lora_a_out, routed_scale = ctx.output_saved
            grad_pair_out = grad_out.to(lora_b_o.dtype).index_select(0, tokens)
            grad_scaled = expert_linear(grad_pair_out, lora_b_o.transpose(1, 2), routed)
            if needs[7 + out_offset]:
                grad_flat[out_offset + 3] = expert_outer(grad_pair_out, lora_a_out * routed_scale, routed)
            del grad_pair_out
            if needs[3]:
                grad_dot = torch.linalg.vecdot(grad_scaled, lora_a_out).mul_(spec.scaling).to(slot_weights.dtype)
                grad_weights = grad_dot if grad_weights is None else grad_weights.add_(grad_dot)
            grad_a_out = grad_scaled.mul_(routed_scale)
            if needs[6 + out_offset] and not ctx.fused:  # fused: after the kernel, which recomputes h
                grad_flat[out_offset + 2] = expert_outer(grad_a_out, lora_hidden, routed)
            output_lora = (grad_a_out, lora_a_o)
            if not ctx.fused:
                if mask_o is None:
                    expert_linear(grad_a_out, lora_a_o.transpose(1, 2), routed, out=grad_hidden)
                else:
                    grad_lora_hidden = expert_linear(grad_a_out, lora_a_o.transpose(1, 2), routed).mul_(mask_o)
                    grad_hidden.add_(grad_lora_hidden.to(grad_hidden.dtype))
                    del grad_lora_hidden

        pre_activations, hidden_graph = ctx.combine_state
        if ctx.fused:
            grad_gate, grad_up, lora_hidden, dots, token_grads, kernel_grad_a = lora_pairs_kernel.backward(
                *pre_activations, routed, slot_weights, grad_mixed, output_lora, mask_o
            )
            grad_pre = [grad_gate, grad_up]
            if needs[3]:
                grad_weights = dots if grad_weights is None else grad_weights.add_(dots.to(grad_weights.dtype))
            if lora_a_o is not None and needs[6 + out_offset]:
                grad_flat[out_offset + 2] = expert_outer(grad_a_out, lora_hidden, routed)
            del output_lora, lora_hidden
        else:
            grad_pre = combine_backward(spec.combine, pre_activations, hidden_graph, grad_hidden)
        del grad_hidden, grad_mixed

        # Input projections: pre_p = (W x + b)[token_p] + s B_e A_e drop(x[token_p]).
        grad_x = None
        grad_token_rows = None
        for index, ((weight, bias, lora_a, lora_b), grad, saved) in enumerate(
            zip(inputs, grad_pre, ctx.input_saved, strict=True)
        ):
            offset = 4 * index
            if ctx.fused:
                grad_base = token_grads[index]
            else:
                grad_base = free = routed.sum_per_token(grad, routed.slot_mask, out=free, scratch=scratch)
            if needs[2]:
                if grad_x is None:
                    grad_x = grad_base.to(weight.dtype) @ weight
                else:
                    grad_x.addmm_(grad_base.to(weight.dtype), weight)
            if needs[4 + offset]:
                grad_flat[offset] = grad_base.t().to(x.dtype) @ x
            if bias is not None and needs[5 + offset]:
                grad_flat[offset + 1] = grad_base.sum(0).to(bias.dtype)
            if lora_a is None:
                continue
            lora_rows, mask, scaled_a = saved
            grad = grad.to(lora_b.dtype)
            if needs[7 + offset]:
                grad_flat[offset + 3] = expert_outer(grad, scaled_a, routed)
            if ctx.fused:
                grad_a = kernel_grad_a[index].mul_(spec.scaling)
            else:
                grad_a = expert_linear(grad, lora_b.transpose(1, 2), routed).mul_(spec.scaling)
            if needs[6 + offset]:
                grad_flat[offset + 2] = expert_outer(grad_a, lora_rows, routed)
            if not needs[2]:
                continue
            if mask is None and grad_token_rows is not None:
                expert_linear(grad_a, lora_a.transpose(1, 2), routed, out=grad_token_rows)
                continue
            grad_rows = expert_linear(grad_a, lora_a.transpose(1, 2), routed)
            if mask is not None:
                grad_rows.mul_(mask)
            grad_token_rows = grad_rows if grad_token_rows is None else grad_token_rows.add_(grad_rows)
        if grad_token_rows is not None:
            grad_x.add_(routed.sum_per_token(grad_token_rows, routed.slot_mask, scratch=scratch).to(grad_x.dtype))
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_weights is not None:
            grad_weights = grad_weights.to(pair_weights.dtype)
        return (None, None, grad_x, grad_weights, *grad_flat)


def lora_experts_ffn(
    hidden_states: torch.Tensor,
    routing_weights: torch.Tensor,
    expert_indices: torch.Tensor,
    num_experts: int,
    inputs: Sequence[LoraProjection],
    combine: Callable[..., torch.Tensor],
    output: LoraProjection,
    scaling: float,
    dropout: float = 0.0,
    grouped: bool | None = None,
) -> torch.Tensor:
    """The mixture of LoRA experts on one shared frozen FFN (see the module docstring), exact to running every
    routed expert as its own FFN.

    Args:
        hidden_states: ``(T, H)`` token states.
        routing_weights: ``(T, k)`` weight of each choice (gets a gradient, e.g. to the router).
        expert_indices: ``(T, k)`` expert of each choice; ``num_experts`` marks an empty slot (weight 0).
        num_experts: ``E``, the leading size of every ``lora_A`` / ``lora_B``.
        inputs: the projections that read the token states, in the order ``combine`` takes their outputs.
        combine: ``(*pre_activations) -> hidden`` per pair, e.g. :class:`GatedCombine` for ``act(gate) * up``, or
            any differentiable torch function of ``(P, out_i)`` rows (autograd differentiates it).
        output: the projection from the hidden activation back to the model width.
        scaling: the LoRA scaling ``s`` (``alpha / r``).
        dropout: LoRA dropout probability, applied to what each LoRA A reads, independently per pair and
            projection as a per-expert ``nn.Dropout`` would; pass 0 at eval.
        grouped: per-expert matmuls with ``torch._grouped_mm`` (None: on CUDA, where it runs for the dtype);
            on CUDA moe_zoo's Triton kernels come first either way (see :func:`~moe_zoo.core.routed_pairs.route_pairs`).

    Returns ``(T, out)``. Frozen weights and biases get gradients only if they require one.
    """
    flat = [t for projection in (*inputs, output) for t in projection.tensors()]
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_states, routing_weights, *flat)
    )
    routed = route_pairs(expert_indices, num_experts, grouped, backward=differentiable)
    pair_weights = routing_weights.reshape(-1)[routed.pairs]
    spec = _Spec(len(inputs), combine, float(scaling), float(dropout), differentiable)
    return _LoraExpertsFunction.apply(spec, routed, hidden_states, pair_weights, *flat)
