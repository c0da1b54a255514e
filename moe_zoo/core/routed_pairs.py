"""Routed (token, expert) pairs sorted by expert once, and the per-expert matmuls on them.

The layout every grouped expert pass of the core works in (the experts implementation of
:mod:`moe_zoo.core.fused_experts` and the LoRA experts of :mod:`moe_zoo.core.lora_experts`): the pairs are sorted
by expert with one sort (:func:`route_pairs`), so each expert's rows are contiguous and

- :func:`expert_linear` runs ``weight[e] @ row`` for all pairs, and :func:`expert_outer` its weight gradient, with
  the first of these that runs for the device and dtype: moe_zoo's Triton kernels (on CUDA where Triton is
  installed, :mod:`~moe_zoo.core.triton_grouped`, which also read gathered rows in place), one
  ``torch._grouped_mm`` (on CUDA), one call to MKL's ``sgemm_batch`` (fp32 :func:`expert_linear` on CPU,
  :mod:`~moe_zoo.core.mkl_grouped`), or a loop over the experts' row blocks (a handful of ``mm`` / in-place
  ``addmm_``, never a loop over tokens);
- :meth:`RoutedPairs.sum_per_token` puts per-pair rows back in token order with the routing weights by a gather and
  one batched ``(1, k) @ (k, D)`` product per token, never with ``index_add_`` (atomic on GPU; on CPU fast on one
  thread but slow with several);
- on CPU the temporaries run in chunks through one small reused buffer (:class:`Scratch`), because a fresh tensor
  of tens of MB is handed back to the OS when freed and costs page faults on every call.

Any index ``>= num_experts`` (the sentinel ``num_experts`` for top-p padding and capacity-dropped tokens, the slots
of null and zero-computation experts past the bank) marks an empty slot: it gets no pair, no compute and weight 0.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from .experts import ExpertGroups, group_by_expert
from .mkl_grouped import applies as mkl_applies
from .mkl_grouped import chosen as mkl_chosen
from .mkl_grouped import grouped_linear as mkl_grouped_linear

CPU_SCRATCH_BYTES = 8 * 2**20
"""Chunk size of the temporaries on CPU: small enough that the allocator reuses the memory (a fresh tensor of tens
of MB is handed back to the OS when freed and costs page faults again on each call) and that it stays in cache."""


@dataclass
class RoutedPairs(ExpertGroups):
    """The routed (token, expert) pairs of a ``(T, k)`` index tensor, in the layout the kernel works in.

    :func:`~moe_zoo.core.experts.group_by_expert`'s sort (``pairs``, ``tokens``, ``counts``, ``spans()``), plus:
    ``slot_pair[s]`` maps each slot back to its pair row (0 for an empty slot, whose ``slot_mask`` is 0), so a
    per-pair tensor is put back in token order by one gather; ``offsets`` (int32, cumulative counts) are what
    ``torch._grouped_mm`` takes; ``grouped``, ``triton`` and ``mkl`` say whether the matmuls may use
    ``torch._grouped_mm``, the Triton kernels and MKL's ``sgemm_batch`` (each only where it runs for the operands),
    chosen once in :func:`route_pairs` so that a backward runs what its forward ran.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    offsets: torch.Tensor
    slot_pair: torch.Tensor
    slot_mask: torch.Tensor
    grouped: bool
    triton: bool
    mkl: bool

    @functools.cached_property
    def experts(self) -> torch.Tensor:
        """``experts[p]``: pair ``p``'s expert, from the counts (only the fused LoRA-expert pass reads it)."""
        counts = torch.tensor(self.counts, device=self.tokens.device)
        return torch.repeat_interleave(torch.arange(self.num_experts, device=self.tokens.device), counts)

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


TRITON_SWITCH = "MOE_ZOO_TRITON"
"""Set to ``0`` to keep the Triton kernels off on CUDA (``torch._grouped_mm`` then runs where it can)."""


def route_pairs(
    expert_indices: torch.Tensor,
    num_experts: int,
    grouped: bool | None = None,
    triton: bool | None = None,
    mkl: bool | None = None,
    backward: bool = True,
) -> RoutedPairs:
    """Sort the routed pairs of ``expert_indices (T, k)`` by expert (one sort, one host sync for the counts).

    ``grouped``: run the per-expert matmuls with ``torch._grouped_mm`` (None: on CUDA when it runs there).
    ``triton``: with moe_zoo's Triton kernels, before ``torch._grouped_mm`` (None: on CUDA when Triton is installed,
    unless ``MOE_ZOO_TRITON=0``; True also on CPU tensors, which runs under ``TRITON_INTERPRET=1`` only).
    ``mkl``: fp32 :func:`expert_linear` on CPU through one MKL ``sgemm_batch`` (None: as ``MOE_ZOO_MKL`` says for
    a pass with or without a ``backward`` on these pairs, see :func:`~moe_zoo.core.mkl_grouped.chosen`; it runs only
    where torch carries MKL)."""
    num_tokens, top_k = expert_indices.shape
    groups = group_by_expert(expert_indices, num_experts)
    device = expert_indices.device
    slot_pair = torch.zeros(num_tokens * top_k, dtype=torch.long, device=device)
    slot_pair[groups.pairs] = torch.arange(groups.pairs.shape[0], device=device)
    offsets = torch.tensor(groups.counts, dtype=torch.long).cumsum(0).to(device=device, dtype=torch.int32)
    if grouped is None:
        grouped = device.type == "cuda"
    if triton is None:
        triton = device.type == "cuda" and os.environ.get(TRITON_SWITCH, "1") != "0"
    if mkl is None:
        mkl = device.type == "cpu" and mkl_chosen(backward)
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
        triton=triton,
        mkl=mkl,
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


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """:mod:`~moe_zoo.core.triton_grouped`, or None where Triton is not installed (imported on first use only)."""
    try:
        return importlib.import_module(".triton_grouped", __package__)
    except ImportError:
        return None


