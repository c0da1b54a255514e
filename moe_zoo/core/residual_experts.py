"""RMoE: every expert as one frozen core shared by all experts plus a trainable residual, full or low-rank (Wu et
al., "Residual Mixture of Experts").

RMoE factors each expert weight into an input-independent core and an input-dependent residual,
``W_e = W_core + R_e``: the core is trained once (upstream, as a dense model or an MoE whose experts are then
averaged), and the cheap residuals are what the experts learn (briefly upstream, then downstream). Here the expert
bank's weight tensors (``gate_up_proj``, ``down_proj``, Phi's ``up_proj``) are parametrised with
``torch.nn.utils.parametrize``, so every experts implementation (eager, moe_zoo's fused pass, transformers'
``grouped_mm``) reads ``core + residual`` as if it were the bank's own tensor:

- ``rank=None``: a full residual ``R_e (E, out, in)``, zero at the start;
- ``rank=r``: ``R_e = B_e A_e`` with ``B_e (E, out, r)`` zero and ``A_e (E, r, in)`` random (std ``init_std``,
  by default ``1 / sqrt(in)``, as LoRA scales its ``A``), so the model starts
  exactly at its core and only ``r * (out + in)`` weights per expert and tensor train.

The core is a buffer: no gradient, no optimizer state. :func:`add_residual_experts` installs the parametrisation on
every MoE block, :func:`merge_residual_experts` folds ``core + residual`` back into ordinary expert tensors, so the
model saves as a plain moe-zoo MoE that ``from_pretrained`` loads. The core of a bank is the mean of its experts
(their common value after upcycling; an MoE trained upstream is averaged, as RMoE's upcycled variant does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .block import SparseMoeBlock

WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
"""Expert-bank tensors that get a residual (biases stay ordinary, trainable parameters)."""


class ResidualExpertWeight(nn.Module):
    """The parametrisation ``core + residual`` of one ``(E, out, in)`` expert tensor (see the module docstring).

    The parametrised tensor's ``original`` is the full residual (``rank=None``) or an empty placeholder (low-rank:
    the factors are this module's own parameters ``residual_b``, ``residual_a``)."""

    def __init__(self, weight: torch.Tensor, rank: int | None, init_std: float | None = None):
        super().__init__()
        num_experts, out_features, in_features = weight.shape
        self.register_buffer("core", weight.detach().mean(dim=0, keepdim=True).clone())
        self.rank = rank
        if rank is not None:
            init_std = init_std if init_std is not None else in_features**-0.5  # LoRA's scale for A
            self.residual_b = nn.Parameter(weight.new_zeros(num_experts, out_features, rank))
            self.residual_a = nn.Parameter(
                torch.randn(num_experts, rank, in_features, dtype=weight.dtype, device=weight.device) * init_std
            )

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return self.core + original
        return self.core + torch.bmm(self.residual_b, self.residual_a)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """What ``original`` stores for ``value``: the full residual ``value - core``; for low-rank, nothing (the
        factors cannot represent an arbitrary value, so assignments are refused except at registration)."""
        if self.rank is None:
            return value - self.core
        if getattr(self, "_registered", False):
            raise ValueError(
                "Low-rank residual experts cannot take an assigned weight (B A cannot represent it); merge them "
                "first (merge_residual_experts) or use full residuals (rank=None)."
            )
        self._registered = True  # the one call register_parametrization makes
        return value.new_zeros(0)


def _banks(model: nn.Module) -> list[nn.Module]:
    banks = [m.experts for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not banks:
        raise ValueError(f"{type(model).__name__} has no moe_zoo MoE block (SparseMoeBlock) for residual experts.")
    return banks


def add_residual_experts(model: nn.Module, rank: int | None = None, init_std: float | None = None) -> nn.Module:
    """Make every expert of ``model`` a frozen shared core plus a trainable residual (full with ``rank=None``,
    low-rank ``B A`` otherwise); returns ``model``. Full residuals start at ``W_e - core``, so the model computes
    what it did; low-rank ones start at zero, so every expert starts at the core (the mean of the experts: what it
    did for an upcycled model, whose experts are identical). Raises ``ValueError`` for a model without MoE blocks,
    experts already residual, or a rank that is not a positive integer."""
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None (full residuals) or a positive integer, got {rank!r}.")
    for bank in _banks(model):
        for name in WEIGHT_NAMES:
            if not hasattr(bank, name):
                continue
            if parametrize.is_parametrized(bank, name):
                raise ValueError(f"{type(bank).__name__}.{name} already has residual experts.")
            parametrization = ResidualExpertWeight(getattr(bank, name), rank, init_std)
            parametrize.register_parametrization(bank, name, parametrization, unsafe=True)
            original = bank.parametrizations[name].original
            original.requires_grad_(rank is None)
    return model


def freeze_all_but_residuals(model: nn.Module, train_routers: bool = True) -> list[str]:
    """RMoE's training set: only the residuals train (and the routers with ``train_routers``, as in its upstream
    phase; downstream fine-tunes the residuals alone); returns the names of the trainable parameters."""
    residuals = {id(p) for p in residual_parameters(model)}
    routers = {id(p) for m in model.modules() if isinstance(m, SparseMoeBlock) for p in m.gate.parameters()}
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in residuals or (train_routers and id(param) in routers))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def residual_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The residuals' trainable tensors (full residuals or low-rank factors) of every expert bank of ``model``."""
    found = []
    for bank in _banks(model):
        for name in WEIGHT_NAMES:
            if parametrize.is_parametrized(bank, name):
                found += [p for p in bank.parametrizations[name].parameters() if p.requires_grad]
    return found


@torch.no_grad()
def merge_residual_experts(model: nn.Module) -> nn.Module:
    """Fold ``core + residual`` into ordinary expert tensors (the parametrisations are removed); returns ``model``,
    which then saves as a plain moe-zoo MoE."""
    for bank in _banks(model):
        for name in WEIGHT_NAMES:
            if hasattr(bank, name) and parametrize.is_parametrized(bank, name):
                parametrize.remove_parametrizations(bank, name, leave_parametrized=True)
    return model
