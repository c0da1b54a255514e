"""Branched FFNs: each decoder layer's FFN, one copy per branch, and the per-query branch choice they all read.

The branch of a query is chosen once (by the router, a label or the caller) and must hold for every layer and every
generated token. So the choice lives in one :class:`BranchSelection` that the model owns and every
:class:`BranchedFFN` reads: the model sets it before it calls the wrapped dense model, and ``generate`` pins it for
the whole generation, whatever the wrapped model's own generation code does between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch
from torch import nn

from ...core.recording import LayerRouting, collect_routing, report_routing


class BranchSelection:
    """The branch index of every row of the batch being run, ``(B,)`` long, or None outside a model call."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    @contextmanager
    def selected(self, rows: torch.Tensor) -> Iterator[None]:
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous


def branch_restoring_context_fn(
    selection: BranchSelection, user_context_fn: Callable | None = None
) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) that restores, when a checkpointed layer is
    recomputed during backward, the branch choice its forward ran with (the model's own context has closed by then).
    ``user_context_fn``, if given, is combined with it."""

    def context_fn():
        forward, recompute = user_context_fn() if user_context_fn is not None else (nullcontext(), nullcontext())
        rows = selection.rows

        @contextmanager
        def restored() -> Iterator[None]:
            with ExitStack() as stack:
                stack.enter_context(recompute)
                stack.enter_context(selection.selected(rows))
                yield

        return forward, restored()

    return context_fn


def branched_plan(plan: dict[str, str] | None, branch_names: list[str]) -> dict[str, str]:
    """``plan`` (a parallel plan: ``{module or parameter pattern: style}``) for the model whose FFNs became
    :class:`BranchedFFN` modules: every rule inside a layer's FFN (``layers.*.mlp.<rest>``) is repeated for the FFN of each
    branch (``layers.*.mlp.branches.<name>.<rest>``), so that the wrapped model's tensor- and expert-parallel rules
    (an MoE-LLaVA's ``mlp.experts.gate_up_proj``, Llama's ``mlp.gate_proj``) still name its tensors. The other rules
    are kept as they are."""
    rewritten: dict[str, str] = {}
    for rule, style in (plan or {}).items():
        head, inside_ffn, rest = rule.partition(".mlp.")
        if not inside_ffn:
            rewritten[rule] = style
            continue
        for name in branch_names:
            rewritten[f"{head}.mlp.branches.{name}.{rest}"] = style
    return rewritten


class BranchedFFN(nn.Module):
    """A decoder layer's FFN as one module per branch (``branches.<name>``); each row of the batch goes through the
    FFN of its branch only, so a batch costs what one FFN would.

    The branch FFNs can be any module with ``(B, S, H) -> (B, S, H)``: a dense FFN, or an MoE block (MoE-LLaVA). When
    a batch mixes branches and the FFNs are MoE blocks, their two routing records are merged back into one record in
    token order, so the wrapped model's router loss sees the routing of the whole batch, as without branches.
    """

    def __init__(self, branches: dict[str, nn.Module], selection: BranchSelection):
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        self.selection = selection

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self.selection.rows
        if rows is None:
            raise RuntimeError(
                "A Metis-HOME branched FFN ran without a branch choice: call the MetisHomeForConditionalGeneration "
                "(its forward or generate), not the wrapped dense model alone."
            )
        if hidden_states.shape[0] != rows.shape[0]:
            if hidden_states.shape[0] % rows.shape[0]:
                raise ValueError(
                    f"The branch choice covers {rows.shape[0]} rows but the layer got {hidden_states.shape[0]}."
                )
            # generate expanded the batch (num_return_sequences / beams) with repeat_interleave: follow it
            rows = rows.repeat_interleave(hidden_states.shape[0] // rows.shape[0])
        modules = list(self.branches.values())
        present = rows.unique().tolist()
        if len(present) == 1:
            return modules[present[0]](hidden_states, *args, **kwargs)
        output = torch.empty_like(hidden_states)
        records: list[LayerRouting] = []
        for index in present:
            picked = rows.to(hidden_states.device) == index
            with collect_routing(propagate=False) as branch_records:
                output[picked] = modules[index](hidden_states[picked], *args, **kwargs)
            records.append((picked, branch_records))
        _report_merged_routing(records, hidden_states.shape[:2])
        return output


def _report_merged_routing(records: list, batch_shape: torch.Size) -> None:
    """Merge the branches' per-row routing records (one per MoE layer inside each branch FFN) into one record per
    layer covering all rows in order, and report it to any enclosing collector."""
    counts = {len(branch_records) for _, branch_records in records}
    if counts == {0}:
        return
    if len(counts) != 1:
        raise RuntimeError(f"The branches of one layer reported different numbers of routing records ({counts}).")
    batch, seq = batch_shape
    for layer in range(counts.pop()):
        first = records[0][1][layer]
        logits = first.logits.new_zeros(batch, seq, first.logits.shape[-1])
        indices = first.indices.new_zeros(batch, seq, first.indices.shape[-1])
        for picked, branch_records in records:
            logits[picked] = branch_records[layer].logits.reshape(-1, seq, logits.shape[-1])
            indices[picked] = branch_records[layer].indices.reshape(-1, seq, indices.shape[-1])
        report_routing(logits.reshape(batch * seq, -1), indices.reshape(batch * seq, -1), first.router)


__all__ = ["BranchSelection", "BranchedFFN", "branch_restoring_context_fn"]
