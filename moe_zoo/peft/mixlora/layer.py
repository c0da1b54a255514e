"""The MixLoRA FFN: a frozen dense FFN shared by LoRA experts, with a router.

A dense FFN is ``out(combine(act, in_1(x), ..., in_n(x)))``: the input projections read the token, ``combine`` makes
the hidden activation from their outputs and the output projection maps it back (:class:`FfnLayout`; Llama's is
``down(act(gate(x)) * up(x))``). Expert ``e`` computes the same FFN with ``proj_e(x) = W x + b + s * B_e A_e
dropout(x)`` on every targeted projection (frozen ``W x + b`` on the others). Two ways to compute the mixture
``sum_e w_e * expert_e(x)``:

- ``"fused"`` (default): the frozen input projections run once over all tokens, each routed (token, expert) pair adds
  only its LoRA deltas, and the frozen output projection runs once on the routing-weighted sum of the hidden
  activations. That is exact because the output projection is affine:
  ``sum_e w_e (W h_e + b + B_e A_e h_e) = W (sum_e w_e h_e) + b * sum_e w_e + sum_e w_e B_e A_e h_e``. The bias term
  is ``b * sum_e w_e`` per token, not ``b``: the weights of a token need not sum to 1 (top-p's raw probabilities,
  switch's top-1 probability, a token dropped over capacity has none). The frozen FLOPs then equal the dense FFN's
  (the original runs the output projection once per expert). The layer hands its projections to the core's kernel
  :func:`~moe_zoo.core.lora_experts.lora_experts_ffn` (all routed pairs at once, per-expert LoRA matmuls grouped,
  a hand-written backward); DoRA experts take a per-expert loop instead, see :meth:`MixLoraFeedForward._fused`.
- ``"naive"``: every expert runs the whole FFN on its tokens, looping over experts; a slow reference the tests
  compare against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.capacity import drop_over_capacity
from ...core.experts import group_by_expert
from ...core.gated_combine import GatedCombine
from ...core.lora_experts import LoraProjection, lora_experts_ffn
from ...core.options import MoeOptions
from ...core.quantized_experts import dense_weight, frozen_linear, is_quantized_linear
from ...core.recording import report_routing
from ...core.routing import Router, RouterOutput, TopKRouter, TopPRouter
from .config import MixLoraConfig

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gated(act: Activation, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _plain(act: Activation, hidden: torch.Tensor) -> torch.Tensor:
    return act(hidden)


def _chunked_gate_up(act: Activation, gate_up: torch.Tensor) -> torch.Tensor:
    """Phi-3's fused projection: the first half of the features is the gate, the second half the up state."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * act(gate)


@dataclass(frozen=True)
class FfnLayout:
    """Where a dense FFN keeps its parts: ``input_projections`` read the token state, ``combine(act, *outputs)``
    makes the hidden activation from their outputs (in that order), ``output_projection`` maps it back, and the
    activation module is the FFN's attribute ``activation``. The projections are ``nn.Linear`` with or without a
    bias. A new layout is one more entry in :data:`FFN_LAYOUTS`; the forward paths read nothing else."""

    projection_names: str
    models: str
    input_projections: tuple[str, ...]
    output_projection: str
    activation: str
    combine: Callable[..., torch.Tensor]

    @property
    def projections(self) -> tuple[str, ...]:
        return self.input_projections + (self.output_projection,)

    @property
    def name(self) -> str:
        return f"{self.projection_names} + {self.activation} ({self.models})"

    def matches(self, module: nn.Module) -> bool:
        """``module`` has every projection as an ``nn.Linear`` and the activation attribute."""
        linears = [getattr(module, name, None) for name in self.projections]
        return all(isinstance(p, nn.Linear) for p in linears) and callable(getattr(module, self.activation, None))


GATED_FFN = FfnLayout(
    "gate_proj/up_proj/down_proj",
    "Llama, Qwen2, Mistral, Gemma",
    ("gate_proj", "up_proj"),
    "down_proj",
    "act_fn",
    _gated,
)
PHI_FFN = FfnLayout("fc1/fc2", "Phi", ("fc1",), "fc2", "activation_fn", _plain)
PHI3_FFN = FfnLayout(
    "gate_up_proj/down_proj", "Phi-3", ("gate_up_proj",), "down_proj", "activation_fn", _chunked_gate_up
)
FFN_LAYOUTS = (GATED_FFN, PHI_FFN, PHI3_FFN)
"""The FFN layouts MixLoRA supports, tried in this order (the same the original ``mixlora`` package supports)."""
FFN_PROJECTIONS = tuple(dict.fromkeys(name for layout in FFN_LAYOUTS for name in layout.projections))
"""Every projection name of a supported layout (a targeted name from this list must sit in a supported FFN)."""


