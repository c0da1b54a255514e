"""The SMoRA layer: a LoRA ``nn.Linear`` whose ``r`` ranks are rank-one experts chosen per token by a sigmoid router.

For a token ``x`` (after LoRA dropout) the layer computes ``W x + s * B (g ⊙ (A x))`` where ``g`` (length ``r``) is
the token's gate: zero except on the ``activate_r`` chosen ranks. The router scores the ``r // rank_partition``
experts (groups of ``rank_partition`` consecutive ranks) with ``sigmoid(W_router x)``; the ``activate_r //
rank_partition`` best scores plus the selection bias are chosen, and each chosen expert's ranks get
``score / sum(chosen scores) * (activate_r // rank_partition)``. That is the original's per-rank rule
``top_val / sum(top_vals) * activate_r`` written per expert: a chosen expert's ``rank_partition`` ranks all carry its
score, so their sum over ranks is ``rank_partition`` times the sum over experts. ``s = lora_alpha / activate_r``.

The computation is exact and never builds an ``N x out x r`` tensor: ``h = A x`` is ``N x r`` (the same FLOPs as LoRA's
first matmul), the gate zeroes all but ``activate_r`` entries of each row, and ``B`` maps the result back. The
unchosen ranks then get no gradient, as in the original's indexed kernels. (Those kernels only compute the chosen
rows of ``A``; for ``activate_r`` much smaller than ``r`` a gather-based kernel would save FLOPs, not change the
result.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ...core.options import MoeOptions
from ...core.routing import RouterOutput, TopKRouter
from .config import SmoraConfig, check_rank_layout


class SmoraRankRouter(TopKRouter):
    """The core's sigmoid top-k router over the ``r // rank_partition`` rank experts.

    ``weight`` is ``(r // rank_partition, in_features)`` (the original's ``Linear(in, r // rank_partition,
    bias=False)``); ``selection_bias`` is the persistent, non-trainable per-expert balancing bias (per rank when
    ``rank_partition == 1``), saved with the adapter. Combine weights are the chosen sigmoid scores normalised to sum
    to ``k = activate_r // rank_partition``: the core's ``norm_topk_prob`` with ``routed_scaling_factor = k``.

    ``bias_balancing="original"`` reproduces the official code: the bias is updated right after every training
    forward from that forward's loads, and it is part of the combine weights (:meth:`_combine_scores`).
    """

    def __init__(self, in_features: int, r: int, activate_r: int, rank_partition: int, config: SmoraConfig):
        experts, k = r // rank_partition, activate_r // rank_partition
        options = MoeOptions(
            num_experts=experts,
            num_experts_per_tok=k,
            router_type="sigmoid_topk",
            norm_topk_prob=True,
            routed_scaling_factor=float(k),
            router_bias_update_rate=float(config.bias_update_rate),
        )
        super().__init__(options, in_features)
        self.rank_partition = rank_partition
        self.original_balancing = config.bias_balancing == "original"
        # nn.Linear's own init, as the original's router keeps it (PEFT's reset only touches lora_A / lora_B).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _combine_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.selection_bias if self.original_balancing else scores

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        output = super().forward(hidden_states)
        if self.original_balancing and self.training:
            self.update_bias()  # this forward's loads only, as the original does
        return output

    def extra_repr(self) -> str:
        balancing = "original" if self.original_balancing else "per_step"
        return (
            f"in_features={self.hidden_size}, experts={self.num_experts}, top_k={self.top_k}, "
            f"rank_partition={self.rank_partition}, bias_update_rate={self.bias_update_rate}, balancing={balancing}"
        )

    def rank_gate(self, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The ``(N, r)`` gate: expert ``e``'s weight on its ranks ``e * rank_partition ...``, zero elsewhere."""
        expert_gate = weights.new_zeros(weights.shape[0], self.num_experts).scatter(-1, indices, weights)
        return expert_gate.repeat_interleave(self.rank_partition, dim=-1)


