"""Weight-gradient memory an expert bank reuses from one backward to the next, on CPU.

An expert bank's weight gradients are ``E`` times a dense FFN's (92 MiB for the benchmark's 16 experts of
``1024 x 704``), and with ``zero_grad(set_to_none=True)``, the ``Trainer``'s default, they are freed after every
optimizer step. glibc hands a freed block above its mmap threshold (at most 32 MiB by default) back to the OS, so the
next backward faults every page in again: about a microsecond per 4 KiB page on a VM, 30-40k faults a step for that
bank, while the dense floor's small gradients come from the heap with none. On GPU the caching allocator keeps such
memory; on CPU, :class:`GradientBuffers` keeps it for the expert weights' gradients only (the rest of a backward is
either small or, like the saved activations, the same for a dense model).

A kept buffer is handed out again only when nothing else holds its storage (its use count), so reuse never changes a
gradient: while the previous one is alive (accumulated over micro-batches with ``set_to_none=False`` or without a
``zero_grad``, kept by the caller, or a view of it held), the backward allocates a fresh tensor, as it would without
this module. What is handed out is a new view of the kept storage, which autograd stores as ``.grad`` without a copy.

The memory stays with the bank after training, as much as its weights (in the gradients' dtype);
:func:`release_gradient_buffers` gives it back.
"""

from __future__ import annotations

import torch
from torch import nn

ATTRIBUTE = "_moe_zoo_gradient_buffers"
"""Where an experts module keeps its :class:`GradientBuffers` (a plain attribute, so never in a state dict)."""


def _storage_use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _unshared_use_count() -> int | None:
    """The use count a tensor's storage reports when only that tensor holds it (the query itself may count), or None
    where this torch build cannot tell, which turns reuse off."""
    try:
        return _storage_use_count(torch.empty(1))
    except (AttributeError, RuntimeError):
        return None


UNSHARED_USE_COUNT = _unshared_use_count()


class GradientBuffers:
    """The kept gradient storage of one experts module, one buffer per gradient name."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised ``shape`` tensor of ``like``'s dtype and device for gradient ``name``: on the kept storage
        when nothing else holds it, else (the previous gradient still alive, or not a plain CPU tensor) fresh."""
        if UNSHARED_USE_COUNT is None or like.device.type != "cpu" or type(like) is not torch.Tensor:
            return like.new_empty(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
            buffer = self.buffers[name] = like.new_empty(shape)
        elif _storage_use_count(buffer) > UNSHARED_USE_COUNT:
            return like.new_empty(shape)
        return buffer.view(shape)

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers.values())


def gradient_buffers(module: nn.Module) -> GradientBuffers:
    """``module``'s :class:`GradientBuffers`, created on first use."""
    buffers = module.__dict__.get(ATTRIBUTE)
    if buffers is None:
        buffers = module.__dict__[ATTRIBUTE] = GradientBuffers()
    return buffers


def release_gradient_buffers(model: nn.Module) -> int:
    """Give back the gradient memory every experts module of ``model`` keeps (after training, say); returns the bytes
    released. Gradients still held elsewhere stay valid; a later backward keeps new buffers again."""
    released = 0
    for module in model.modules():
        buffers = module.__dict__.pop(ATTRIBUTE, None)
        if buffers is not None:
            released += buffers.nbytes
    return released
