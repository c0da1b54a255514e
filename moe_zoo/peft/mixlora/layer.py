"""The MixLoRA FFN: a frozen dense FFN shared by LoRA experts, with a top-k router.

Expert ``e`` computes ``down_e(act(gate_e(x)) * up_e(x))`` with ``proj_e(x) = W x + s * B_e A_e dropout(x)`` (only the
targeted projections get a LoRA pair). Two ways to compute the mixture ``sum_e w_e * expert_e(x)``:

- ``"fused"`` (default): the frozen ``gate_proj`` / ``up_proj`` run once over all tokens, each routed (token, expert)
  pair adds only its LoRA deltas, and the frozen ``down_proj`` runs once on the routing-weighted sum of the
  activations. That is exact because ``down_proj`` is linear:
  ``sum_e w_e (W_d h_e + B_e A_e h_e) = W_d (sum_e w_e h_e) + sum_e w_e B_e A_e h_e``.
  The frozen FLOPs then equal the dense FFN's (the original runs ``down_proj`` once per expert). The layer only
  hands its projections to the core's kernel :func:`~moe_zoo.core.lora_experts.lora_experts_ffn` (all routed
  pairs at once, per-expert LoRA matmuls grouped, a hand-written backward).
- ``"naive"``: every expert runs the whole FFN on its tokens, looping over experts; a slow reference the tests
  compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.capacity import drop_over_capacity
from ...core.experts import group_by_expert
from ...core.lora_experts import GatedCombine, LoraProjection, lora_experts_ffn
from ...core.options import MoeOptions
from ...core.recording import report_routing
from ...core.routing import Router, RouterOutput, TopKRouter, TopPRouter
from .config import MixLoraConfig


@dataclass(frozen=True)
class FfnLayout:
    """Where a dense FFN keeps its projections: ``input_projections`` read the token state, ``combine`` turns their
    outputs into the hidden activation, ``output_projection`` maps it back. A new layout (Phi's ``fc1`` / ``fc2``:
    inputs ``("fc1",)``, ``combine = act(h)``, output ``"fc2"``, whose bias the fused path must add once) is one
    more entry in :data:`FFN_LAYOUTS`."""

    name: str
    input_projections: tuple[str, ...]
    output_projection: str

    @property
    def projections(self) -> tuple[str, ...]:
        return self.input_projections + (self.output_projection,)


GATED_FFN = FfnLayout("gate_proj/up_proj/down_proj (Llama, Qwen2, Mistral)", ("gate_proj", "up_proj"), "down_proj")
FFN_LAYOUTS = (GATED_FFN,)


def ffn_layout_of(module: nn.Module) -> FfnLayout | None:
    """The supported layout ``module`` has (bias-free Linear projections and an ``act_fn``), or None."""
    for layout in FFN_LAYOUTS:
        linears = [getattr(module, name, None) for name in layout.projections]
        if all(isinstance(p, nn.Linear) and p.bias is None for p in linears) and hasattr(module, "act_fn"):
            return layout
    return None


def _keep_selection_bias_out_of_checkpoint(router: Router) -> None:
    """MixLoRA never uses the core routers' selection bias (it stays zero); saving it would add a key that the
    original's format (``mlp.moe_gate.weight`` only) lacks, so it becomes a non-persistent buffer."""
    router.register_buffer("selection_bias", router.selection_bias, persistent=False)


class MixLoraRouter(TopKRouter):
    """moe-zoo's top-k router, saved as its weight only (``"mixlora"``)."""

    def __init__(self, config: MoeOptions, hidden_size: int):
        super().__init__(config, hidden_size)
        _keep_selection_bias_out_of_checkpoint(self)


class MixLoraTopPRouter(TopPRouter):
    """moe-zoo's top-p router, saved as its weight only (``"mixlora-dynamic"``). Rows are padded with the sentinel
    index ``E`` (weight 0) where a token uses fewer experts than the widest row; the FFN skips them."""

    def __init__(self, config: MoeOptions, hidden_size: int):
        super().__init__(config, hidden_size)
        _keep_selection_bias_out_of_checkpoint(self)


class MixLoraSwitchRouter(MixLoraRouter):
    """Top-1 router with a fixed per-expert capacity (``"mixlora-switch"``): the core's top-k router with k = 1 and
    the softmax probability as weight (not renormalised, so the router gets a gradient), then the core's
    :func:`~moe_zoo.core.capacity.drop_over_capacity` sends each expert's tokens beyond ``capacity`` (in token order)
    to the sentinel index ``E`` with weight 0: they get no expert output, only the residual carries them."""

    def __init__(self, config: MoeOptions, hidden_size: int, capacity: int):
        super().__init__(config, hidden_size)
        self.capacity = capacity

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        logits, weights, indices = super().forward(hidden_states)
        indices, weights = drop_over_capacity(indices, weights, self.num_experts, self.capacity, renormalize=False)
        return logits, weights, indices


