"""Quantized expert banks: 4-bit (NF4 / FP4) and 8-bit experts, stored per expert and dequantized one expert at a time.

Why this exists: transformers' bitsandbytes integration converts ``nn.Linear`` layers only, and an MoE keeps most of
its weights in the 3D expert tensors (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``), which it leaves in full
precision. :class:`QuantizedExperts` replaces such a bank:

- every expert's 2D slice of every projection is quantized on its own with ``bitsandbytes.functional``
  (``quantize_4bit``: NF4 / FP4, blocksize 64, optional double quantization of the absmax; ``int8_vectorwise_quant``:
  int8 per output row), so an expert's quantization statistics never mix with another expert's;
- the packed data and quantization statistics are plain persistent buffers stacked over experts
  (``gate_up_proj.packed (E, n)``, ``gate_up_proj.absmax (E, blocks)``, ...), so ``state_dict``, ``save_pretrained``
  and ``get_memory_footprint`` see exactly the packed sizes, and moving the model moves them;
- the forward loops over the experts that got tokens (:func:`~moe_zoo.core.experts.group_by_expert`), dequantizes that
  one expert's weights with bitsandbytes, runs its matmuls and drops them: no dequantized copy of the bank is ever
  held, in training neither (:class:`DequantizedLinear` dequantizes again in backward instead of saving the weight);
- biases (Phi's ``up_proj_bias`` / ``down_proj_bias``) stay full-precision parameters.

Quantized experts are frozen (their buffers carry no gradient); the input and the routing weights still get theirs,
so routers, norms and LoRA adapters train on top (QLoRA). :meth:`QuantizedProjection.add_lora` gives every expert its
own LoRA factors on a projection (MoE-tuning's QLoRA mode, :mod:`moe_zoo.training.qlora`), which train while the
packed weights stay as they are, and :meth:`QuantizedExperts.to_full_precision` merges them onto the dequantized
weights.

bitsandbytes is imported lazily (:func:`require_bitsandbytes`): importing moe_zoo never needs it, and asking for
quantized experts without it raises an ``ImportError`` that names the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .experts import GatedExpertsBase, PlainExpertsBase, run_each_expert

CONFIG_FIELD = "quantized_experts"
"""The config attribute (a dict of :class:`ExpertQuantization` fields) that marks a saved model's expert banks as
quantized, so that ``from_pretrained`` builds :class:`QuantizedExperts` before loading the packed weights."""

BLOCKSIZE_4BIT = 64
"""bitsandbytes' default 4-bit blocksize, the one ``Linear4bit`` uses."""


