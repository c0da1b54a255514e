"""``SmoraConfig``: a ``LoraConfig`` with the fields of SMoRA ("Each Rank Could be an Expert: Single-Ranked Mixture of
Experts LoRA for Multi-task Learning", KDD 2026, arXiv 2501.15103; official code StyxXuan/smora, tuner ``srmole``).

It subclasses PEFT's ``LoraConfig`` so that ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``rank_pattern`` and the other LoRA options mean what LoRA users expect; only ``peft_type`` changes, to ``"SMORA"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from peft import LoraConfig

SMORA_PEFT_TYPE = "SMORA"
"""The PEFT type string written to ``adapter_config.json``."""

BIAS_BALANCING_MODES = ("per_step", "original")
"""Accepted ``bias_balancing`` values:

- ``"per_step"`` (default): DeepSeek's aux-loss-free balancing as the core implements it. The loads of every
  training forward are accumulated and the bias moves once per optimizer step, when
  :func:`moe_zoo.core.update_selection_biases` runs (the Trainer's
  :class:`~moe_zoo.training.SelectionBiasCallback` calls it), so gradient accumulation sees one update per step from
  the loads of all its micro-batches; the bias only chooses ranks, the gate values come from the unbiased scores.
- ``"original"``: the official code's rule. The bias moves after every training forward from that forward's loads
  alone, and the gate values are normalised from the *biased* scores.
"""

SUPPORTED_INIT_LORA_WEIGHTS = (True, False, "gaussian")
"""``init_lora_weights`` values SMoRA accepts. The others (PiSSA, OLoRA, LoftQ, CorDA, EVA, orthogonal, ...) either
subtract the initial ``B A`` from the base weight, which the gated, differently scaled SMoRA output would not add
back, or assume every rank is active."""


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"`{name}` is {value!r}, but it must be {allowed}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rank_layout(r: object, activate_r: object, rank_partition: object, r_name: str = "r") -> None:
    """Raise a ``ValueError`` naming the field unless ``1 <= activate_r <= r`` and ``rank_partition`` divides both.

    ``r_name`` names where ``r`` came from (``"r"``, or a ``rank_pattern`` entry for a layer whose rank differs).
    """
    if not _is_int(r) or r < 1:
        _fail(r_name, r, "a positive integer (the number of rank-one experts)")
    if not _is_int(activate_r) or not 1 <= activate_r <= r:
        _fail("activate_r", activate_r, f"an integer in [1, {r_name}={r}] (the ranks each token uses)")
    if not _is_int(rank_partition) or rank_partition < 1:
        _fail("rank_partition", rank_partition, "a positive integer (ranks per expert)")
    if r % rank_partition or activate_r % rank_partition:
        _fail(
            "rank_partition",
            rank_partition,
            f"a divisor of both {r_name}={r} and activate_r={activate_r}, so that whole experts of rank_partition "
            "ranks are chosen",
        )


@dataclass
class SmoraConfig(LoraConfig):
    """Configuration of a SMoRA adapter: every targeted ``nn.Linear`` gets ``r`` rank-one LoRA experts, of which a
    sigmoid router picks ``activate_r`` per token.

    Args (beyond ``LoraConfig``'s):
        activate_r: ranks each token uses (the original's default is 8); ``1 <= activate_r <= r``.
        rank_partition: ranks per expert; the router has ``r // rank_partition`` outputs and each token takes
            ``activate_r // rank_partition`` experts. It must divide ``r`` and ``activate_r`` (default 1: every rank is
            an expert).
        bias_update_rate: ``u`` of the aux-loss-free selection bias, ``b += u * sign(mean_load - load)`` (the
            original's default, 1e-5); 0 switches balancing off.
        bias_balancing: one of :data:`BIAS_BALANCING_MODES`.

    ``lora_alpha`` and ``use_rslora`` set the scaling as in the original: ``lora_alpha / activate_r``, or
    ``lora_alpha / sqrt(activate_r)`` with ``use_rslora`` (rsLoRA's rule applied to the rank a token actually uses).
    With ``activate_r == r`` both equal LoRA's scaling.
    """

    activate_r: int = field(default=8, metadata={"help": "Ranks (rank-one experts) each token uses."})
    rank_partition: int = field(default=1, metadata={"help": "Ranks per expert; must divide r and activate_r."})
    bias_update_rate: float = field(
        default=1e-5, metadata={"help": "Step u of the aux-loss-free selection bias; 0 turns balancing off."}
    )
    bias_balancing: str = field(default="per_step", metadata={"help": f"One of {BIAS_BALANCING_MODES}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SMORA_PEFT_TYPE
        self._validate_smora_fields()

    @property
    def num_rank_experts(self) -> int:
        """Router outputs: ``r // rank_partition``."""
        return self.r // self.rank_partition

    def _validate_smora_fields(self) -> None:
        check_rank_layout(self.r, self.activate_r, self.rank_partition)
        for name, r in (self.rank_pattern or {}).items():
            check_rank_layout(r, self.activate_r, self.rank_partition, r_name=f"rank_pattern[{name!r}]")
        if isinstance(self.bias_update_rate, bool) or not isinstance(self.bias_update_rate, (int, float)):
            _fail("bias_update_rate", self.bias_update_rate, "a number >= 0")
        if self.bias_update_rate < 0:
            _fail("bias_update_rate", self.bias_update_rate, "a number >= 0")
        if self.bias_balancing not in BIAS_BALANCING_MODES:
            _fail("bias_balancing", self.bias_balancing, f"one of {BIAS_BALANCING_MODES}")
        if self.init_lora_weights not in SUPPORTED_INIT_LORA_WEIGHTS:
            _fail("init_lora_weights", self.init_lora_weights, f"one of {SUPPORTED_INIT_LORA_WEIGHTS} for SMoRA")
        # LoRA variants (DoRA, aLoRA, Arrow, ...) are flagged in LoraConfig's field metadata; none has a gated form.
        for f in dataclasses.fields(LoraConfig):
            if f.metadata.get("is_lora_variant") and getattr(self, f.name):
                _fail(f.name, getattr(self, f.name), "left at its default: SMoRA has no form of this LoRA variant")
        if self.lora_bias:
            _fail("lora_bias", self.lora_bias, "False: SMoRA's B has no bias")
        if self.fan_in_fan_out:
            _fail("fan_in_fan_out", self.fan_in_fan_out, "False: SMoRA adapts torch.nn.Linear layers only")
        if self.target_parameters:
            _fail("target_parameters", self.target_parameters, "None: SMoRA adapts torch.nn.Linear modules only")
        if self.use_qalora:
            _fail("use_qalora", self.use_qalora, "False for SMoRA")
        if self.megatron_config:
            _fail("megatron_config", self.megatron_config, "None for SMoRA")
