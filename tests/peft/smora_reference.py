"""A one-Linear SMoRA model and a dense reference of the official code's per-rank rule, for the SMoRA tests."""

from __future__ import annotations

import torch
from peft import get_peft_model
from peft_test_models import smora_layers
from torch import nn

from moe_zoo.peft import SmoraConfig, SmoraLinear

IN, OUT = 16, 24


class OneLinear(nn.Module):
    """A model that is one biased Linear, so a SMoRA layer can be checked on its own."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_layer_model(seed: int = 0, **overrides) -> tuple[nn.Module, SmoraLinear]:
    """A float64 SMoRA model on :class:`OneLinear` with random A, B, router weights and selection bias."""
    torch.manual_seed(seed)
    values = dict(r=8, activate_r=4, lora_alpha=6, target_modules=["proj"])
    values.update(overrides)
    model = get_peft_model(OneLinear(), SmoraConfig(**values)).double()
    layer = smora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.5)
        router = layer.lora_router["default"]
        router.weight.normal_(0.0, 1.0)
        router.selection_bias.normal_(0.0, 0.1)
    return model, layer


def dense_reference(layer: SmoraLinear, x: torch.Tensor, original: bool = False) -> torch.Tensor:
    """The official code's per-rank rule, computed densely: sigmoid scores repeated over each expert's ranks, top
    ``activate_r`` ranks of scores + bias, gate = chosen values / their sum * activate_r (values without the bias,
    or with it when ``original``), and every rank's full contribution ``(A x)_i B[:, i]`` built as ``N x out x r``."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    router = layer.lora_router["default"]
    partition, active = layer.rank_partition["default"], layer.activate_r["default"]
    tokens = x.reshape(-1, IN)
    scores = torch.sigmoid(tokens @ router.weight.t()).repeat_interleave(partition, dim=-1)
    biased = scores + router.selection_bias.repeat_interleave(partition)
    top, chosen = biased.topk(active, dim=-1)
    values = top if original else scores.gather(-1, chosen)
    gate = torch.zeros_like(scores).scatter(-1, chosen, values) / values.sum(-1, keepdim=True) * active
    per_rank = (tokens @ a.t()).unsqueeze(1) * b.unsqueeze(0)  # (N, out, r)
    delta = (per_rank * gate.unsqueeze(1)).sum(-1) * layer.scaling["default"]
    return (layer.base_layer(tokens) + delta).reshape(*x.shape[:-1], OUT)