def _use_triton(routed: RoutedPairs, *operands: torch.Tensor) -> bool:
    first = operands[0]
    if not routed.triton or any(t.dtype != first.dtype or t.device != first.device for t in operands):
        return False
    kernels = _triton_kernels()
    return kernels is not None and kernels.works(first.device.type, first.dtype)


def fuses_gather(routed: RoutedPairs, rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`expert_linear` and :func:`expert_outer` read ``rows[index]`` in place for these operands (the
    Triton kernels), so a caller keeps ``rows`` and the index instead of a gathered copy."""
    return _use_triton(routed, rows, weight)


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
    rows: torch.Tensor,
    weight: torch.Tensor,
    routed: RoutedPairs,
    out: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight[e_p] @ rows[p]`` for expert-sorted ``rows (P, in)`` and ``weight (E, out, in)``, as ``(P, out)``;
    added to ``out`` in place when given. With ``index (P,)``, row ``p`` is ``rows[index[p]]`` (read in place by the
    Triton kernel, gathered first otherwise)."""
    if _use_triton(routed, rows, weight):
        result = _triton_kernels().grouped_linear(rows, weight, routed, index)
        return result if out is None else out.add_(result.to(out.dtype))
    if index is not None:
        rows = rows.index_select(0, index)
    mat_b = weight.transpose(1, 2)
    if _use_grouped(routed, rows, mat_b) and rows.shape[0]:
        result = torch._grouped_mm(rows, mat_b, offs=routed.offsets)
        return result if out is None else out.add_(result.to(out.dtype))
    if routed.mkl and mkl_applies(rows, weight, routed.counts, out):
        return mkl_grouped_linear(rows, weight, routed.counts, out)
    if out is None:
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        for expert, span in routed.spans():
            torch.mm(rows[span], mat_b[expert], out=out[span])
    else:
        for expert, span in routed.spans():
            out[span].addmm_(rows[span].to(out.dtype), mat_b[expert].to(out.dtype))
    return out


def expert_outer(
    left: torch.Tensor,
    right: torch.Tensor,
    routed: RoutedPairs,
    out: torch.Tensor | None = None,
    right_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e] = sum_{p in e} left[p] right[p]^T``, a contiguous ``(E, a, b)`` from ``left (P, a)`` and
    ``right (P, b)``: the weight gradient of :func:`expert_linear` (zero for an expert without pairs). With
    ``right_index``, row ``p`` of the right side is ``right[right_index[p]]``, as in :func:`expert_linear`. Written
    into ``out`` (contiguous, uninitialised) when given, e.g. kept memory from
    :class:`~moe_zoo.core.gradient_buffers.GradientBuffers`; the ``torch._grouped_mm`` path returns its own.

    Contiguous, because autograd copies a gradient whose strides differ from its parameter's (for a full expert
    bank that copy costs more than the products). When ``b < a`` each product is computed as its transpose,
    ``right^T left``, written into the transposed view of ``out[e]``: MKL runs the narrower side as rows about
    1.6x faster (measured for a LoRA rank and for ``H < 2I``), and no copy is made."""
    if _use_triton(routed, left, right):
        return _triton_kernels().grouped_outer(left, right, routed, right_index=right_index, out=out)
    if right_index is not None:
        right = right.index_select(0, right_index)
    mat_a = left.t()
    if _use_grouped(routed, mat_a, right) and left.shape[0]:
        return torch._grouped_mm(mat_a, right, offs=routed.offsets)
    if out is None:
        out = left.new_empty(routed.num_experts, left.shape[1], right.shape[1])
    transposed = right.shape[1] < left.shape[1]
    for expert, span in routed.spans():
        if transposed:
            torch.mm(right[span].t(), left[span], out=out[expert].t())
        else:
            torch.mm(mat_a[:, span], right[span], out=out[expert])
    for expert, count in enumerate(routed.counts):
        if not count:
            out[expert].zero_()
    return out


def rowdot(left: torch.Tensor, right: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``(left * right).sum(-1)`` with the product in ``scratch``, by chunks (``linalg.vecdot`` allocates it)."""
    out = left.new_empty(left.shape[0])
    step = scratch.rows_for(left.shape[1], left)
    for start in range(0, left.shape[0], step):
        stop = min(start + step, left.shape[0])
        product = torch.mul(left[start:stop], right[start:stop], out=scratch.take((stop - start) * left.shape[1], left))
        torch.sum(product, -1, out=out[start:stop])
    return out