def ffn_layout_of(module: nn.Module) -> FfnLayout | None:
    """The supported layout ``module`` has, or None."""
    return next((layout for layout in FFN_LAYOUTS if layout.matches(module)), None)


def supported_layouts() -> str:
    """The supported layouts, for error messages."""
    return "; ".join(layout.name for layout in FFN_LAYOUTS)


def kernel_combine(layout: FfnLayout, act: Activation) -> Callable[..., torch.Tensor]:
    """``layout.combine`` with the activation bound, for the core kernel: the gated layouts get
    :class:`~moe_zoo.core.lora_experts.GatedCombine` (same values, a backward in place), any other layout its own
    function, which the kernel differentiates with autograd."""
    if layout.combine is _gated:
        return GatedCombine(act)
    if layout.combine is _chunked_gate_up:
        return GatedCombine(act, chunked=True)
    return functools.partial(layout.combine, act)


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + s B A||`` per output feature (the row norms, shape ``(out,)``), in the LoRA weights' dtype: DoRA's
    denominator, and the magnitude a fresh DoRA adapter starts from (as PEFT and the original initialise it)."""
    return torch.linalg.norm(weight.to(lora_a.dtype) + scaling * (lora_b @ lora_a), dim=1)


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


class MixLoraFeedForward(nn.Module, BaseTunerLayer):
    """Replaces a dense FFN (kept unchanged as ``base_layer``) with MixLoRA's mixture of LoRA experts.

    Adapter tensors, each a dict keyed by adapter name as PEFT expects (saved without the adapter name):
      - ``moe_gate``: the router of the routing strategy (:func:`build_router`; ``weight (E, hidden)`` kept in
        fp32, logits computed in fp32), saved as ``mlp.moe_gate.weight`` like the original. Index ``E`` in its
        output is an empty slot (top-p padding, a token dropped over capacity) and no expert runs for it;
      - ``lora_A_<proj> (E, r, in)`` and ``lora_B_<proj> (E, out, r)`` for each targeted projection: expert ``j``'s
        LoRA pair is ``[j]`` (the original saves it as ``mlp.<proj>.experts.<j>.lora_A.weight``);
      - with ``use_dora``, ``lora_magnitude_<proj> (E, out)``: DoRA's magnitude, one vector per expert as in the
        original (each of its expert ``LoraLinear`` has its own ``magnitude_vector_``). Expert ``j`` then computes
        ``proj_j(x) = m_j / ||W + s B_j A_j|| * (W x + s B_j A_j dropout(x)) + b``, the norm taken per output
        feature and detached from the graph (DoRA's choice, as PEFT and the original). The bias is not rescaled
        (PEFT and the DoRA paper rescale the weight only; the original rescales ``W x + b``: they agree when the
        projection has no bias or ``m = ||W + s B A||``). Dropout reaches only the LoRA branch, as in the original
        (PEFT's DoRA also feeds the dropped input to the rescaled frozen product, in training only).
    The router reports its logits to :func:`~moe_zoo.core.recording.collect_routing`, which the tuner opens around
    the forward to add the load-balancing loss.
    """

    adapter_layer_names = ("moe_gate",) + tuple(
        f"lora_{kind}_{proj}" for proj in FFN_PROJECTIONS for kind in ("A", "B", "magnitude")
    )
    other_param_names = ("expert_dropout",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MixLoraConfig, targeted: set[str]):
        super().__init__()
        layout = ffn_layout_of(base_layer)
        if layout is None:
            raise ValueError(
                f"{type(base_layer).__name__} is not an FFN layout MixLoRA supports; supported: "
                f"{supported_layouts()} (nn.Linear projections, with or without biases)."
            )
        self.base_layer = base_layer
        self.layout = layout
        # Built once: GatedCombine probes the activation for SiLU, which must not run on every forward.
        self.kernel_combine = kernel_combine(layout, getattr(base_layer, layout.activation))
        self.hidden_size = getattr(base_layer, layout.output_projection).out_features
        self.moe_gate = nn.ModuleDict()
        for name in self.adapter_layer_names[1:]:
            setattr(self, name, nn.ParameterDict())
        self.expert_dropout = nn.ModuleDict()
        self.expert_scaling: dict[str, float] = {}
        self.targeted: dict[str, tuple[str, ...]] = {}
        self.use_dora: dict[str, bool] = {}
        self.expert_forward: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config, targeted)
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, config: MixLoraConfig, targeted: set[str]) -> None:
        """Create the router and the experts' LoRA pairs of ``adapter_name`` (PEFT's init: A ~ U(+-1/sqrt(in)),
        as ``kaiming_uniform_(a=sqrt(5))`` gives a Linear, and B = 0, so a fresh adapter computes the dense FFN;
        DoRA magnitudes start at ``||W + s B A|| = ||W||``, which keeps that true)."""
        unknown = sorted(set(targeted) - set(self.layout.projections))
        if unknown:
            raise ValueError(
                f"MixLoRA experts of a {self.layout.name} FFN can target {self.layout.projections}, got {unknown}."
            )
        device = getattr(self.base_layer, self.layout.output_projection).weight.device
        router = build_router(config, self.hidden_size).to(device=device, dtype=torch.float32)
        router.reset_parameters(config.router_init_range)
        self.moe_gate[adapter_name] = router
        r, num_experts, scaling = config.expert_r, config.num_experts, config.expert_scaling
        targeted_in_order = tuple(p for p in self.layout.projections if p in targeted)
        for name in targeted_in_order:  # layout order, not set order: the same init in every process
            base = getattr(self.base_layer, name)
            bound = 1.0 / math.sqrt(base.in_features)
            lora_a = torch.empty(num_experts, r, base.in_features, device=device).uniform_(-bound, bound)
            lora_b = torch.zeros(num_experts, base.out_features, r, device=device)
            getattr(self, f"lora_A_{name}")[adapter_name] = nn.Parameter(lora_a)
            getattr(self, f"lora_B_{name}")[adapter_name] = nn.Parameter(lora_b)
            if config.use_dora:
                with torch.no_grad():
                    weight = dense_weight(base)  # dequantized once here for a bitsandbytes (QLoRA) base
                    norms = [dora_weight_norm(weight, a, b, scaling) for a, b in zip(lora_a, lora_b, strict=True)]
                getattr(self, f"lora_magnitude_{name}")[adapter_name] = nn.Parameter(torch.stack(norms))
        dropout = config.expert_dropout
        self.expert_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.expert_scaling[adapter_name] = scaling
        self.targeted[adapter_name] = targeted_in_order
        self.use_dora[adapter_name] = bool(config.use_dora)
        self.expert_forward[adapter_name] = config.expert_forward

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "A MixLoRA FFN cannot be merged into the base weights: each token mixes a different set of LoRA experts "
            "chosen by the router, so no single weight matrix computes it. Keep the adapter unmerged."
        )

    def unmerge(self) -> None:
        """Nothing to undo: MixLoRA FFNs are never merged."""

    @property
    def quantized_base(self) -> bool:
        """Whether the frozen FFN's projections are bitsandbytes layers (a QLoRA base)."""
        names = (*self.layout.input_projections, self.layout.output_projection)
        return any(is_quantized_linear(getattr(self.base_layer, name)) for name in names)

    @property
    def activation(self) -> Activation:
        return getattr(self.base_layer, self.layout.activation)

    def dora_norm(self, adapter: str, projection: str, expert: int) -> torch.Tensor:
        """``||W + s B_e A_e||`` per output feature of one expert's projection (DoRA's denominator)."""
        lora_a = getattr(self, f"lora_A_{projection}")[adapter][expert]
        lora_b = getattr(self, f"lora_B_{projection}")[adapter][expert]
        weight = dense_weight(getattr(self.base_layer, projection))
        return dora_weight_norm(weight, lora_a, lora_b, self.expert_scaling[adapter])

    def _lora_delta(self, adapter: str, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``s * B_e A_e dropout(x)`` in the LoRA weights' dtype."""
        lora_a = getattr(self, f"lora_A_{projection}")[adapter][expert]
        lora_b = getattr(self, f"lora_B_{projection}")[adapter][expert]
        x = self.expert_dropout[adapter](x).to(lora_a.dtype)
        return (x @ lora_a.t()) @ lora_b.t() * self.expert_scaling[adapter]

    def _expert_product(self, adapter: str, name: str, expert: int, x: torch.Tensor, frozen: torch.Tensor):
        """Expert ``expert``'s projection ``name`` without its bias, given the frozen product ``frozen = W x``:
        ``W x + s B A dropout(x)`` (LoRA), ``m / ||W + s B A|| * (W x + s B A dropout(x))`` (DoRA), or ``W x`` if
        the projection is not targeted."""
        if name not in self.targeted[adapter]:
            return frozen
        product = frozen + self._lora_delta(adapter, name, expert, x).to(frozen.dtype)
        if not self.use_dora[adapter]:
            return product
        magnitude = getattr(self, f"lora_magnitude_{name}")[adapter][expert]
        scale = magnitude / self.dora_norm(adapter, name, expert).detach()
        return scale.to(product.dtype) * product

    def _frozen_product(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The frozen ``W x`` of projection ``name``, without its bias (added by the caller where it belongs); through
        bitsandbytes' own matmul when the base FFN is quantized (QLoRA)."""
        return frozen_linear(getattr(self.base_layer, name), x)

    def _with_bias(self, name: str, product: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """``product + b`` (or ``product + b * times`` with ``times (n, 1)``) for projection ``name``."""
        bias = getattr(self.base_layer, name).bias
        if bias is None:
            return product
        return product + (bias if times is None else bias * times)

    def _hidden(self, adapter: str, expert: int, x: torch.Tensor, frozen_inputs: list[torch.Tensor]) -> torch.Tensor:
        """Expert ``expert``'s hidden activation from its tokens ``x`` and the frozen input products on them."""
        inputs = [
            self._with_bias(name, self._expert_product(adapter, name, expert, x, frozen))
            for name, frozen in zip(self.layout.input_projections, frozen_inputs, strict=True)
        ]
        return self.layout.combine(self.activation, *inputs)

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
        """All routed pairs at once through the core's LoRA-expert kernel (frozen projections once per token).

        DoRA experts rescale each expert's projection by its own ``m_e / ||W + s B_e A_e||``, which the kernel does
        not model: they take :meth:`_fused_dora`, the same algebra looping over experts. So does a quantized
        (bitsandbytes 4-/8-bit, QLoRA) base FFN, whose packed weights the kernel cannot read: the loop runs each frozen
        projection through the quantized layer's own matmul, still once per token for the input projections."""
        if self.use_dora[adapter] or self.quantized_base:
            return self._fused_dora(adapter, x, weights, indices)
        dropout = self.expert_dropout[adapter]
        return lora_experts_ffn(
            x,
            weights,
            indices,
            self.moe_gate[adapter].num_experts,
            inputs=[self._expert_projection(adapter, name) for name in self.layout.input_projections],
            combine=self.kernel_combine,
            output=self._expert_projection(adapter, self.layout.output_projection),
            scaling=self.expert_scaling[adapter],
            dropout=dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0,
        )

    def _weight_sums(self, adapter: str, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
        """``sum_e w_e (T, 1)`` over each token's routed experts (empty slots excluded): the multiple of the output
        projection's bias the mixture carries."""
        routed = indices < self.moe_gate[adapter].num_experts
        return (weights * routed).sum(dim=-1, keepdim=True).to(dtype)

    def _fused_dora(self, adapter: str, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        """The fused algebra with DoRA experts, looping over experts: frozen input projections once over all tokens;
        per routed pair only the (rescaled) LoRA deltas; the frozen output projection once on ``sum_e w_e h_e``,
        plus ``sum_e w_e s B_e A_e h_e`` and ``b * sum_e w_e``.

        With DoRA on the output projection, expert ``e``'s output ``m_e / ||W + s B_e A_e|| * (W h_e + ...)``
        rescales each output feature differently per expert, so ``W`` cannot be factored out of the sum: the frozen
        output product then runs once per expert on that expert's tokens (``top_k`` times the dense FFN's
        output-projection FLOPs, as in the original). DoRA on the input projections keeps them shared: the
        per-expert scale applies after the shared ``W x``."""
        out_name = self.layout.output_projection
        frozen_inputs = [self._frozen_product(name, x) for name in self.layout.input_projections]
        per_expert_output = self.use_dora[adapter] and out_name in self.targeted[adapter]
        out = torch.zeros_like(x)
        mixed_hidden = None
        for expert, tokens, weight in self._routed(adapter, weights, indices, x.dtype):
            hidden = self._hidden(adapter, expert, x[tokens], [frozen[tokens] for frozen in frozen_inputs])
            if per_expert_output:
                frozen = self._frozen_product(out_name, hidden)
                out.index_add_(0, tokens, self._expert_product(adapter, out_name, expert, hidden, frozen) * weight)
                continue
            if mixed_hidden is None:
                mixed_hidden = hidden.new_zeros(x.shape[0], hidden.shape[-1])
            mixed_hidden.index_add_(0, tokens, hidden * weight)
            if out_name in self.targeted[adapter]:
                delta = self._lora_delta(adapter, out_name, expert, hidden)
                out.index_add_(0, tokens, delta.to(x.dtype) * weight)
        if mixed_hidden is not None:
            out = out + self._frozen_product(out_name, mixed_hidden)
        return self._with_bias(out_name, out, self._weight_sums(adapter, weights, indices, x.dtype))

    def _naive(self, adapter: str, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every expert runs the whole FFN (every frozen product and bias) on its own tokens."""
        out_name = self.layout.output_projection
        out = torch.zeros_like(x)
        for expert, tokens, weight in self._routed(adapter, weights, indices, x.dtype):
            x_e = x[tokens]
            frozen_inputs = [self._frozen_product(name, x_e) for name in self.layout.input_projections]
            hidden = self._hidden(adapter, expert, x_e, frozen_inputs)
            y = self._expert_product(adapter, out_name, expert, hidden, self._frozen_product(out_name, hidden))
            out.index_add_(0, tokens, self._with_bias(out_name, y) * weight)
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
