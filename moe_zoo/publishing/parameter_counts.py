"""Total and per-token active parameter counts of moe_zoo models and LoRA-expert adapters, from their tensors.

A model card's "active parameters" is the number readers compare MoE models by, so it is computed from the
parameters the model actually holds, found by module type, never from config formulas (which miss tied weights,
biases, shared experts, vision towers and whatever a future option adds). What counts as active for one token:

- every parameter outside routed experts: embeddings, attention, norms, LM head, routers, vision / audio towers and
  connectors, shared experts (always on), MoE++'s constant experts (the block evaluates all of them for every
  token), the frozen FFN that MixLoRA's experts share, every plain LoRA pair;
- of each MoE block's routed expert bank (``SparseMoeBlock.experts``, a
  :class:`~moe_zoo.core.experts.GatedExpertsBase` / :class:`~moe_zoo.core.experts.PlainExpertsBase`, with anything
  wrapped around it such as PEFT's LoRA on the 3D bank), the share ``k / E`` that a token's ``k`` experts of ``E``
  use. A top-k router's ``k`` slots are all counted as FFN experts: with zero, copy or null experts in the router
  a token may pick one of those instead and use less, so the figure is what a token can use at most. Zero and null
  experts hold no parameters; tokens a capacity limit drops also use less;
- of MixLoRA's expert LoRA pairs (``lora_A_* / lora_B_* / lora_magnitude_*`` of a
  :class:`~moe_zoo.peft.mixlora.MixLoraFeedForward`), ``top_k`` of ``num_experts`` (one for ``mixlora-switch``);
- of SMoRA's ``A (r, in)`` and ``B (out, r)`` (a :class:`~moe_zoo.peft.smora.SmoraLinear`), ``activate_r`` of the
  ``r`` ranks: every rank is a rank-one expert (``rank_partition`` ranks per expert changes nothing in the share);
- of a Metis-HOME :class:`~moe_zoo.modeling.metis_home.branches.BranchedFFN`, one branch: the router sends the whole
  query to one of the ``N`` branches, so the count is the largest branch's own active count (branches are copies of
  one FFN, so that is ``1 / N`` of them). A branch that is itself an MoE block (a Metis-HOME over MoE-LLaVA) counts
  its experts by the MoE rule above.

Routers that choose a **variable** number of experts per token (top-p, DynMoE's top-any, EvoMoE's dense-to-sparse,
MixLoRA's ``mixlora-dynamic``) have no fixed ``k``. Without a measurement, the count takes the most a token can
use: every expert (for top-any, every expert slot its ``experts_mask`` has switched on), and
:attr:`ParameterCounts.variable_routing` says so. Pass ``experts_per_token`` (e.g. the mean number of experts per
token measured on your data) to count that many instead.

Parameters are counted once each: tied weights (an LM head sharing the embedding) appear once, as in
``model.parameters()``. The counts are numbers of elements, so 4-bit bitsandbytes weights (packed two per byte)
count what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.block import SparseMoeBlock
from ..core.routing import DenseToSparseRouter, TopAnyRouter, TopPRouter
from ..modeling.metis_home.branches import BranchedFFN
from ..peft.mixlora import MixLoraFeedForward
from ..peft.smora import SmoraLinear

VARIABLE_ROUTERS = (TopPRouter, TopAnyRouter, DenseToSparseRouter)
"""Router classes whose number of experts per token depends on the token (MixLoRA's top-p router is a subclass)."""

MIXLORA_EXPERT_PREFIXES = ("lora_A_", "lora_B_", "lora_magnitude_")
"""The children of a :class:`~moe_zoo.peft.mixlora.MixLoraFeedForward` that hold per-expert tensors."""


@dataclass(frozen=True)
class ParameterCounts:
    """What :func:`count_parameters` found.

    Attributes:
        total: every parameter, counted once (``sum(p.numel() for p in model.parameters())``).
        active: the parameters one token uses (for Metis-HOME: one query, on its branch); see the module docstring.
        expert: parameters in routed experts (expert banks, MixLoRA / SMoRA expert LoRA tensors, Metis-HOME
            branches), all of them.
        num_experts: experts per MoE layer (Metis-HOME: branches; SMoRA: rank experts, ``r // rank_partition``);
            the largest over layers if they differ; 0 for a model without MoE layers.
        top_k: experts per token the ``active`` count assumes (Metis-HOME: 1 branch per query; SMoRA:
            ``activate_r // rank_partition``); for variable routing, the bound or ``experts_per_token`` used.
        moe_layers: layers with routed experts: MoE blocks, MixLoRA FFNs, SMoRA-adapted linears, Metis-HOME
            branched FFNs.

        shared_expert: parameters of always-on shared experts (included in ``active``).
        adapter: parameters a PEFT adapter added (LoRA pairs, routers, expert LoRA tensors); 0 for a plain model.
        variable_routing: some layer routes a variable number of experts per token; ``active`` is then the bound
            described in the module docstring, or the count for ``experts_per_token`` when one was given.

    ``num_experts``, ``top_k`` and ``moe_layers`` describe the outermost mixture: a Metis-HOME's branches (not the
    MoE blocks inside them, for a Metis-HOME over MoE-LLaVA), an adapter's expert layers (not the MoE blocks of an MoE
    model under a SMoRA adapter), else the MoE blocks. ``active`` and ``expert`` always count them all.
    """

    total: int
    active: int
    expert: int
    num_experts: int
    top_k: int | float
    moe_layers: int
    shared_expert: int = 0
    adapter: int = 0
    variable_routing: bool = False

    @property
    def active_fraction(self) -> float:
        """``active / total`` (1.0 for an empty model)."""
        return self.active / self.total if self.total else 1.0


@dataclass
class _Layer:
    num_experts: int
    top_k: float


@dataclass
class _Tally:
    """Running state of one walk over the module tree: which parameters were counted already (tied weights are one
    tensor reachable from two modules), and what was found."""

    experts_per_token: float | None
    seen: set[int] = field(default_factory=set)
    counted: int = 0
    expert: int = 0
    shared_expert: int = 0
    adapter: int = 0
    variable: bool = False
    layers: list[_Layer] = field(default_factory=list)
    adapter_layers: list[_Layer] = field(default_factory=list)
    branch_layers: list[_Layer] = field(default_factory=list)

    def own(self, module: nn.Module) -> int:
        """Numel of ``module``'s direct parameters not counted yet (marking them counted)."""
        return sum(self.take(p) for p in module.parameters(recurse=False))

    def subtree(self, module: nn.Module) -> int:
        """Numel of every parameter under ``module`` not counted yet (marking them counted)."""
        return sum(self.take(p) for p in module.parameters())

    def take(self, parameter: nn.Parameter) -> int:
        """Numel of ``parameter`` if not counted yet (marking it counted), else 0."""
        if id(parameter) in self.seen:
            return 0
        self.seen.add(id(parameter))
        self.counted += parameter.numel()
        return parameter.numel()

    def experts_used(self, router: nn.Module, num_experts: int, fixed_k: int) -> float:
        """The experts a token of this layer is counted to use (noting when the router's count varies per token)."""
        if not isinstance(router, VARIABLE_ROUTERS):
            return float(min(fixed_k, num_experts))
        self.variable = True
        if self.experts_per_token is not None:
            if not 0 < self.experts_per_token <= num_experts:
                raise ValueError(
                    f"experts_per_token is {self.experts_per_token}, but a layer has {num_experts} experts; it must "
                    f"be in (0, {num_experts}]."
                )
            return float(self.experts_per_token)
        if isinstance(router, TopAnyRouter) and not router.experts_mask.is_meta:
            # DynMoE: switched-off slots cannot be chosen.
            return float(router.experts_mask[:num_experts].sum().item())
        return float(num_experts)


def _walk(module: nn.Module, tally: _Tally) -> float:
    """Active parameter count of ``module``'s subtree (parameters counted earlier in the walk are skipped)."""
    if isinstance(module, BranchedFFN):
        return _branched_ffn(module, tally)
    if isinstance(module, SparseMoeBlock):
        return _moe_block(module, tally)
    if isinstance(module, MixLoraFeedForward):
        return _adapter_layer(module, tally, _mixlora_experts(module, tally))
    if isinstance(module, SmoraLinear):
        return _adapter_layer(module, tally, _smora_experts(module, tally))
    if isinstance(module, BaseTunerLayer):
        return _adapter_layer(module, tally, 0.0)
    return tally.own(module) + sum(_walk(child, tally) for child in module.children())


def _moe_block(block: SparseMoeBlock, tally: _Tally) -> float:
    bank = tally.subtree(block.experts)
    tally.expert += bank
    used = tally.experts_used(block.gate, block.num_experts, block.top_k)
    tally.layers.append(_Layer(block.num_experts, used))
    active = bank * used / block.num_experts
    if block.shared_expert is not None:
        shared = tally.subtree(block.shared_expert)
        tally.shared_expert += shared
        active += shared
    others = (child for child in block.children() if child is not block.experts and child is not block.shared_expert)
    return active + tally.own(block) + sum(_walk(child, tally) for child in others)


def _branched_ffn(ffn: BranchedFFN, tally: _Tally) -> float:
    """One branch per query: the largest branch's active count. MoE blocks inside the branches are recorded as
    part of the branches, not as separate MoE layers."""
    layers_before, counted_before, expert_before = len(tally.layers), tally.counted, tally.expert
    per_branch = [_walk(branch, tally) for branch in ffn.branches.values()]
    del tally.layers[layers_before:]
    tally.expert = expert_before + tally.counted - counted_before
    tally.branch_layers.append(_Layer(len(per_branch), 1.0))
    return tally.own(ffn) + max(per_branch, default=0.0)


def _adapter_layer(layer: nn.Module, tally: _Tally, expert_active: float) -> float:
    """A PEFT tuner layer: its ``base_layer`` is the model's own module; everything else it holds is the adapter.
    ``expert_active`` is what the layer's expert tensors (already counted by the caller) add to the active count."""
    active = expert_active
    for name, child in layer.named_children():
        if name == "base_layer":
            active += _walk(child, tally)
        else:
            before = tally.counted
            active += _walk(child, tally)
            tally.adapter += tally.counted - before
    before = tally.counted
    active += tally.own(layer)
    tally.adapter += tally.counted - before
    return active


def _active_adapters(layer: nn.Module, holder: nn.ModuleDict) -> list[str]:
    return [name for name in layer.active_adapters if name in holder]


def _mixlora_experts(layer: MixLoraFeedForward, tally: _Tally) -> float:
    """Count a MixLoRA FFN's expert LoRA tensors (adapter and expert parameters); return their active share."""
    active = 0.0
    for adapter in _active_adapters(layer, layer.moe_gate):
        router = layer.moe_gate[adapter]
        tensors = sum(
            tally.take(child[adapter])
            for name, child in layer.named_children()
            if name.startswith(MIXLORA_EXPERT_PREFIXES) and adapter in child
        )
        used = tally.experts_used(router, router.num_experts, router.top_k)
        tally.adapter_layers.append(_Layer(router.num_experts, used))
        tally.expert += tensors
        tally.adapter += tensors
        active += tensors * used / router.num_experts
    return active


def _smora_experts(layer: SmoraLinear, tally: _Tally) -> float:
    """Count a SMoRA linear's ``A`` and ``B`` (adapter and expert parameters); return the ``activate_r / r`` share."""
    active = 0.0
    for adapter in _active_adapters(layer, layer.lora_A):
        router = layer.lora_router[adapter]
        tensors = tally.subtree(layer.lora_A[adapter]) + tally.subtree(layer.lora_B[adapter])
        used = tally.experts_used(router, router.num_experts, router.top_k)
        tally.adapter_layers.append(_Layer(router.num_experts, used))
        tally.expert += tensors
        tally.adapter += tensors
        active += tensors * used / router.num_experts
    return active


def count_parameters(model: nn.Module, *, experts_per_token: float | None = None) -> ParameterCounts:
    """Total and per-token active parameters of ``model``, found from its modules (see the module docstring for
    exactly what counts as active).

    Args:
        model: any moe_zoo model (upcycled MoE, MoE-LLaVA, Uni-MoE, Metis-HOME), a ``PeftModel`` with a MixLoRA or
            SMoRA adapter, or any ``nn.Module`` (a dense model has ``active == total``).
        experts_per_token: for routers that choose a variable number of experts (top-p, top-any, dense-to-sparse,
            ``mixlora-dynamic``), the number of experts per token to count, e.g. the mean measured on your data.
            Without it those layers count the most a token can use. Fixed top-k layers ignore it.

    Example:
    ```python
    >>> counts = count_parameters(moe_zoo.upcycle(dense, num_experts=8, num_experts_per_tok=2))
    >>> counts.total, counts.active, counts.num_experts, counts.top_k
    ```
    """
    tally = _Tally(experts_per_token=experts_per_token)
    active = _walk(model, tally)
    layers = tally.branch_layers or tally.adapter_layers or tally.layers
    top_k = max((layer.top_k for layer in layers), default=0.0)
    return ParameterCounts(
        total=sum(p.numel() for p in model.parameters()),
        active=round(active),
        expert=tally.expert,
        num_experts=max((layer.num_experts for layer in layers), default=0),
        top_k=int(top_k) if float(top_k).is_integer() else top_k,
        moe_layers=len(layers),
        shared_expert=tally.shared_expert,
        adapter=tally.adapter,
        variable_routing=tally.variable,
    )


__all__ = ["ParameterCounts", "count_parameters"]
