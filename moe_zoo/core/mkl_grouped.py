"""The grouped GEMM on CPU: every expert's fp32 ``rows @ weight[e]^T`` in one call to MKL's ``sgemm_batch``.

Why: an expert's GEMM is short (a few hundred rows at training sizes), and on a CPU with few cores MKL splits a short
GEMM across its threads less well than a long one. On the 2-core CI machine a loop of per-expert ``torch.mm`` ran
10-25% below the rate of one GEMM over all the rows; ``sgemm_batch`` takes all the experts' GEMMs at once and spreads
whole GEMMs over the threads, which closes most of that gap (``benchmarks/bench_moe_block.py``).

torch's x86-64 wheels link MKL into ``libtorch_cpu`` and export its BLAS interface, so it is called there through
:mod:`ctypes`: no build step and no new dependency, and MKL runs with torch's thread count
(``torch.set_num_threads`` sets MKL's too; ``tests/core/test_mkl_grouped.py`` checks it). The ILP64 entry point ``sgemm_batch_64`` is used, so the integer width is stated, not
guessed. Where it is missing (aarch64 and macOS wheels, builds on OpenBLAS), or the one-time probe against
``torch.mm`` fails, :func:`works` is False (with a warning in the second case) and the caller keeps its loop.
By default it runs for passes without a backward (inference, generation); ``MOE_ZOO_MKL=always`` uses it in training
too and ``MOE_ZOO_MKL=never`` nowhere (:func:`chosen` says why).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SWITCH = "MOE_ZOO_MKL"
"""Where the CPU expert passes use MKL's ``sgemm_batch`` (read when the pairs are routed, so a backward runs what its
forward chose): ``inference`` (default) for passes without a backward, ``always`` in training too, ``never`` (or
``0``) nowhere: see :func:`chosen`."""
CHOICES = ("inference", "always", "never", "1", "0")
"""``1`` is ``always`` and ``0`` is ``never``."""


def chosen(backward: bool) -> bool:
    """Whether ``MOE_ZOO_MKL`` asks for the batched call in a pass that will (``backward``) or will not run a
    backward.

    Inference is the default because that is where it was measured faster without exception on the 2-core CI
    machine: decoding one MoE layer 1.1-1.6x faster for T = 2..64, the block's forward 1.02-1.23x the dense floor
    against 1.16-1.30x for the loop. In training the block alone gained (forward+backward 1.03-1.14x against
    1.09-1.26x), but a whole MoE-LLaVA training step on 2 threads ran 0.05-0.17x slower with it in every run (the
    two were equal on 1 thread, so it is an interplay of MKL's threads with the model's other parallel work, not yet
    understood); ``always`` opts in."""
    value = os.environ.get(SWITCH, "inference").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{SWITCH}={value!r} is not one of {', '.join(CHOICES)}")
    return value in ("always", "1") or (value == "inference" and not backward)


_NO_TRANSPOSE, _TRANSPOSE = ord("N"), ord("T")
_M, _N, _K, _A, _LDA, _B, _LDB, _C, _LDC, _GROUP_COUNT, _GROUP_SIZE = range(11)
"""Rows of :func:`grouped_linear`'s integer argument buffer (pointers are integers too)."""
_INTEGER_ROWS = 11


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded ``libtorch_cpu`` where this torch carries MKL (dlopen returns torch's own handle), else None."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return None


@functools.cache
def _sgemm_batch() -> ctypes._CFuncPtr | None:
    """MKL's Fortran-interface ``sgemm_batch_64`` inside :func:`_library`, or None where it is not there."""
    function = getattr(_library(), "sgemm_batch_64", None)
    if function is None:
        return None
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 15  # every argument of the Fortran interface is an address
    return function


def applies(rows: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], out: torch.Tensor | None = None) -> bool:
    """Whether :func:`grouped_linear` runs for these operands: more than one expert has rows (one is a plain
    ``mm``), the operands fit (:func:`supports`) and the probe passed here."""
    return sum(1 for count in counts if count) > 1 and supports(rows, weight, out) and works()


