"""The gated activation of an FFN, ``act(gate) * up``, with a backward that works in place on the gradient buffer.

Shared by the core's grouped expert passes, the LoRA-expert kernel (:mod:`moe_zoo.core.lora_experts`) and the
experts implementation (:mod:`moe_zoo.core.fused_experts`): both keep each pair's pre-activations and run their
``combine`` (the step from pre-activations to the hidden activation) through :func:`combine_forward` and
:func:`combine_backward`, which use :meth:`GatedCombine.backward` where there is one, and otherwise a small autograd
graph of the activation alone, so any layout's activation works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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


def combine_forward(
    combine: Callable[..., torch.Tensor], pre: Sequence[torch.Tensor], differentiable: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(combine(*pre), graph)``. ``graph`` is None unless a backward will run and ``combine`` has no ``backward``
    of its own: then ``combine`` is recorded as a small autograd graph whose leaves are ``pre`` (made to require
    grad in place), for :func:`combine_backward` to differentiate."""
    if not differentiable or hasattr(combine, "backward"):
        return combine(*pre), None
    with torch.enable_grad():
        graph = combine(*[tensor.requires_grad_() for tensor in pre])
    return graph.detach(), graph


def combine_backward(
    combine: Callable[..., torch.Tensor],
    pre: Sequence[torch.Tensor],
    graph: torch.Tensor | None,
    grad_hidden: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The gradients of ``pre`` given ``grad_hidden`` (which may be overwritten), for what :func:`combine_forward`
    returned: ``combine.backward``, or autograd on the recorded graph. The graph is retained, because ``gradcheck``
    and ``retain_graph=True`` callers run the backward more than once."""
    if graph is None:
        return tuple(combine.backward(grad_hidden, *pre))
    return torch.autograd.grad(graph, pre, grad_hidden, retain_graph=True)