class SmoraLayer(LoraLayer):
    """PEFT's ``LoraLayer`` (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling`` keyed by adapter) plus one rank
    router per adapter in ``lora_router``; saved as ``<module>.lora_router.weight`` and
    ``<module>.lora_router.selection_bias``."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_router",)
    other_param_names = LoraLayer.other_param_names + ("activate_r", "rank_partition")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lora_router = nn.ModuleDict({})
        self.activate_r: dict[str, int] = {}
        self.rank_partition: dict[str, int] = {}

    @property
    def lora_variants(self) -> dict:
        """No LoRA variant (DoRA, aLoRA, ...) has a gated form; :class:`SmoraConfig` rejects them all."""
        return {(): None}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: SmoraConfig, **kwargs: Any) -> None:
        """Create ``adapter_name``'s ``A (r, in)``, ``B (out, r)`` and rank router (PEFT's LoRA init for A and B: a
        fresh adapter computes the base layer, since B = 0)."""
        r_name = "r" if r == config.r else f"rank_pattern value for {kwargs.get('target_name', 'this layer')!r}"
        check_rank_layout(r, config.activate_r, config.rank_partition, r_name=r_name)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.activate_r[adapter_name] = config.activate_r
        self.rank_partition[adapter_name] = config.rank_partition
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.lora_router[adapter_name] = SmoraRankRouter(
            self.in_features, r, config.activate_r, config.rank_partition, config
        )
        self.lora_bias[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = self._initial_scaling(adapter_name)
        if config.init_lora_weights is not False:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _initial_scaling(self, adapter: str) -> float:
        """``lora_alpha / activate_r`` (the original's), or ``lora_alpha / sqrt(activate_r)`` with rsLoRA."""
        active = self.activate_r[adapter]
        denominator = math.sqrt(active) if self.use_rslora[adapter] else active
        return self.lora_alpha[adapter] / denominator

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                self.scaling[adapter] = (
                    self._initial_scaling(adapter) if scale is None else self.scaling[adapter] / scale
                )


def _merge_error() -> NotImplementedError:
    return NotImplementedError(
        "A SMoRA layer cannot be merged into the base weights: the router gives every token its own set of active "
        "ranks and gate values, so no single weight matrix computes it. Keep the adapter unmerged."
    )


class SmoraLinear(nn.Module, SmoraLayer):
    """Wraps an ``nn.Linear`` (kept frozen as ``base_layer``) with SMoRA's rank experts."""

    def __init__(
        self, base_layer: nn.Linear, adapter_name: str, config: SmoraConfig, r: int, lora_alpha: float, **kwargs
    ):
        super().__init__()
        SmoraLayer.__init__(self, base_layer, ephemeral_gpu_offload=kwargs.get("ephemeral_gpu_offload", False))
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=kwargs.get("target_name"))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise _merge_error()

    def unmerge(self) -> None:
        """Nothing to undo: SMoRA layers are never merged."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise _merge_error()

    def smora_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``s * B (g ⊙ (A dropout(x)))`` for one adapter, in the LoRA weights' dtype, shaped like the base output."""
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        router: SmoraRankRouter = self.lora_router[adapter]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        tokens = self.lora_dropout[adapter](x).reshape(-1, self.in_features)
        # The router sees the same dropped-out input as A. Its routing is not reported to collect_routing: an MoE
        # model under the adapter (an upcycled MoE with LoRA on attention) collects its own blocks' routing there for
        # its aux loss and router_logits, and rank routers must not join them.
        _, weights, indices = router(tokens)
        gate = router.rank_gate(weights, indices).to(tokens.dtype)
        delta = lora_b(lora_a(tokens) * gate) * self.scaling[adapter]
        return delta.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("SMoRA does not support `adapter_names` (mixed-adapter batches); use set_adapter().")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self.smora_delta(adapter, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "smora." + super().__repr__()
