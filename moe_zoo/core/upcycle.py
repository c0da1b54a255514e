"""Sparse upcycling, the model-agnostic part: find a dense decoder's FFNs and copy one into every expert.

Every expert starts as an exact copy of the dense FFN and the router is fresh, so with renormalised top-k weights
(which sum to 1) the MoE block computes ``sum_e w_e * FFN(x) = FFN(x)``: the upcycled model computes the same
function as the dense one until training moves the experts apart (Komatsuzaki et al., "Sparse Upcycling").

Supported FFN layouts, found by their submodule names:
  - gated, separate projections: ``gate_proj`` / ``up_proj`` / ``down_proj`` without biases (Llama, Mistral,
    Qwen2, Qwen3, StableLM, Gemma, ...);
  - gated, fused: ``gate_up_proj`` (``[gate; up]``) / ``down_proj`` (Phi-3);
  - plain: ``fc1`` / ``fc2`` (biases optional; Phi, Phi-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_FFN_LAYOUTS = (
    "gate_proj/up_proj/down_proj without biases",
    "gate_up_proj/down_proj (Phi-3)",
    "fc1/fc2 (Phi)",
)


@dataclass(frozen=True)
class FfnLayout:
    """What an expert bank needs to know about a dense FFN: gated or plain, and its sizes."""

    gated: bool
    hidden_size: int
    intermediate_size: int


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def ffn_layout(mlp: nn.Module, where: str = "the FFN") -> FfnLayout:
    """Recognise ``mlp``'s layout, or raise ``ValueError`` naming the supported ones."""
    down = _linear(mlp, "down_proj")
    if down is not None and _linear(mlp, "gate_proj") is not None and _linear(mlp, "up_proj") is not None:
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(
                f"{where} ({type(mlp).__name__}) is a gated FFN with biases, which gated experts cannot hold; "
                f"supported FFN layouts: {SUPPORTED_FFN_LAYOUTS}."
            )
        return FfnLayout(True, down.out_features, down.in_features)
    if down is not None and _linear(mlp, "gate_up_proj") is not None and mlp.gate_up_proj.bias is None:
        return FfnLayout(True, down.out_features, down.in_features)
    fc1, fc2 = _linear(mlp, "fc1"), _linear(mlp, "fc2")
    if fc1 is not None and fc2 is not None:
        return FfnLayout(False, fc2.out_features, fc2.in_features)
    raise ValueError(
        f"Cannot find the FFN in {where} ({type(mlp).__name__} with children "
        f"{[name for name, _ in mlp.named_children()]}); supported FFN layouts: {SUPPORTED_FFN_LAYOUTS}."
    )


def find_decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers: the first one with ``num_layers`` entries that all have an ``mlp``."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: no ModuleList of {num_layers} layers with an "
        "`mlp` attribute. Upcycling supports decoder models whose layers keep their FFN in `layer.mlp`."
    )


def dense_expert_weights(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """The dense FFN's weights in one expert's slice of the 3D layout (names as in the expert bank)."""
    if _linear(mlp, "gate_proj") is not None:
        return {
            "gate_up_proj": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0),
            "down_proj": mlp.down_proj.weight,
        }
    if _linear(mlp, "gate_up_proj") is not None:
        return {"gate_up_proj": mlp.gate_up_proj.weight, "down_proj": mlp.down_proj.weight}
    weights = {"up_proj": mlp.fc1.weight, "down_proj": mlp.fc2.weight}
    weights["up_proj_bias"] = mlp.fc1.bias if mlp.fc1.bias is not None else torch.zeros_like(mlp.fc1.weight[:, 0])
    weights["down_proj_bias"] = mlp.fc2.bias if mlp.fc2.bias is not None else torch.zeros_like(mlp.fc2.weight[:, 0])
    return weights


@torch.no_grad()
def copy_ffn_into_experts(mlp: nn.Module, experts: nn.Module) -> None:
    """Make every expert of ``experts`` an exact copy of the dense ``mlp``."""
    for name, weight in dense_expert_weights(mlp).items():
        target = getattr(experts, name)
        target.copy_(weight.detach().to(target.dtype).unsqueeze(0).expand_as(target))


@torch.no_grad()
def copy_ffn_into_shared_expert(mlp: nn.Module, shared: nn.Module) -> None:
    """Copy the dense FFN into an always-on shared expert of the same size (gated or plain)."""
    source = dense_expert_weights(mlp)
    if hasattr(shared, "gate_proj"):
        gate, up = source["gate_up_proj"].chunk(2, dim=0)
        shared.gate_proj.weight.copy_(gate)
        shared.up_proj.weight.copy_(up)
        shared.down_proj.weight.copy_(source["down_proj"])
    else:
        shared.fc1.weight.copy_(source["up_proj"])
        shared.fc1.bias.copy_(source["up_proj_bias"])
        shared.fc2.weight.copy_(source["down_proj"])
        shared.fc2.bias.copy_(source["down_proj_bias"])
