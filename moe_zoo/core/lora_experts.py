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

- the pairs are sorted by expert once (:func:`route_pairs`), each expert's rows contiguous, so the per-expert LoRA
  matmuls are one grouped matmul (``torch._grouped_mm`` with offsets, used on CUDA where it runs) or a loop of
  ``addmm_`` over the experts' row blocks that accumulates into the rows in place (on CPU, where
  ``_grouped_mm`` is itself a loop of ``mm`` into a new tensor, so the loop saves a pass and an allocation);
- tokens are recombined by a gather into slot order and one batched ``(1, k) @ (k, D)`` product per token, never
  with ``index_add_`` (atomic on GPU; on CPU it is fast on one thread but slow with several); on CPU the gathers
  and products run in chunks through one small reused buffer (:class:`Scratch`), and the frozen products' buffer is
  reused, because a fresh tensor of tens of MB is returned to the OS when freed and costs page faults (on a VM,
  more than the pass over it) on every call;
- :class:`_LoraExpertsFunction` writes the backward by hand instead of letting autograd store and replay every
  gather and scatter: no gradient for the frozen weights unless they require one, the LoRA weight gradients as
  grouped outer products, the routing weights' gradient as row-wise dot products, and buffers reused in place.
  ``combine`` is differentiated by its own ``backward`` when it has one (:class:`GatedCombine`), else by autograd
  on a small local graph recorded in the forward, so any layout's activation works unchanged.

Sentinel index ``num_experts`` (top-p padding, capacity-dropped tokens) marks an empty slot: it gets no pair, no
compute and weight 0, and a token with only empty slots gets a zero output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .experts import ExpertGroups, group_by_expert

CPU_SCRATCH_BYTES = 8 * 2**20
"""Chunk size of the temporaries on CPU: small enough that the allocator reuses the memory (a fresh tensor of tens
of MB is handed back to the OS when freed and costs page faults again on each call) and that it stays in cache."""


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


