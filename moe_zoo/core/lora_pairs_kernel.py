"""The fused CPU pass over the routed pairs of a SiLU-gated MixLoRA FFN (``lora_pairs.c``), compiled on first use.

Between its matmuls, :mod:`moe_zoo.core.lora_experts` streams ``(pairs, intermediate)`` tensors: each pair gathers its
token's frozen products, adds its LoRA deltas, applies ``silu(gate) * up``, the routing weights mix the pairs back per
token; the backward mirrors it. In eager PyTorch each step is one pass over tens of MB, and on a CPU those passes, not
the arithmetic, are what a mixture of LoRA experts costs beyond the dense FFN. ``lora_pairs.c`` does the whole
per-pair chain of the forward, and of the backward, in one loop over tokens: a pair's rows stay in cache, its rank-``r``
LoRA deltas are added where they are used, nothing per pair is stored in the forward (the backward recomputes the
pre-activations from the frozen products and the LoRA A products), and per-token sums need no atomics.

It runs (:func:`usable`) for fp32 CPU calls of the gated SiLU layout (Llama, Qwen2, Mistral: separate ``gate_proj`` and
``up_proj``) from :data:`MIN_PAIR_ELEMENTS` per-pair elements on, unless ``MOE_ZOO_COMPILE=never``; everything else
(other layouts and activations, bf16, GPUs, small calls) runs the eager kernel, which computes the same. The library is
built once per machine with the C compiler (``$CC``, else ``cc`` / ``gcc``; ``-O3 -march=native -fopenmp``) into
moe-zoo's cache folder (about a second); without a compiler a warning says so once and the eager kernel runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import torch

from ..assets import cache_dir
from .gated_combine import GatedCombine
from .routed_pairs import RoutedPairs

COMPILE_ENV = "MOE_ZOO_COMPILE"
"""``"auto"`` (default): the fused pass for large fp32 CPU calls; ``"never"`` / ``"0"``: always the eager kernel;
``"always"`` / ``"1"``: the fused pass whatever the size (the tests use it on small inputs)."""
MIN_PAIR_ELEMENTS = 2**18
"""Per-pair elements (pairs x the input projections' widths) from which ``"auto"`` runs the fused pass: below it
the eager passes cost little and stay in cache anyway."""
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC")

_F = ctypes.POINTER(ctypes.c_float)
_I64 = ctypes.POINTER(ctypes.c_int64)
_U8 = ctypes.POINTER(ctypes.c_uint8)
_N = ctypes.c_int64


class _Pairs(ctypes.Structure):
    """``struct pairs`` of ``lora_pairs.c``: what both passes read to rebuild a pair's pre-activations."""

    _fields_ = [(name, _N) for name in ("top_k", "width", "rank_g", "rank_u")]
    _fields_ += [(name, _F) for name in ("G", "U", "ag", "Bg", "au", "Bu", "slot_weights")]
    _fields_ += [("experts", _I64), ("slot_pair", _I64), ("slot_mask", _U8)]


_FORWARD_ARGS = [ctypes.POINTER(_Pairs), _N, _F, _N, _F, _F, _F]
_BACKWARD_ARGS = [ctypes.POINTER(_Pairs), _N, _F, _F, _F, _N, _F] + [_F] * 8
_lock = threading.Lock()
_workspaces = threading.local()


def compile_mode() -> str:
    """``MOE_ZOO_COMPILE`` normalised to ``"auto"``, ``"always"`` or ``"never"`` (anything else raises)."""
    mode = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    mode = {"0": "never", "1": "always", "false": "never", "true": "always"}.get(mode, mode)
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"{COMPILE_ENV}={os.environ[COMPILE_ENV]!r}: expected 'auto', 'always' or 'never'.")
    return mode


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's flags (a cache folder shared by other machines must not hand
    this one a library built for instructions it lacks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled ``lora_pairs.c``, built once into ``<moe-zoo cache>/kernels/`` (keyed by the source, compiler,
    flags and CPU), or None after a warning if that fails."""
    source = resources.files("moe_zoo.core").joinpath("lora_pairs.c").read_bytes()
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found ($CC, cc or gcc)")
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()])
        )
        target = cache_dir() / "kernels" / f"lora_pairs-{key.hexdigest()[:16]}.so"
        with _lock:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as folder:
                    source_path, built = Path(folder) / "lora_pairs.c", Path(folder) / "lora_pairs.so"
                    source_path.write_bytes(source)
                    subprocess.run(
                        [compiler, *FLAGS, str(source_path), "-o", str(built), "-lm"], check=True, capture_output=True
                    )
                    os.replace(built, target)  # atomic: another process sees the whole library or none
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = (
            error.stderr.decode(errors="replace")[-500:] if isinstance(error, subprocess.CalledProcessError) else ""
        )
        warnings.warn(
            f"moe_zoo could not build its fused CPU kernel for MixLoRA ({error} {detail}); the eager kernel runs "
            f"instead (same results, slower). Set {COMPILE_ENV}=never to skip building it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    library.lora_pairs_forward.argtypes = _FORWARD_ARGS
    library.lora_pairs_forward.restype = None
    library.lora_pairs_backward.argtypes = _BACKWARD_ARGS
    library.lora_pairs_backward.restype = None
    return library


def usable(combine: object, like: torch.Tensor, tensors: list[torch.Tensor | None], pair_elements: int) -> bool:
    """Whether the fused pass runs: SiLU-gated ``combine`` over two input projections, every tensor fp32 on CPU, at
    least :data:`MIN_PAIR_ELEMENTS` per-pair elements (``"auto"``), not ``"never"``, and the library builds."""
    mode = compile_mode()
    if mode == "never" or not pair_elements or (mode == "auto" and pair_elements < MIN_PAIR_ELEMENTS):
        return False
    if not isinstance(combine, GatedCombine) or combine.chunked or not combine.is_silu:
        return False
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in tensors):
        return False
    return available()


def available() -> bool:
    """Whether the fused pass's library is built (building it on the first call, or warning once that it cannot)."""
    return _library() is not None


