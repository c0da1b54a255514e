"""Triton grouped GEMMs over expert-sorted pairs, with the row gather fused into the loads (ScatterMoE's idea).

The two products every expert pass of the core is made of (see :mod:`~moe_zoo.core.routed_pairs`):

- :func:`grouped_linear`: ``out[p] = weight[e_p] @ x[index[p]]``, the rows read straight from ``x`` through
  ``index`` (the pairs' token rows), so the forward never writes the ``(T * k, H)`` gathered copy and the backward
  need not keep it;
- :func:`grouped_outer`: ``out[e] = sum_{p in e} left[p] right[index[p]]^T``, the weight gradient, the right side
  read through the same optional index.

One program computes one tile of one expert: a linear tile is ``BLOCK_M`` consecutive pairs of a single expert (the
block table, computed on the device from the routing's ``offsets``, sized by the counts the routing already synced:
no transfer and no device sync), an outer tile loops over that expert's pairs. Accumulation is fp32; fp32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` allows it, as torch's own matmuls do. bf16, fp16 and fp32 run.

Only imported where Triton is installed; :func:`works` probes a device type and dtype once against torch (a
compile error or a wrong result turns the path off with a warning, and the caller falls back to
``torch._grouped_mm`` or per-expert ``mm``). The tile sizes are reasonable defaults for recent NVIDIA GPUs, not
tuned. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how the CPU tests check them (fp32).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .routed_pairs import RoutedPairs, route_pairs

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _grouped_linear_kernel(
    x_ptr,
    index_ptr,
    weight_ptr,
    out_ptr,
    block_expert_ptr,
    block_start_ptr,
    bounds_ptr,
    n_out,
    n_in,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    GATHER: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    pairs = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK_M)
    in_block = pairs < tl.load(bounds_ptr + expert + 1)
    rows = tl.load(index_ptr + pairs, mask=in_block, other=0) if GATHER else pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < n_out
    inner = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + inner[None, :] * stride_xk
    w_ptrs = weight_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + inner[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        in_inner = start + inner < n_in
        a = tl.load(x_ptrs, mask=in_block[:, None] & in_inner[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=in_inner[:, None] & in_cols[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_block[:, None] & in_cols[None, :])


@triton.jit
def _grouped_outer_kernel(
    left_ptr,
    right_ptr,
    right_index_ptr,
    out_ptr,
    bounds_ptr,
    size_a,
    size_b,
    stride_lp,
    stride_la,
    stride_rp,
    stride_rb,
    stride_oe,
    stride_oa,
    stride_ob,
    GATHER_RIGHT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    expert = tl.program_id(0)
    first, stop = tl.load(bounds_ptr + expert), tl.load(bounds_ptr + expert + 1)
    cols_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    cols_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_a, in_b = cols_a < size_a, cols_b < size_b
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for start in range(first, stop, BLOCK_P):
        pairs = start + tl.arange(0, BLOCK_P)
        in_pairs = pairs < stop
        right_rows = tl.load(right_index_ptr + pairs, mask=in_pairs, other=0) if GATHER_RIGHT else pairs
        left_ptrs = left_ptr + pairs.to(tl.int64)[None, :] * stride_lp + cols_a[:, None] * stride_la
        right_ptrs = right_ptr + right_rows.to(tl.int64)[:, None] * stride_rp + cols_b[None, :] * stride_rb
        left = tl.load(left_ptrs, mask=in_a[:, None] & in_pairs[None, :], other=0.0)
        right = tl.load(right_ptrs, mask=in_pairs[:, None] & in_b[None, :], other=0.0)
        acc = tl.dot(left, right, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + cols_a[:, None] * stride_oa + cols_b[None, :] * stride_ob
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_a[:, None] & in_b[None, :])


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision, which only fp32 inputs read: IEEE unless torch allows TF32 for its matmuls."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _tile(size: int, largest: int) -> int:
    """A power-of-two tile edge for a dimension of ``size``: at least 16 (``tl.dot``'s minimum), at most ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def _inner_tile(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64


def _bounds(routed: RoutedPairs) -> torch.Tensor:
    """``(E + 1,)`` int32 on the device: where each expert's pairs start, and the end (``offsets`` with a 0 first)."""
    return F.pad(routed.offsets, (1, 0))


def block_table(routed: RoutedPairs, bounds: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_expert, block_start)`` int32: every tile of ``block_m`` consecutive pairs of one expert, computed on
    the device from the routing's :func:`_bounds`; its length comes from the host-side counts, so nothing waits for
    the GPU."""
    num_blocks = sum(-(-count // block_m) for count in routed.counts)
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    blocks = (counts + block_m - 1) // block_m
    experts = torch.arange(routed.num_experts, device=bounds.device)
    block_expert = torch.repeat_interleave(experts, blocks, output_size=num_blocks)
    first_block = (torch.cumsum(blocks, 0, dtype=torch.int32) - blocks)[block_expert]
    tile = torch.arange(num_blocks, device=bounds.device, dtype=torch.int32) - first_block
    return block_expert.to(torch.int32), starts[block_expert] + tile * block_m


def _index_or_dummy(index: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The index pointer a kernel takes (unread unless it gathers)."""
    return index if index is not None else like.new_empty(1, dtype=torch.long)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, routed: RoutedPairs, index: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[p] = weight[e_p] @ x[index[p]]`` (``x[p]`` without ``index``) for the expert-sorted pairs of ``routed``:
    ``x (rows, in)``, ``weight (E, out, in)`` of ``x``'s dtype, any strides -> ``(P, out)``."""
    n_out, n_in = weight.shape[1], weight.shape[2]
    out = x.new_empty(routed.num_pairs, n_out)
    if routed.num_pairs == 0:
        return out
    block_m, block_n, bounds = 64, _tile(n_out, 128), _bounds(routed)
    block_expert, block_start = block_table(routed, bounds, block_m)
    grid = (block_expert.shape[0], triton.cdiv(n_out, block_n))
    _grouped_linear_kernel[grid](
        x,
        _index_or_dummy(index, x),
        weight,
        out,
        block_expert,
        block_start,
        bounds,
        n_out,
        n_in,
        *x.stride(),
        *weight.stride(),
        *out.stride(),
        GATHER=index is not None,
        PRECISION=_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=_inner_tile(x.dtype),
        num_warps=4 if block_n < 128 else 8,
        num_stages=3,
    )
    return out


def grouped_outer(
    left: torch.Tensor,
    right: torch.Tensor,
    routed: RoutedPairs,
    right_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e] = sum_{p in e} left[p] right[right_index[p]]^T`` (``right[p]`` without the index) for the
    expert-sorted pairs of ``routed``, written into ``out (E, a, b)`` when given (any strides), else a new contiguous
    one; zero for an expert without pairs."""
    size_a, size_b = left.shape[1], right.shape[1]
    if out is None:
        out = left.new_empty(routed.num_experts, size_a, size_b)
    block_a, block_b = _tile(size_a, 128), _tile(size_b, 128)
    grid = (routed.num_experts, triton.cdiv(size_a, block_a), triton.cdiv(size_b, block_b))
    _grouped_outer_kernel[grid](
        left,
        right,
        _index_or_dummy(right_index, right),
        out,
        _bounds(routed),
        size_a,
        size_b,
        *left.stride(),
        *right.stride(),
        *out.stride(),
        GATHER_RIGHT=right_index is not None,
        PRECISION=_precision(left.dtype),
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        BLOCK_P=_inner_tile(left.dtype),
        num_warps=8 if block_a * block_b >= 128 * 128 else 4,
        num_stages=3,
    )
    return out


def sorted_pairs(counts: list[int], device: torch.device | str = "cpu") -> RoutedPairs:
    """The routing of ``sum(counts)`` one-slot tokens already in expert order, ``counts[e]`` to expert ``e``: the
    layout the probe and the tests call the kernels on."""
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return route_pairs(experts.unsqueeze(1).to(device), len(counts), triton=True)


@functools.cache
def works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether both kernels compile and agree with torch on a small problem (gathered, with an empty expert) for
    ``dtype`` on ``device_type``; probed once, and a failure warns and turns the Triton path off."""
    if dtype not in SUPPORTED_DTYPES:
        return False
    try:
        with torch.autocast(device_type, enabled=False):  # the first call may come from inside autocast
            return _probe(device_type, dtype)
    except Exception as error:  # noqa: BLE001 - any failure of a compiler or driver means: use the other path
        warnings.warn(
            f"moe_zoo's Triton grouped GEMMs do not run for {dtype} on {device_type} ({error}); using "
            "torch._grouped_mm or per-expert matmuls instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def _probe(device_type: str, dtype: torch.dtype) -> bool:
    """Both kernels on a small gathered problem with an empty expert against torch in fp32; raises if they differ."""
    generator = torch.Generator().manual_seed(0)
    routed = sorted_pairs([5, 0, 19], device_type)
    x = torch.randn(11, 40, generator=generator).to(device_type, dtype)
    weight = torch.randn(3, 24, 40, generator=generator).to(device_type, dtype)
    index = torch.randint(0, 11, (routed.num_pairs,), generator=generator).to(device_type)
    experts = routed.experts
    rows = x.float()[index]
    expected = torch.einsum("pi,poi->po", rows, weight.float()[experts])
    linear = grouped_linear(x, weight, routed, index).float()
    outer = grouped_outer(linear.to(dtype), x, routed, right_index=index).float()
    expected_outer = torch.stack([(expected[experts == e].t() @ rows[experts == e]) for e in range(3)])
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    linear_good = torch.allclose(linear, expected, rtol=tolerance, atol=tolerance * 40)
    outer_good = torch.allclose(outer, expected_outer, rtol=tolerance, atol=tolerance * 40 * 24)
    if not (linear_good and outer_good):
        raise RuntimeError("results differ from torch's")
    return True