def _computes_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``act_fn`` is SiLU (``nn.SiLU``, ``F.silu``, transformers' ``SiLUActivation``, ...), checked on a
    small probe (exact equality), so any module computing SiLU gets the fused derivative."""
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU):
        return True
    probe = torch.linspace(-8.0, 8.0, 161)
    try:
        with torch.no_grad():
            return torch.equal(act_fn(probe), F.silu(probe))
    except (RuntimeError, TypeError):
        return False


class GatedCombine:
    """``combine(gate, up) = act(gate) * up`` (Llama, Qwen2, Mistral, Gemma), or with ``chunked=True``
    ``combine(gate_up)`` on one projection whose first half is the gate (Phi-3's ``gate_up_proj``), with a backward
    that works in place on the gradient buffer: one new ``(P, I)`` tensor instead of autograd's three. SiLU uses its
    fused derivative; any other activation is differentiated by autograd."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor], chunked: bool = False):
        self.act_fn = act_fn
        self.chunked = chunked
        self.is_silu = _computes_silu(act_fn)

    def _gate_up(self, pre: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(pre[0].chunk(2, dim=-1)) if self.chunked else tuple(pre)

    def __call__(self, *pre: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up(pre)
        hidden = self.act_fn(gate)
        if hidden.requires_grad or hidden is gate:
            return hidden * up
        return hidden.mul_(up)

    def backward(self, grad_hidden: torch.Tensor, *pre: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradients of ``pre`` (``grad_hidden`` is overwritten: without ``chunked`` it becomes the gate's)."""
        gate, up = self._gate_up(pre)
        if self.chunked:
            grad = torch.empty_like(pre[0])
            grad_gate, grad_up = grad.chunk(2, dim=-1)
        else:
            grad_gate, grad_up = grad_hidden, torch.empty_like(up)
        if self.is_silu:
            torch.ops.aten.silu.out(gate, out=grad_up)
            grad_up.mul_(grad_hidden)
            grad_up_times = grad_hidden.mul_(up) if not self.chunked else torch.mul(grad_hidden, up, out=grad_gate)
            torch.ops.aten.silu_backward.grad_input(grad_up_times, gate, grad_input=grad_gate)
        else:
            with torch.enable_grad():
                leaf = gate.detach().requires_grad_()
                activated = self.act_fn(leaf)
            torch.mul(activated.detach(), grad_hidden, out=grad_up)
            (grad_act,) = torch.autograd.grad(activated, leaf, grad_hidden.mul_(up))
            if not self.chunked:
                return grad_act, grad_up
            grad_gate.copy_(grad_act)
        return (grad,) if self.chunked else (grad_gate, grad_up)


@dataclass
class RoutedPairs(ExpertGroups):
    """The routed (token, expert) pairs of a ``(T, k)`` index tensor, in the layout the kernel works in.

    :func:`~moe_zoo.core.experts.group_by_expert`'s sort (``pairs``, ``tokens``, ``counts``, ``spans()``), plus:
    ``slot_pair[s]`` maps each slot back to its pair row (0 for an empty slot, whose ``slot_mask`` is 0), so a
    per-pair tensor is put back in token order by one gather; ``offsets`` (int32, cumulative counts) are what
    ``torch._grouped_mm`` takes.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    offsets: torch.Tensor
    slot_pair: torch.Tensor
    slot_mask: torch.Tensor
    grouped: bool

    @property
    def num_pairs(self) -> int:
        return self.tokens.shape[0]

    def slot_values(self, per_pair: torch.Tensor) -> torch.Tensor:
        """A ``(P,)`` per-pair value laid out per slot as ``(T, k)``, 0 in empty slots."""
        slots = per_pair.new_zeros(self.num_tokens * self.top_k)
        slots[self.pairs] = per_pair
        return slots.view(self.num_tokens, self.top_k)

    def sum_per_token(
        self,
        rows: torch.Tensor,
        slot_weights: torch.Tensor,
        out: torch.Tensor | None = None,
        scratch: Scratch | None = None,
    ) -> torch.Tensor:
        """``out[t] = sum_j slot_weights[t, j] * rows[pair of slot (t, j)]``: ``(P, D)`` -> ``(T, D)``.

        A gather into slot order (into ``scratch``, by token chunks on CPU) and a batched ``(1, k) @ (k, D)`` product
        per token; empty slots read row 0 with weight 0. Written into ``out`` when it is a free buffer of that shape.
        """
        num_tokens, top_k, width = self.num_tokens, self.top_k, rows.shape[1]
        if out is None or out.shape != (num_tokens, width) or out.dtype != rows.dtype or not out.is_contiguous():
            out = rows.new_empty(num_tokens, width)
        if rows.shape[0] == 0:
            return out.zero_()
        weights = slot_weights.to(rows.dtype).unsqueeze(1)
        scratch = scratch if scratch is not None else Scratch()
        step = scratch.rows_for(width * top_k, rows)
        for start in range(0, num_tokens, step):
            stop = min(start + step, num_tokens)
            by_slot = scratch.take((stop - start) * top_k * width, rows)
            torch.index_select(rows, 0, self.slot_pair[start * top_k : stop * top_k], out=by_slot)
            by_slot = by_slot.view(stop - start, top_k, width)
            torch.bmm(weights[start:stop], by_slot, out=out[start:stop].unsqueeze(1))
        return out


class Scratch:
    """One flat buffer reused by the temporaries of one forward or backward, chunk after chunk (see
    :data:`CPU_SCRATCH_BYTES`); off CPU a chunk is the whole tensor."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def rows_for(self, width: int, like: torch.Tensor) -> int:
        """How many rows of ``width`` elements one chunk holds: all of them off CPU, ``CPU_SCRATCH_BYTES`` on CPU."""
        if like.device.type != "cpu":
            return 1 << 62
        return max(1, CPU_SCRATCH_BYTES // (width * like.element_size()))

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        buffer = self.buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffer = like.new_empty(numel)
        return buffer[:numel].view(-1, like.shape[-1])


def route_pairs(expert_indices: torch.Tensor, num_experts: int, grouped: bool | None = None) -> RoutedPairs:
    """Sort the routed pairs of ``expert_indices (T, k)`` by expert (one sort, one host sync for the counts).

    ``grouped``: run the per-expert matmuls with ``torch._grouped_mm`` (None: on CUDA when it runs there)."""
    num_tokens, top_k = expert_indices.shape
    groups = group_by_expert(expert_indices, num_experts)
    device = expert_indices.device
    slot_pair = torch.zeros(num_tokens * top_k, dtype=torch.long, device=device)
    slot_pair[groups.pairs] = torch.arange(groups.pairs.shape[0], device=device)
    offsets = torch.tensor(groups.counts, dtype=torch.long).cumsum(0).to(device=device, dtype=torch.int32)
    if grouped is None:
        grouped = device.type == "cuda"
    return RoutedPairs(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        tokens=groups.tokens,
        pairs=groups.pairs,
        counts=groups.counts,
        offsets=offsets,
        slot_pair=slot_pair,
        slot_mask=expert_indices < num_experts,
        grouped=grouped,
    )


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``torch._grouped_mm`` (both forms used here) for ``dtype`` on the device type.
    CPU kernels exist from torch 2.9 for fp32/bf16/fp16; CUDA wants bf16 on a recent GPU. Probed once."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        rows = torch.ones(8, 4, device=device_type, dtype=dtype)
        weight = torch.ones(2, 8, 4, device=device_type, dtype=dtype)
        offsets = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
        linear = torch._grouped_mm(rows, weight.transpose(1, 2), offs=offsets)
        outer = torch._grouped_mm(rows.t(), rows, offs=offsets)
        return bool(linear[0, 0] == 4) and bool(outer[0, 0, 0] == 3)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _aligned(tensor: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned data and strides (all but the unit one)."""
    step = max(1, 16 // tensor.element_size())
    return tensor.data_ptr() % 16 == 0 and all(s % step == 0 for s in tensor.stride() if s != 1)


def _use_grouped(routed: RoutedPairs, *operands: torch.Tensor) -> bool:
    first = operands[0]
    return (
        routed.grouped
        and all(t.dtype == first.dtype for t in operands)
        and _grouped_mm_works(first.device.type, first.dtype)
        and all(_aligned(t) for t in operands)
    )


def expert_linear(
    rows: torch.Tensor, weight: torch.Tensor, routed: RoutedPairs, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight[e_p] @ rows[p]`` for expert-sorted ``rows (P, in)`` and ``weight (E, out, in)``, as ``(P, out)``;
    added to ``out`` in place when given."""
    mat_b = weight.transpose(1, 2)
    if _use_grouped(routed, rows, mat_b) and rows.shape[0]:
        result = torch._grouped_mm(rows, mat_b, offs=routed.offsets)
        return result if out is None else out.add_(result.to(out.dtype))
    if out is None:
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        for expert, span in routed.spans():
            torch.mm(rows[span], mat_b[expert], out=out[span])
    else:
        for expert, span in routed.spans():
            out[span].addmm_(rows[span].to(out.dtype), mat_b[expert].to(out.dtype))
    return out


def expert_outer(left: torch.Tensor, right: torch.Tensor, routed: RoutedPairs) -> torch.Tensor:
    """``out[e] = sum_{p in e} left[p] right[p]^T``, ``(E, a, b)`` from ``left (P, a)`` and ``right (P, b)``: the
    weight gradient of :func:`expert_linear` (zero for an expert without pairs)."""
    if right.shape[1] < left.shape[1]:  # skinny product as (b, a) rows: faster on CPU (MKL), returned transposed
        return expert_outer(right, left, routed).transpose(1, 2)
    mat_a = left.t()
    if _use_grouped(routed, mat_a, right) and left.shape[0]:
        return torch._grouped_mm(mat_a, right, offs=routed.offsets)
    out = left.new_zeros(routed.num_experts, left.shape[1], right.shape[1])
    for expert, span in routed.spans():
        torch.mm(mat_a[:, span], right[span], out=out[expert])
    return out


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


def _rowdot(left: torch.Tensor, right: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``(left * right).sum(-1)`` with the product in ``scratch``, by chunks (``linalg.vecdot`` allocates it)."""
    out = left.new_empty(left.shape[0])
    step = scratch.rows_for(left.shape[1], left)
    for start in range(0, left.shape[0], step):
        stop = min(start + step, left.shape[0])
        product = torch.mul(left[start:stop], right[start:stop], out=scratch.take((stop - start) * left.shape[1], left))
        torch.sum(product, -1, out=out[start:stop])
    return out


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
        pre_activations, input_saved = [], []
        frozen = None  # one (T, out) buffer for the frozen products, reused (fresh large tensors cost page faults)
        for (weight, bias, lora_a, lora_b), mask in zip(inputs, input_masks, strict=True):
            frozen = _linear(x, weight, bias, frozen)
            pre = frozen.index_select(0, tokens)
            lora_rows = scaled_a = None
            if lora_a is not None:
                lora_rows = _lora_input(token_rows, lora_a.dtype, mask)
                scaled_a = expert_linear(lora_rows, lora_a, routed).mul_(spec.scaling)
                expert_linear(scaled_a, lora_b, routed, out=pre)
            pre_activations.append(pre)
            input_saved.append((lora_rows, mask, scaled_a))
        own_backward = hasattr(spec.combine, "backward")
        hidden_graph = leaves = None
        if spec.differentiable and not own_backward:
            with torch.enable_grad():  # a local graph of combine only, differentiated in backward
                leaves = [pre.requires_grad_() for pre in pre_activations]
                hidden_graph = spec.combine(*leaves)
            hidden = hidden_graph.detach()
        else:
            hidden = spec.combine(*pre_activations)

        weight_o, bias_o, lora_a_o, lora_b_o = output
        slot_weights = routed.slot_values(pair_weights.to(hidden.dtype))
        scratch = Scratch()
        mixed = routed.sum_per_token(hidden, slot_weights, out=frozen, scratch=scratch)
        del frozen
        out = F.linear(mixed.to(weight_o.dtype), weight_o)
        if bias_o is not None:
            out.addr_(slot_weights.sum(-1).to(out.dtype), bias_o)
        lora_hidden = lora_a_out = routed_scale = None
        if lora_a_o is not None:
            lora_hidden = _lora_input(hidden, lora_a_o.dtype, mask_o)
            lora_a_out = expert_linear(lora_hidden, lora_a_o, routed)
            routed_scale = pair_weights.to(lora_a_out.dtype).mul(spec.scaling).unsqueeze(-1)
            deltas = expert_linear(lora_a_out * routed_scale, lora_b_o, routed)
            out.add_(routed.sum_per_token(deltas, routed.slot_mask, scratch=scratch).to(out.dtype))
        if not spec.differentiable:
            return out

        ctx.spec, ctx.routed = spec, routed
        ctx.combine_state = (pre_activations, hidden_graph, leaves)
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
        grad_mixed = grad_out.to(weight_o.dtype) @ weight_o
        if needs[4 + out_offset]:
            grad_flat[out_offset] = grad_out.t().to(ctx.mixed.dtype) @ ctx.mixed
        if bias_o is not None and needs[5 + out_offset]:
            grad_flat[out_offset + 1] = (slot_weights.sum(-1).to(grad_out.dtype) @ grad_out).to(bias_o.dtype)
        grad_hidden = grad_mixed.to(hidden.dtype).index_select(0, tokens)
        free = grad_mixed  # dead from here on: the buffer of the per-token gradients below
        scratch = Scratch()
        grad_weights = _rowdot(grad_hidden, hidden, scratch) if needs[3] else None
        grad_hidden.mul_(pair_weights.to(hidden.dtype).unsqueeze(-1))
        if bias_o is not None and needs[3]:
            grad_weights += (grad_out @ bias_o.to(grad_out.dtype)).index_select(0, tokens).to(grad_weights.dtype)
        if lora_a_o is not None:
            lora_hidden, mask_o, lora_a_out, routed_scale = ctx.output_saved
            grad_pair_out = grad_out.to(lora_b_o.dtype).index_select(0, tokens)
            grad_scaled = expert_linear(grad_pair_out, lora_b_o.transpose(1, 2), routed)
            if needs[7 + out_offset]:
                grad_flat[out_offset + 3] = expert_outer(grad_pair_out, lora_a_out * routed_scale, routed)
            del grad_pair_out
            if needs[3]:
                grad_dot = torch.linalg.vecdot(grad_scaled, lora_a_out).mul_(spec.scaling)
                grad_weights += grad_dot.to(grad_weights.dtype)
            grad_a_out = grad_scaled.mul_(routed_scale)
            if needs[6 + out_offset]:
                grad_flat[out_offset + 2] = expert_outer(grad_a_out, lora_hidden, routed)
            if mask_o is None:
                expert_linear(grad_a_out, lora_a_o.transpose(1, 2), routed, out=grad_hidden)
            else:
                grad_lora_hidden = expert_linear(grad_a_out, lora_a_o.transpose(1, 2), routed).mul_(mask_o)
                grad_hidden.add_(grad_lora_hidden.to(grad_hidden.dtype))
                del grad_lora_hidden

        # combine: its own backward, or autograd on the local graph the forward recorded.
        pre_activations, hidden_graph, leaves = ctx.combine_state
        if hidden_graph is None:
            grad_pre = spec.combine.backward(grad_hidden, *pre_activations)
        else:
            grad_pre = torch.autograd.grad(hidden_graph, leaves, grad_hidden, retain_graph=True)
        del grad_hidden

        # Input projections: pre_p = (W x + b)[token_p] + s B_e A_e drop(x[token_p]).
        grad_x = None
        grad_token_rows = None
        for index, ((weight, bias, lora_a, lora_b), grad, saved) in enumerate(
            zip(inputs, grad_pre, ctx.input_saved, strict=True)
        ):
            offset = 4 * index
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
        grouped: per-expert matmuls with ``torch._grouped_mm`` (None: on CUDA, where it runs for the dtype).

    Returns ``(T, out)``. Frozen weights and biases get gradients only if they require one.
    """
    routed = route_pairs(expert_indices, num_experts, grouped)
    pair_weights = routing_weights.reshape(-1)[routed.pairs]
    flat = [t for projection in (*inputs, output) for t in projection.tensors()]
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_states, pair_weights, *flat)
    )
    spec = _Spec(len(inputs), combine, float(scaling), float(dropout), differentiable)
    return _LoraExpertsFunction.apply(spec, routed, hidden_states, pair_weights, *flat)