@functools.cache
def works() -> bool:
    """Whether ``sgemm_batch`` is there and agrees with ``torch.mm`` on a small problem (both weight layouts, an
    empty expert, accumulation); probed once, and a wrong result warns and turns the path off."""
    if _sgemm_batch() is None:
        return False
    generator = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    rows = torch.randn(sum(counts), 7, generator=generator)
    weight = torch.randn(len(counts), 6, 7, generator=generator)
    expected = torch.cat([block @ weight[e].t() for e, block in enumerate(rows.split(counts))])
    good = True
    for layout in (weight, weight.transpose(1, 2).contiguous().transpose(1, 2)):
        accumulated = grouped_linear(rows, layout, counts, out=torch.zeros_like(expected))
        good = good and torch.allclose(accumulated, expected, atol=1e-5)
        good = good and torch.allclose(grouped_linear(rows, layout, counts), expected, atol=1e-5)
    if not good:
        warnings.warn(
            "MKL's sgemm_batch in this torch build gives results that differ from torch.mm's; moe_zoo runs its "
            "per-expert matmuls one by one instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return good


def _blas_layout(matrix: torch.Tensor) -> tuple[int, int] | None:
    """``(transpose flag, leading dimension)`` of a 2-D view as a row-major BLAS operand, None if neither of its
    dimensions has unit stride (or its strides are not a valid leading dimension)."""
    rows, cols = matrix.shape
    if matrix.stride(1) == 1 and matrix.stride(0) >= max(1, cols):
        return _NO_TRANSPOSE, matrix.stride(0)
    if matrix.stride(0) == 1 and matrix.stride(1) >= max(1, rows):
        return _TRANSPOSE, matrix.stride(1)
    return None


def supports(rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether :func:`grouped_linear` takes these operands: fp32 CPU tensors whose matrices have a unit stride."""
    tensors = (rows, weight) if out is None else (rows, weight, out)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.compiler.is_compiling()  # no data pointers under a tracer
        and _blas_layout(rows) is not None
        and _blas_layout(weight[0].t()) is not None
        and (out is None or _blas_layout(out) == (_NO_TRANSPOSE, out.stride(0)))
    )


def grouped_linear(
    rows: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[p] = weight[e_p] @ rows[p]`` for expert-sorted ``rows (P, in)`` (``counts[e]`` rows of expert ``e``,
    in order) and ``weight (E, out, in)``, as ``(P, out)``; added to ``out`` in place when given. One
    ``sgemm_batch`` call, one group per expert with rows. The caller checks :func:`applies`."""
    num_rows, (_, n_out, n_in) = rows.shape[0], weight.shape
    accumulate = out is not None
    if out is None:
        out = rows.new_empty(num_rows, n_out)
    if (
        out.shape != (num_rows, n_out)
        or rows.shape[1] != n_in
        or sum(counts) != num_rows
        or len(counts) != weight.shape[0]
    ):
        raise ValueError(
            f"grouped_linear: rows {tuple(rows.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)} and "
            f"counts summing to {sum(counts)} over {len(counts)} experts do not fit together"
        )
    counts_array = np.asarray(counts, dtype=np.int64)
    experts = np.flatnonzero(counts_array)
    groups = experts.size
    if groups == 0:
        return out if accumulate else out.zero_()
    starts = (np.cumsum(counts_array) - counts_array)[experts]
    # Row-major C = A @ B is column-major C^T = B^T @ A^T: MKL's A is the weight, its B the rows.
    weight_flag, weight_ld = _blas_layout(weight[0].t())
    rows_flag, rows_ld = _blas_layout(rows)
    size = rows.element_size()
    # Every per-group argument array is a row of one of three buffers, so building them costs three allocations
    # and three address lookups (numpy's ``.ctypes`` is slow enough to matter when decoding a token).
    integers = np.empty((_INTEGER_ROWS, groups), dtype=np.int64)
    integers[_M], integers[_N], integers[_K] = n_out, counts_array[experts], n_in
    integers[_A], integers[_LDA] = weight.data_ptr() + experts * (weight.stride(0) * size), weight_ld
    integers[_B], integers[_LDB] = rows.data_ptr() + starts * (rows.stride(0) * size), rows_ld
    integers[_C], integers[_LDC] = out.data_ptr() + starts * (out.stride(0) * size), out.stride(0)
    integers[_GROUP_SIZE], integers[_GROUP_COUNT, 0] = 1, groups
    flags = np.array([[weight_flag], [rows_flag]], dtype=np.uint8).repeat(groups, axis=1)
    scalars = np.array([[1.0], [1.0 if accumulate else 0.0]], dtype=np.float32).repeat(groups, axis=1)
    ints, chars, reals = (array.ctypes.data for array in (integers, flags, scalars))

    def row(base: int, array: np.ndarray, index: int) -> int:
        return base + index * array.strides[0]

    _sgemm_batch()(
        row(chars, flags, 0),  # transa
        row(chars, flags, 1),  # transb
        *(row(ints, integers, r) for r in (_M, _N, _K)),
        row(reals, scalars, 0),  # alpha
        *(row(ints, integers, r) for r in (_A, _LDA, _B, _LDB)),
        row(reals, scalars, 1),  # beta
        *(row(ints, integers, r) for r in (_C, _LDC, _GROUP_COUNT, _GROUP_SIZE)),
    )
    return out
