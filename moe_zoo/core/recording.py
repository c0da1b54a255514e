"""Collecting each MoE layer's routing during one forward pass.

transformers captures ``router_logits`` with ``OutputRecorder`` hooks that are installed per ``PreTrainedModel``
class and scoped by ``capture_outputs``. Upcycled models keep the backbone's own base model (a ``LlamaModel``, a
``PhiModel``, ...) inside, and its ``capture_outputs`` opens a fresh collector of its own and installs only its own
recorders, so hooks on our routers would never be seen. Instead, every :class:`~moe_zoo.core.block.SparseMoeBlock`
reports its routing to the collector opened by :func:`collect_routing` around the backbone call, whatever sits in
between. Outside such a context, reporting costs one context-variable read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRouting:
    """One MoE layer's routing for one forward pass. ``logits (T, E)``; ``indices (T, K)`` after capacity, with
    sentinel ``E`` for empty slots; ``router`` is the module that produced them (losses such as DynMoE's read its
    parameters)."""

    logits: torch.Tensor
    indices: torch.Tensor
    router: nn.Module


_active: ContextVar[list[LayerRouting] | None] = ContextVar("moe_zoo_routing", default=None)


@contextmanager
def collect_routing(enabled: bool = True, propagate: bool = True) -> Iterator[list[LayerRouting]]:
    """Collect the routing of every MoE block run inside the ``with`` body, in execution order.

    With ``enabled=False`` nothing is collected here and an enclosing collector, if any, keeps collecting: a model
    whose forward does not need its routing does not hide it from a caller who does (e.g. an expert-load probe).
    An enabled collector inside another one hands its records on to the outer one when it closes, so a model that
    collects its own routing (for its router loss) does not hide it either. With ``propagate=False`` the records
    stay here: a caller that reports them itself in another form (Metis-HOME merges its branches' records).
    """
    records: list[LayerRouting] = []
    if not enabled:
        yield records
        return
    outer = _active.get()
    token = _active.set(records)
    try:
        yield records
    finally:
        _active.reset(token)
        if outer is not None and propagate:
            outer.extend(records)


def report_routing(logits: torch.Tensor, indices: torch.Tensor, router: nn.Module) -> None:
    """Called by MoE blocks after routing; a no-op unless :func:`collect_routing` is active."""
    records = _active.get()
    if records is not None:
        records.append(LayerRouting(logits, indices, router))