def build_router(config: MixLoraConfig, hidden_size: int) -> Router:
    """The router of ``config.routing_strategy``, built from the core's routers (weights not yet initialised)."""
    options = MoeOptions(
        num_experts=config.num_experts,
        num_experts_per_tok=config.experts_per_token,
        router_type="top_p" if config.routing_strategy == "mixlora-dynamic" else "softmax_topk",
        norm_topk_prob=config.routing_strategy == "mixlora",
        router_jitter_noise=config.jitter_noise,
        top_p_threshold=config.top_p,
    )
    if config.routing_strategy == "mixlora-dynamic":
        return MixLoraTopPRouter(options, hidden_size)
    if config.routing_strategy == "mixlora-switch":
        return MixLoraSwitchRouter(options, hidden_size, config.expert_capacity)
    return MixLoraRouter(options, hidden_size)


def _gated_combine(act_fn: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor):
    return act_fn(gate) * up


class MixLoraFeedForward(nn.Module, BaseTunerLayer):
    """Replaces a dense FFN (kept unchanged as ``base_layer``) with MixLoRA's mixture of LoRA experts.

    Adapter tensors, each a dict keyed by adapter name as PEFT expects (saved without the adapter name):
      - ``moe_gate``: the router of the routing strategy (:func:`build_router`; ``weight (E, hidden)`` kept in
        fp32, logits computed in fp32), saved as ``mlp.moe_gate.weight`` like the original. Index ``E`` in its
        output is an empty slot (top-p padding, a token dropped over capacity) and no expert runs for it;
      - ``lora_A_<proj> (E, r, in)`` and ``lora_B_<proj> (E, out, r)`` for each targeted projection: expert ``j``'s
        LoRA pair is ``[j]`` (the original saves it as ``mlp.<proj>.experts.<j>.lora_A.weight``).
    The router reports its logits to :func:`~moe_zoo.core.recording.collect_routing`, which the tuner opens around
    the forward to add the load-balancing loss.
    """

    adapter_layer_names = (
        "moe_gate",
        "lora_A_gate_proj",
        "lora_B_gate_proj",
        "lora_A_up_proj",
        "lora_B_up_proj",
        "lora_A_down_proj",
        "lora_B_down_proj",
    )
    other_param_names = ("expert_dropout",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoraConfig, targeted: set[str]):
        super().__init__()
        layout = ffn_layout_of(base_layer)
        if layout is None:
            raise ValueError(
                f"{type(base_layer).__name__} is not an FFN layout MixLoRA supports; supported: "
                f"{[layout.name for layout in FFN_LAYOUTS]} with bias-free projections and an `act_fn`."
            )
        self.base_layer = base_layer
        self.layout = layout
        self.hidden_size = getattr(base_layer, layout.output_projection).out_features
        self.moe_gate = nn.ModuleDict()
        for name in self.adapter_layer_names[1:]:
            setattr(self, name, nn.ParameterDict())
        self.expert_dropout = nn.ModuleDict()
        self.expert_scaling: dict[str, float] = {}
        self.targeted: dict[str, tuple[str, ...]] = {}
        self.expert_forward: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config, targeted)
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, config: MixLoraConfig, targeted: set[str]) -> None:
        """Create the router and the experts' LoRA pairs of ``adapter_name`` (PEFT's init: A ~ U(+-1/sqrt(in)),
        as ``kaiming_uniform_(a=sqrt(5))`` gives a Linear, and B = 0, so a fresh adapter computes the dense FFN)."""
        unknown = sorted(set(targeted) - set(self.layout.projections))
        if unknown:
            raise ValueError(f"MixLoRA experts can target {self.layout.projections}, got {unknown}.")
        device = getattr(self.base_layer, self.layout.output_projection).weight.device
        router = build_router(config, self.hidden_size).to(device=device, dtype=torch.float32)
        router.reset_parameters(config.router_init_range)
        self.moe_gate[adapter_name] = router
        r, num_experts = config.expert_r, config.num_experts
        for name in targeted:
            base = getattr(self.base_layer, name)
            bound = 1.0 / math.sqrt(base.in_features)
            lora_a = torch.empty(num_experts, r, base.in_features, device=device).uniform_(-bound, bound)
            lora_b = torch.zeros(num_experts, base.out_features, r, device=device)
            getattr(self, f"lora_A_{name}")[adapter_name] = nn.Parameter(lora_a)
            getattr(self, f"lora_B_{name}")[adapter_name] = nn.Parameter(lora_b)
        dropout = config.expert_dropout
        self.expert_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.expert_scaling[adapter_name] = config.expert_scaling
        self.targeted[adapter_name] = tuple(p for p in self.layout.projections if p in targeted)
        self.expert_forward[adapter_name] = config.expert_forward

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "A MixLoRA FFN cannot be merged into the base weights: each token mixes a different set of LoRA experts "
            "chosen by the router, so no single weight matrix computes it. Keep the adapter unmerged."
        )

    def unmerge(self) -> None:
        """Nothing to undo: MixLoRA FFNs are never merged."""

    def _lora_delta(self, adapter: str, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor | None:
        """``s * B_e A_e dropout(x)`` (in the LoRA weights' dtype) for one targeted projection and expert, or None if
        the projection is not targeted."""
        if projection not in self.targeted[adapter]:
            return None
        lora_a = getattr(self, f"lora_A_{projection}")[adapter][expert]
        lora_b = getattr(self, f"lora_B_{projection}")[adapter][expert]
        x = self.expert_dropout[adapter](x).to(lora_a.dtype)
        return (x @ lora_a.t()) @ lora_b.t() * self.expert_scaling[adapter]

    def _projection(self, adapter: str, name: str, expert: int, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        delta = self._lora_delta(adapter, name, expert, x)
        return base if delta is None else base + delta.to(base.dtype)

    def _hidden(self, adapter: str, expert: int, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
        gate = self._projection(adapter, "gate_proj", expert, x, gate)
        up = self._projection(adapter, "up_proj", expert, x, up)
        return _gated_combine(self.base_layer.act_fn, gate, up)

    def _routed(self, adapter: str, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
        """``(expert, tokens, weights (n, 1))`` for each expert with routed tokens, from one sort of the pairs; the
        sentinel index E (an empty slot) never runs an expert."""
        groups = group_by_expert(indices, self.moe_gate[adapter].num_experts)
        routed_weights = weights.reshape(-1)[groups.pairs].unsqueeze(-1).to(dtype)
        for expert, span in groups.spans():
            yield expert, groups.tokens[span], routed_weights[span]

    def _expert_projection(self, adapter: str, name: str) -> LoraProjection:
        """Projection ``name`` of the base FFN with the experts' stacked LoRA pair (None if not targeted)."""
        linear = getattr(self.base_layer, name)
        if name not in self.targeted[adapter]:
            return LoraProjection(linear.weight, linear.bias)
        lora_a = getattr(self, f"lora_A_{name}")[adapter]
        lora_b = getattr(self, f"lora_B_{name}")[adapter]
        return LoraProjection(linear.weight, linear.bias, lora_a, lora_b)

    def _fused(self, adapter: str, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """All routed pairs at once through the core's LoRA-expert kernel (frozen projections once per token)."""
        dropout = self.expert_dropout[adapter]
        return lora_experts_ffn(
            x,
            weights,
            indices,
            self.moe_gate[adapter].num_experts,
            inputs=[self._expert_projection(adapter, name) for name in self.layout.input_projections],
            combine=GatedCombine(self.base_layer.act_fn),
            output=self._expert_projection(adapter, self.layout.output_projection),
            scaling=self.expert_scaling[adapter],
            dropout=dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0,
        )

    def _naive(self, adapter: str, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = torch.zeros_like(x)
        for expert, tokens, weight in self._routed(adapter, weights, indices, x.dtype):
            x_e = x[tokens]
            hidden = self._hidden(adapter, expert, x_e, base.gate_proj(x_e), base.up_proj(x_e))
            y = self._projection(adapter, "down_proj", expert, hidden, base.down_proj(hidden))
            out.index_add_(0, tokens, y * weight)
        return out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.moe_gate]
        if self.disable_adapters or not adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        if len(adapters) > 1:
            raise ValueError(f"MixLoRA runs one adapter at a time, but {adapters} are active; use set_adapter().")
        adapter = adapters[0]
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        router = self.moe_gate[adapter]
        logits, weights, indices = router(x)
        report_routing(logits, indices, router)
        mix = self._fused if self.expert_forward[adapter] == "fused" else self._naive
        return mix(adapter, x, weights, indices).reshape(shape)

    def __repr__(self) -> str:
        return "mixlora." + super().__repr__()