_KINDS = {_F: (torch.float32,), _I64: (torch.int64,), _U8: (torch.bool, torch.uint8)}


def _pointer(tensor: torch.Tensor | None, kind=_F):
    """The data pointer of a tensor the caller keeps alive during the call (None stays None, a C NULL)."""
    if tensor is None:
        return None
    if not tensor.is_contiguous() or tensor.dtype not in _KINDS[kind] or tensor.device.type != "cpu":
        raise ValueError(
            f"the fused MixLoRA kernel takes contiguous CPU tensors of {_KINDS[kind]}, got {tensor.dtype} "
            f"{tuple(tensor.shape)} on {tensor.device} (contiguous: {tensor.is_contiguous()})"
        )
    return ctypes.cast(tensor.data_ptr(), kind)


def _pairs(frozen, loras, routed: RoutedPairs, slot_weights) -> _Pairs:
    """The ``struct pairs`` of a call (its tensors must outlive the call: the caller holds them)."""
    (gate, up), (lora_g, lora_u) = frozen, loras
    slot_mask = routed.slot_mask
    ranks = [0 if lora is None else lora[0].shape[1] for lora in (lora_g, lora_u)]
    factors = [_pointer(t) for lora in (lora_g, lora_u) for t in (lora or (None, None))]
    return _Pairs(
        slot_mask.shape[1],
        gate.shape[1],
        *ranks,
        _pointer(gate),
        _pointer(up),
        *factors,
        _pointer(slot_weights),
        _pointer(routed.experts, _I64),
        _pointer(routed.slot_pair, _I64),
        _pointer(slot_mask, _U8),
    )


def forward(frozen, loras, routed: RoutedPairs, slot_weights, output_a, output_mask, mixed, output_lo):
    """``mixed[t] = sum_slots w h_p`` and ``output_lo[p] = A_o[e] drop(h_p)`` (see ``lora_pairs.c``).

    ``frozen``: the gate's and up's frozen products ``(T, I)``; ``loras``: per projection ``(a (P, r), B (E, r, I))``
    or None; ``output_a``: the output LoRA A ``(E, r_o, I)`` or None (then ``output_lo`` is None)."""
    pairs = _pairs(frozen, loras, routed, slot_weights)
    _library().lora_pairs_forward(
        ctypes.byref(pairs),
        routed.num_tokens,
        _pointer(output_a),
        0 if output_a is None else output_a.shape[1],
        _pointer(output_mask),
        _pointer(mixed),
        _pointer(output_lo),
    )


def backward(frozen, loras, routed: RoutedPairs, slot_weights, grad_mixed, output_lora, output_mask):
    """The backward of :func:`forward`: ``(grad_gate, grad_up, lora_hidden, grad_weights, token_grads, grad_a)``.

    ``grad_gate`` / ``grad_up`` ``(P, I)`` are the pre-activations' gradients, ``token_grads`` their per-token sums
    (``(T, I)`` each), ``grad_a`` per projection ``<grad_pre_p, B[e, r]>`` ``(P, r)`` (None without LoRA),
    ``lora_hidden`` ``drop(h)`` (None without an output LoRA: ``output_lora = (g (P, r_o), A_o (E, r_o, I))``) and
    ``grad_weights[p] = <grad_mixed[token_p], h_p>``. The ``(P, I)`` and ``(T, I)`` results are :func:`workspace`
    buffers, valid until the next backward."""
    gate = frozen[0]
    num_tokens, pairs, width = routed.num_tokens, routed.num_pairs, gate.shape[1]
    grad_pre = [workspace(name, (pairs, width), gate) for name in ("grad_gate", "grad_up")]
    token_grads = [workspace(name, (num_tokens, width), gate) for name in ("token_grad_gate", "token_grad_up")]
    grad_o, output_a = output_lora if output_lora is not None else (None, None)
    lora_hidden = None if output_a is None else workspace("lora_hidden", (pairs, width), gate)
    grad_weights = gate.new_empty(pairs)
    grad_a = [None if lora is None else gate.new_empty(pairs, lora[0].shape[1]) for lora in loras]
    inputs = _pairs(frozen, loras, routed, slot_weights)
    _library().lora_pairs_backward(
        ctypes.byref(inputs),
        num_tokens,
        _pointer(grad_mixed),
        _pointer(grad_o),
        _pointer(output_a),
        0 if output_a is None else output_a.shape[1],
        _pointer(output_mask),
        *(_pointer(t) for t in (*grad_pre, lora_hidden, grad_weights, *token_grads, *grad_a)),
    )
    return *grad_pre, lora_hidden, grad_weights, token_grads, grad_a


def workspace(slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A ``shape`` tensor of ``like``'s dtype and device for the temporary named ``slot``, kept for the next call
    (grown when a call needs more): fresh tensors of tens of MB are handed back to the OS when freed, and faulting
    their pages in again on every call costs as much as the arithmetic. The backward of every layer uses it in turn,
    so a thread holds one set (a few ``(pairs, intermediate)`` tensors of its largest call); :func:`release_workspace`
    frees it."""
    buffers = getattr(_workspaces, "buffers", None)
    if buffers is None:
        buffers = _workspaces.buffers = {}
    numel = 1
    for size in shape:
        numel *= size
    key = (slot, like.dtype, like.device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def release_workspace() -> None:
    """Free this thread's :func:`workspace` buffers (the next fused backward allocates them again)."""
    _workspaces.buffers = {}