def require_bitsandbytes() -> ModuleType:
    """``bitsandbytes.functional``, or an ``ImportError`` naming the missing package and how to install it."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ImportError(
            "Quantized (4-bit / 8-bit) experts need the `bitsandbytes` package, which is not installed: "
            "`pip install bitsandbytes`."
        ) from error
    return importlib.import_module("bitsandbytes.functional")


@dataclass(frozen=True)
class ExpertQuantization:
    """How expert weights are stored: ``bits`` 4 (``quant_type`` ``"nf4"`` / ``"fp4"``) or 8 (``"int8"``)."""

    bits: int
    quant_type: str
    compute_dtype: str = "float32"
    double_quant: bool = False
    blocksize: int = BLOCKSIZE_4BIT

    def __post_init__(self) -> None:
        allowed = {4: ("nf4", "fp4"), 8: ("int8",)}
        if self.bits not in allowed or self.quant_type not in allowed[self.bits]:
            raise ValueError(
                f"ExpertQuantization(bits={self.bits}, quant_type={self.quant_type!r}): allowed are bits=4 with "
                "quant_type 'nf4' or 'fp4', and bits=8 with quant_type 'int8'."
            )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype expert weights are dequantized to and their matmuls run in."""
        return getattr(torch, self.compute_dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_quantization_config(cls, quantization_config: Any) -> ExpertQuantization | None:
        """The expert quantization a transformers ``BitsAndBytesConfig`` (object or dict) asks for; None for any other
        quantization method (whose quantizer then handles the model alone) or a config that quantizes nothing."""
        if quantization_config is None:
            return None
        get = (
            quantization_config.get
            if isinstance(quantization_config, dict)
            else lambda key, default=None: getattr(quantization_config, key, default)
        )
        method = get("quant_method", "bitsandbytes")
        if str(getattr(method, "value", method)) != "bitsandbytes":
            return None
        if get("load_in_4bit", False):
            compute = get("bnb_4bit_compute_dtype", None) or torch.float32
            compute = compute if isinstance(compute, str) else str(compute).removeprefix("torch.")
            return cls(
                bits=4,
                quant_type=get("bnb_4bit_quant_type", "nf4"),
                compute_dtype=compute,
                double_quant=bool(get("bnb_4bit_use_double_quant", False)),
            )
        if get("load_in_8bit", False):
            return cls(bits=8, quant_type="int8")
        return None


class QuantizedProjection(nn.Module):
    """One projection of an expert bank, ``(E, out, in)`` in full precision, stored quantized per expert.

    Buffers, 4-bit: ``packed (E, n)`` uint8 (two 4-bit codes a byte), ``absmax (E, blocks)`` (uint8 codes with double
    quantization, else float32), ``code (16,)`` the NF4 / FP4 values; with double quantization also
    ``nested_absmax (E, nested_blocks)``, ``nested_offset (E,)`` and ``nested_code (256,)``. 8-bit: ``int8 (E, out,
    in)`` and ``scale (E, out)``, the absmax of each output row.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, spec: ExpertQuantization):
        super().__init__()
        self.spec = spec
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        if spec.bits == 8:
            self.register_buffer("int8", torch.empty(num_experts, out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(num_experts, out_features, dtype=torch.float32))
            return
        numel = out_features * in_features
        blocks = -(-numel // spec.blocksize)
        self.register_buffer("packed", torch.empty(num_experts, -(-numel // 2), dtype=torch.uint8))
        absmax_dtype = torch.uint8 if spec.double_quant else torch.float32
        self.register_buffer("absmax", torch.empty(num_experts, blocks, dtype=absmax_dtype))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32))
        if spec.double_quant:
            self.nested_blocksize = 256  # what bitsandbytes' quantize_4bit(compress_statistics=True) uses
            nested_blocks = -(-blocks // self.nested_blocksize)
            self.register_buffer("nested_absmax", torch.empty(num_experts, nested_blocks, dtype=torch.float32))
            self.register_buffer("nested_offset", torch.empty(num_experts, dtype=torch.float32))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32))

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Fill the buffers from the full-precision ``weight (E, out, in)``, one expert at a time."""
        functional = require_bitsandbytes()
        expected = (self.num_experts, self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"expected an expert weight of shape {expected}, got {tuple(weight.shape)}")
        for expert in range(self.num_experts):
            matrix = weight[expert].detach().to(torch.float32).contiguous()
            if self.spec.bits == 8:
                codes, row_absmax, _ = functional.int8_vectorwise_quant(matrix)
                self.int8[expert].copy_(codes)
                self.scale[expert].copy_(row_absmax)
                continue
            packed, state = functional.quantize_4bit(
                matrix,
                blocksize=self.spec.blocksize,
                compress_statistics=self.spec.double_quant,
                quant_type=self.spec.quant_type,
                quant_storage=torch.uint8,
            )
            self.packed[expert].copy_(packed.reshape(-1))
            self.absmax[expert].copy_(state.absmax)
            self.code.copy_(state.code)
            if self.spec.double_quant:
                self.nested_absmax[expert].copy_(state.state2.absmax)
                self.nested_offset[expert].copy_(state.offset)
                self.nested_code.copy_(state.state2.code)

    def dequantize(self, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``expert``'s ``(out, in)`` weight in ``dtype`` (the compute dtype by default), by bitsandbytes."""
        functional = require_bitsandbytes()
        dtype = dtype or self.spec.dtype
        if self.spec.bits == 8:
            return functional.int8_vectorwise_dequant(self.int8[expert], self.scale[expert].float()).to(dtype)
        nested = None
        offset = None
        if self.spec.double_quant:
            nested = functional.QuantState(
                absmax=self.nested_absmax[expert].float(),
                code=self.nested_code.float(),
                blocksize=self.nested_blocksize,
                dtype=torch.float32,
            )
            offset = self.nested_offset[expert].float()
        state = functional.QuantState(
            absmax=self.absmax[expert] if self.spec.double_quant else self.absmax[expert].float(),
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code.float(),
            blocksize=self.spec.blocksize,
            quant_type=self.spec.quant_type,
            dtype=dtype,
            offset=offset,
            state2=nested,
        )
        return functional.dequantize_4bit(self.packed[expert].reshape(-1, 1), state)

    def add_lora(self, rank: int, alpha: float) -> None:
        """Give every expert its own LoRA pair (QLoRA on the bank): ``lora_A (E, rank, in)`` (Kaiming-uniform, as
        PEFT initialises ``lora_A``) and ``lora_B (E, out, rank)`` zero, scaled by ``alpha / rank``; expert ``e``
        then computes ``x @ (W_e + s * B_e A_e).T`` with ``W_e`` dequantized. Only the two factors train."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        if self.lora_rank:
            raise ValueError("This quantized projection already has LoRA factors.")
        device = next(iter(self.buffers())).device
        lora_a = torch.empty(self.num_experts, rank, self.in_features, device=device)
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(lora_a[expert], a=5**0.5)
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, self.out_features, rank, device=device))
        self.lora_scaling = alpha / rank

    @property
    def lora_rank(self) -> int:
        """The rank of the per-expert LoRA factors, 0 without them."""
        lora_a = getattr(self, "lora_A", None)
        return 0 if lora_a is None else lora_a.shape[1]

    def lora_delta(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``expert``'s ``(out, in)`` LoRA update ``s * B_e A_e`` (what merging adds to its weight)."""
        return (self.lora_scaling * self.lora_B[expert] @ self.lora_A[expert]).to(dtype)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_e.T`` (plus the LoRA path ``s * (x @ A_e.T) @ B_e.T`` when the projection has LoRA factors),
        the frozen weight dequantized and never saved for backward."""
        out = dequantized_linear(x, lambda: self.dequantize(expert))
        if not self.lora_rank:
            return out
        lora_a, lora_b = self.lora_A[expert].to(x.dtype), self.lora_B[expert].to(x.dtype)
        return out + self.lora_scaling * ((x @ lora_a.t()) @ lora_b.t())

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return (
            f"num_experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
            f"quant_type={self.spec.quant_type}, double_quant={self.spec.double_quant}{lora}"
        )


class DequantizedLinear(torch.autograd.Function):
    """``x @ W.T`` with ``W = dequantize()`` dequantized in forward and again in backward, never saved: a frozen,
    quantized weight costs no full-precision memory between forward and backward. Only ``x`` gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantize: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.dequantize = dequantize
        return x @ dequantize().to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.dequantize().to(grad_out.dtype), None


def dequantized_linear(x: torch.Tensor, dequantize: Callable[[], torch.Tensor]) -> torch.Tensor:
    """:class:`DequantizedLinear` when a gradient must reach ``x``, a plain product otherwise."""
    if torch.is_grad_enabled() and x.requires_grad:
        return DequantizedLinear.apply(x, dequantize)
    return x @ dequantize().to(x.dtype).t()


class QuantizedExperts(nn.Module):
    """A quantized drop-in for :class:`~moe_zoo.core.experts.GatedExpertsBase` / ``PlainExpertsBase``:
    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``, the same function as the
    bank it replaces with each expert's weights dequantized. Indices ``>= num_experts`` (empty slots) are skipped.

    Gated banks keep ``gate_up_proj`` (``[gate; up]``, ``(E, 2I, H)``) and ``down_proj`` (``(E, H, I)``) as
    :class:`QuantizedProjection` s; plain banks ``up_proj`` and ``down_proj`` plus their full-precision biases.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: nn.Module,
        gated: bool,
        spec: ExpertQuantization,
    ):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        self.act_fn, self.has_gate, self.spec = act_fn, gated, spec
        self.up_name = "gate_up_proj" if gated else "up_proj"
        up_rows = 2 * intermediate_size if gated else intermediate_size
        setattr(self, self.up_name, QuantizedProjection(num_experts, up_rows, hidden_size, spec))
        self.down_proj = QuantizedProjection(num_experts, hidden_size, intermediate_size, spec)
        self.source: tuple[type[nn.Module], Any] | None = None  # the full-precision bank class and its config
        self.up_proj_bias = self.down_proj_bias = None
        if not gated:
            self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size), requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)

    @classmethod
    def like(cls, bank: nn.Module, spec: ExpertQuantization) -> QuantizedExperts:
        """An empty quantized bank of ``bank``'s sizes (built on the current default device, e.g. meta)."""
        quantized = cls(
            bank.num_experts,
            bank.hidden_dim,
            bank.intermediate_dim,
            bank.act_fn,
            isinstance(bank, GatedExpertsBase),
            spec,
        )
        quantized.source = (type(bank), getattr(bank, "config", None))
        return quantized

    def to_full_precision(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The full-precision bank this one was made from (its own class and config), with the dequantized weights;
        projections with LoRA factors get them merged in (``W_e + s * B_e A_e``, onto the dequantized ``W_e``)."""
        if self.source is None:
            raise ValueError(
                "This QuantizedExperts was not made from a full-precision bank; build it with from_bank()."
            )
        bank_class, config = self.source
        with torch.device("meta"):
            bank = bank_class(config, self.num_experts, self.hidden_dim, self.intermediate_dim, "silu")
        bank.act_fn = self.act_fn
        for name, projection in self.projections():
            with torch.no_grad():
                experts = [projection.dequantize(e, torch.float32) for e in range(self.num_experts)]
                if projection.lora_rank:
                    experts = [weight + projection.lora_delta(e) for e, weight in enumerate(experts)]
            setattr(bank, name, nn.Parameter(torch.stack(experts).to(dtype)))
        for name in ("up_proj_bias", "down_proj_bias"):
            if getattr(self, name) is not None:
                setattr(bank, name, nn.Parameter(getattr(self, name).detach().to(dtype)))
        return bank

    @classmethod
    def from_bank(cls, bank: nn.Module, spec: ExpertQuantization) -> QuantizedExperts:
        """Quantize a loaded full-precision bank, one projection and one expert at a time, on its device."""
        up_weight = bank.gate_up_proj if isinstance(bank, GatedExpertsBase) else bank.up_proj
        with torch.device(up_weight.device):
            quantized = cls.like(bank, spec)
        getattr(quantized, quantized.up_name).quantize_(up_weight)
        quantized.down_proj.quantize_(bank.down_proj)
        if not quantized.has_gate:
            with torch.no_grad():
                quantized.up_proj_bias.copy_(bank.up_proj_bias)
                quantized.down_proj_bias.copy_(bank.down_proj_bias)
        return quantized

    def projections(self) -> Iterator[tuple[str, QuantizedProjection]]:
        yield self.up_name, getattr(self, self.up_name)
        yield "down_proj", self.down_proj

    def _project(self, name: str, expert: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        projection: QuantizedProjection = getattr(self, name)
        out = projection.forward_expert(expert, x)
        return out if bias is None else out + bias[expert].to(out.dtype)

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` on its tokens, in the compute dtype."""
        x = hidden_states.to(self.spec.dtype)
        pre = self._project(self.up_name, expert, x, self.up_proj_bias)
        if self.has_gate:
            gate, up = pre.chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up
        else:
            hidden = self.act_fn(pre)
        return self._project("down_proj", expert, hidden, self.down_proj_bias)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return run_each_expert(self.expert_forward, self.num_experts, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.spec.bits}, quant_type={self.spec.quant_type}"


FULL_PRECISION_BANKS = (GatedExpertsBase, PlainExpertsBase)


def _replace_banks(
    model: nn.Module,
    build: Callable[[nn.Module], nn.Module],
    keep: Callable[[str], bool] | None = None,
    types: tuple[type[nn.Module], ...] = FULL_PRECISION_BANKS,
) -> list[str]:
    """Replace every expert bank of ``types`` under ``model`` with ``build(bank)``, one bank at a time (the old one
    is freed as soon as it is replaced); returns the banks' names. Banks for which ``keep(name)`` is true stay."""
    names = []
    for name, bank in list(model.named_modules()):
        if not isinstance(bank, types) or (keep is not None and keep(name)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(bank))
        names.append(name)
    return names


def quantize_experts(
    model: nn.Module, spec: ExpertQuantization, keep: Callable[[str], bool] | None = None
) -> list[str]:
    """Quantize every loaded full-precision expert bank under ``model`` in place. Returns the quantized banks' names."""
    require_bitsandbytes()
    return _replace_banks(model, lambda bank: QuantizedExperts.from_bank(bank, spec), keep)


def install_empty_quantized_experts(model: nn.Module, spec: ExpertQuantization) -> list[str]:
    """Replace every expert bank under ``model`` with an empty :class:`QuantizedExperts` of its sizes, for a
    pre-quantized checkpoint to load into (on the meta device inside ``from_pretrained``)."""
    require_bitsandbytes()
    return _replace_banks(model, lambda bank: QuantizedExperts.like(bank, spec))


def dequantize_experts(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every :class:`QuantizedExperts` under ``model`` by its full-precision bank (one bank at a time)."""
    return _replace_banks(model, lambda bank: bank.to_full_precision(dtype), types=(QuantizedExperts,))


def has_quantized_experts(model: nn.Module) -> bool:
    """Whether any expert bank under ``model`` is a :class:`QuantizedExperts`."""
    return any(isinstance(module, QuantizedExperts) for module in model.modules())


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (its ``weight`` packed, not a matrix)."""
    return type(getattr(module, "weight", None)).__name__ in {"Params4bit", "Int8Params"}


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear``, dequantized by bitsandbytes for a quantized one (a transient
    full-precision copy: only for what needs the matrix itself, such as DoRA's weight norm)."""
    if not is_quantized_linear(linear):
        return linear.weight
    functional = require_bitsandbytes()
    weight = linear.weight
    if type(weight).__name__ == "Int8Params":
        # the row scales live on the weight until the first forward, which moves them to the layer's matmul state
        scales = weight.SCB if weight.SCB is not None else getattr(getattr(linear, "state", None), "SCB", None)
        if scales is None:
            raise ValueError("This Linear8bitLt has no row scales (SCB) to dequantize its weight with.")
        return functional.int8_vectorwise_dequant(weight.data, scales).to(torch.float32)
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "This Linear4bit's weight was repacked for bitsandbytes' CPU inference kernel (an eval forward without "
            "gradients ran on it) and can no longer be dequantized; reload the model before wrapping it."
        )
    return functional.dequantize_4bit(weight.data, weight.quant_state)


def frozen_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for a frozen ``nn.Linear`` without its bias; for a bitsandbytes layer through its own 4-bit
    matmul (which dequantizes again in backward) or :class:`DequantizedLinear` for 8-bit, so no full-precision copy
    of the weight is kept for backward."""
    if not is_quantized_linear(linear):
        return nn.functional.linear(x, linear.weight)
    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        bnb = importlib.import_module("bitsandbytes")
        dtype = getattr(linear, "compute_dtype", None) or x.dtype
        return bnb.matmul_4bit(x.to(dtype), weight.t(), bias=None, quant_state=weight.quant_state).to(x.dtype)
    return dequantized_linear(x, lambda: dense_weight(linear))


def quantized_tensor_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s quantized tensors, which cannot train: the packed weights of bitsandbytes layers and
    the buffers of :class:`QuantizedProjection` s (their biases are ordinary parameters and may train)."""
    names = [name for name, param in model.named_parameters() if not param.is_floating_point()]
    for prefix, module in model.named_modules():
        if isinstance(module, QuantizedProjection):
            names.extend(f"{prefix}.{name}" for name, _ in module.named_buffers())
    return names
