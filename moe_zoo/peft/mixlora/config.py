"""``MixLoraConfig``: a ``LoraConfig`` with the MoE fields of MixLoRA (Li et al., "MixLoRA: Enhancing Large Language
Models Fine-Tuning with LoRA-based Mixture of Experts").

It subclasses PEFT's ``LoraConfig`` so that the attention projections, which get plain LoRA, reuse PEFT's own LoRA
layers and every LoRA option behaves as users expect; only ``peft_type`` changes, to ``"MIXLORA"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig

MIXLORA_PEFT_TYPE = "MIXLORA"
"""The PEFT type string written to ``adapter_config.json`` (the same as the original MixLoRA's)."""

ROUTING_STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")
"""Accepted ``routing_strategy`` values:

- ``"mixlora"``: softmax over all experts, top-k, renormalised;
- ``"mixlora-dynamic"``: top-p, each token takes the smallest set of experts whose probabilities reach ``top_p``,
  weighted by their raw (not renormalised) probabilities (the core's :class:`~moe_zoo.core.routing.TopPRouter`);
- ``"mixlora-switch"``: top-1 weighted by its softmax probability, at most ``expert_capacity`` tokens per expert.
"""

STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {
    "mixlora": {"router_init_range": 0.02, "jitter_noise": 0.0, "router_z_loss_coef": 0.0},
    "mixlora-dynamic": {"router_init_range": 0.02, "jitter_noise": 0.0, "router_z_loss_coef": 0.0},
    "mixlora-switch": {"router_init_range": 1.0, "jitter_noise": 0.01, "router_z_loss_coef": 0.001},
}
"""Values the strategy gives the fields left at ``None`` (the original MixLoRA config class's per-strategy defaults);
a value the user sets always wins."""

EXPERT_FORWARDS = ("fused", "naive")
"""Accepted ``expert_forward`` values, see :class:`~moe_zoo.peft.mixlora.layer.MixLoraFeedForward`."""

EXPERT_LORA_KEYS = ("r", "lora_alpha", "lora_dropout")


@dataclass
class MixLoraConfig(LoraConfig):
    """Configuration of a MixLoRA adapter.

    Every targeted FFN projection (``gate_proj`` / ``up_proj`` / ``down_proj``, Phi's ``fc1`` / ``fc2``, Phi-3's
    ``gate_up_proj`` / ``down_proj``; see :data:`~moe_zoo.peft.mixlora.layer.FFN_LAYOUTS`) turns its FFN into a
    mixture of ``num_experts`` experts that share the frozen FFN and each add their own LoRA pair; every other
    targeted Linear (``q_proj`` ... ``o_proj``) gets PEFT's plain LoRA. ``r``, ``lora_alpha``, ``lora_dropout``,
    ``use_rslora``, ``use_dora`` and ``target_modules`` mean what they mean in ``LoraConfig``; with ``use_dora`` (the
    original's MixDoRA) every expert has its own DoRA magnitude vector per targeted projection.

    Args (beyond ``LoraConfig``'s):
        num_experts: LoRA experts per FFN.
        top_k: experts each token uses with ``"mixlora"`` (and the k of the load-balancing loss of
            ``"mixlora-dynamic"``); ``"mixlora-switch"`` always routes to one expert.
        routing_strategy: one of :data:`ROUTING_STRATEGIES`.
        top_p: probability mass ``"mixlora-dynamic"`` routes each token to, in (0, 1].
        temperature: ``"mixlora-dynamic"``'s temperature; only 0.0 (off, the original's default) is accepted: the
            original divides the *probabilities* by it, an unverified meaning we do not reproduce.
        expert_capacity: most tokens (of the flattened batch, padding included) each expert takes with
            ``"mixlora-switch"``; later tokens of a full expert get no FFN output and only the residual carries
            them (Switch Transformer's dropping).
        router_z_loss_coef: weight of ST-MoE's router z-loss added next to the load-balancing loss (None: 0.001
            for ``"mixlora-switch"``, else 0).
        router_aux_loss_coef: weight of the load-balancing loss (transformers' Mixtral form) added to the model's
            loss when labels are given. The original's code default is 0.001, its README uses 0.01.
        router_init_range: std of the normal init of the router weight (None: 1.0 for ``"mixlora-switch"``, else
            0.02).
        jitter_noise: multiplies the router input by U(1-j, 1+j) in training only (None: 0.01 for
            ``"mixlora-switch"``, else 0).
        expert_lora: optional ``{"r", "lora_alpha", "lora_dropout"}`` overriding those values for the FFN experts
            (attention LoRA keeps the top-level ones).
        expert_forward: ``"fused"`` (frozen FFN once per token, LoRA deltas per routed pair; the default) or
            ``"naive"`` (each expert runs the whole FFN; a slow reference for tests).
    """

    num_experts: int = field(default=8, metadata={"help": "LoRA experts per FFN."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})
    routing_strategy: str = field(default="mixlora", metadata={"help": f"One of {ROUTING_STRATEGIES}."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    router_init_range: float | None = field(
        default=None, metadata={"help": "Std of the router weight's normal init (None: the strategy's default)."}
    )
    jitter_noise: float | None = field(
        default=None, metadata={"help": "Router input jitter U(1-j, 1+j), training only (None: strategy default)."}
    )
    top_p: float = field(default=0.8, metadata={"help": "Probability mass of mixlora-dynamic, in (0, 1]."})
    temperature: float = field(default=0.0, metadata={"help": "mixlora-dynamic's temperature; only 0.0 (off)."})
    expert_capacity: int = field(default=32, metadata={"help": "Tokens per expert of mixlora-switch."})
    router_z_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the router z-loss (None: the strategy's default)."}
    )
    expert_lora: dict[str, Any] | None = field(
        default=None, metadata={"help": "Overrides of r / lora_alpha / lora_dropout for the FFN experts."}
    )
    expert_forward: str = field(default="fused", metadata={"help": f"One of {EXPERT_FORWARDS}."})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loader, refusing a folder saved by the original ``mixlora`` package: both formats say
        ``peft_type: MIXLORA``, and PEFT would load the original's per-expert keys as "missing" and leave the experts
        randomly initialised with only a warning."""
        from .original_format import is_original_mixlora_adapter

        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if os.path.isdir(folder) and is_original_mixlora_adapter(folder):
            raise ValueError(
                f"{folder} holds an adapter saved by the original `mixlora` package (adapter_model.bin with per-expert "
                "keys), not moe-zoo's format; load it with moe_zoo.peft.load_mixlora_adapter(base_model, path)."
            )
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MIXLORA_PEFT_TYPE
        self._validate_mixlora_fields()

    def _apply_strategy_defaults(self) -> None:
        """Fill the fields left at None from :data:`STRATEGY_DEFAULTS`, so the saved config holds the values used."""
        for name, value in STRATEGY_DEFAULTS[self.routing_strategy].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def experts_per_token(self) -> int:
        """The k of the router and of the load-balancing loss: 1 for ``"mixlora-switch"``, else ``top_k``."""
        return 1 if self.routing_strategy == "mixlora-switch" else self.top_k

    def _validate_mixlora_fields(self) -> None:
        if self.routing_strategy not in ROUTING_STRATEGIES:
            raise ValueError(
                f"`routing_strategy` is {self.routing_strategy!r}, but it must be one of {ROUTING_STRATEGIES}."
            )
        self._apply_strategy_defaults()
        if self.expert_forward not in EXPERT_FORWARDS:
            raise ValueError(f"`expert_forward` is {self.expert_forward!r}, but it must be one of {EXPERT_FORWARDS}.")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"`num_experts` must be a positive integer, got {self.num_experts!r}.")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"`top_k` must be an integer between 1 and `num_experts` ({self.num_experts}), got {self.top_k!r}."
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef}.")
        if self.router_z_loss_coef < 0:
            raise ValueError(f"`router_z_loss_coef` must be >= 0, got {self.router_z_loss_coef}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.temperature != 0.0:
            raise ValueError(
                f"`temperature` is {self.temperature}, but only 0.0 (no temperature) is supported: the original "
                "divides the routing probabilities by it, which moe-zoo does not reproduce; leave it at 0.0."
            )
        if isinstance(self.expert_capacity, bool) or not isinstance(self.expert_capacity, int):
            raise ValueError(f"`expert_capacity` must be an integer >= 1, got {self.expert_capacity!r}.")
        if self.expert_capacity < 1:
            raise ValueError(f"`expert_capacity` must be an integer >= 1, got {self.expert_capacity!r}.")
        if self.router_init_range <= 0:
            raise ValueError(f"`router_init_range` must be > 0, got {self.router_init_range}.")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"`jitter_noise` must be in [0, 1), got {self.jitter_noise}.")
        if self.expert_lora is not None:
            unknown = sorted(set(self.expert_lora) - set(EXPERT_LORA_KEYS))
            if unknown:
                raise ValueError(f"`expert_lora` has unknown keys {unknown}; allowed keys are {EXPERT_LORA_KEYS}.")
            if int(self.expert_lora.get("r", self.r)) < 1:
                raise ValueError(f"`expert_lora['r']` must be a positive integer, got {self.expert_lora['r']!r}.")

    @property
    def expert_r(self) -> int:
        return int((self.expert_lora or {}).get("r", self.r))

    @property
    def expert_alpha(self) -> float:
        return float((self.expert_lora or {}).get("lora_alpha", self.lora_alpha))

    @property
    def expert_dropout(self) -> float:
        return float((self.expert_lora or {}).get("lora_dropout", self.lora_dropout))

    @property
    def expert_scaling(self) -> float:
        """LoRA scaling of the experts: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
        denominator = self.expert_r**0.5 if self.use_rslora else self.expert_r
        return self.expert_alpha / denominator
