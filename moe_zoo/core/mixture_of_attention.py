"""Soft Mixture-of-Attention (BAM, Zhang et al. 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling
for Mixture of Experts"): ``N`` attention experts, all active, mixed per token by a softmax router.

``MoA(x) = sum_n w_n(x) * Attn_n(x)`` with ``w = softmax(router(x))``. The ``N`` experts run as **one** attention of
the backbone's own class with ``N`` times the query heads, so the backbone's attention code (RoPE, caches, sdpa /
flash-attention through transformers' attention interface) is used unchanged:

- separate key-value experts: ``N * h_kv`` key-value heads, expert ``n``'s heads side by side; the cache holds
  every expert's keys and values;
- shared key-value experts (BAM's second variant): one set of ``h_kv`` key-value heads for all experts, and the
  query heads ordered so that grouped-query attention gives each expert's query heads their own key-value head.

Only the output projection is replaced (:class:`ExpertOutputMixer`): it applies each expert's output projection to
its heads and sums them with the routing weights, ``sum_n w_n (O_n a_n + b_n)``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .upcycle import find_decoder_layers

OUTPUT_PROJECTIONS = ("o_proj", "dense")
"""Names of the output projection in transformers' attention classes (Llama/Qwen2/Mistral, Phi)."""
PER_HEAD_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def attention_head_order(num_experts: int, num_heads: int, num_kv_heads: int, share_kv: bool) -> torch.Tensor:
    """``order[n * h + j]``: the head of the joint attention that holds expert ``n``'s query head ``j``.

    Separate key-value heads: expert-major (``n * h + j``), which grouped-query attention already maps onto expert
    ``n``'s key-value heads. Shared ones: key-value-group-major (group ``g``, then expert, then the group's heads), so
    that ``head // (N * h / h_kv)`` is the shared key-value head ``g`` each query head used in its own model."""
    # On the CPU explicitly: models are built under ``torch.device("meta")`` too, and this order is never loaded.
    experts = torch.arange(num_experts, device="cpu")[:, None]
    heads = torch.arange(num_heads, device="cpu")[None, :]
    if not share_kv:
        return (experts * num_heads + heads).reshape(-1)
    per_group = num_heads // num_kv_heads
    group, within = heads // per_group, heads % per_group
    return (group * num_experts * per_group + experts * per_group + within).reshape(-1)


class ExpertOutputMixer(nn.Module):
    """The joint attention's output projection: each expert's own projection of its heads, summed with the
    routing weights set in :attr:`mixing` ``(..., N)`` by :class:`SoftMixtureOfAttention` for the call."""

    def __init__(self, num_experts: int, head_order: torch.Tensor, head_dim: int, hidden_size: int, bias: bool):
        super().__init__()
        self.num_experts, self.head_dim = num_experts, head_dim
        expert_width = head_order.numel() // num_experts * head_dim
        # Initialised here (transformers' _init_weights knows nothing of this module); loaded or filled afterwards.
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size, expert_width) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        # A plain attribute, not a buffer: nothing to save, and no meta-device or ``to_empty`` copy to go stale.
        self.head_order = head_order.clone()
        self.mixing: torch.Tensor | None = None

    def forward(self, attention_output: torch.Tensor) -> torch.Tensor:
        if self.mixing is None:
            raise RuntimeError("ExpertOutputMixer ran outside SoftMixtureOfAttention.forward (no routing weights).")
        if self.head_order.device != attention_output.device:  # moved once, not on every forward
            self.head_order = self.head_order.to(attention_output.device)
        heads = attention_output.unflatten(-1, (-1, self.head_dim)).index_select(-2, self.head_order)
        per_expert = heads.flatten(-2).unflatten(-1, (self.num_experts, -1))  # (..., N, h * d), expert-major
        outputs = torch.einsum("...nk,nhk->...nh", per_expert, self.weight)
        if self.bias is not None:
            outputs = outputs + self.bias
        return torch.einsum("...nh,...n->...h", outputs, self.mixing.to(outputs.dtype))


class SoftMixtureOfAttention(nn.Module):
    """``num_experts`` soft-routed attention experts in place of a decoder layer's ``self_attn`` (module docstring).

    ``attention`` is the joint attention (an instance of the backbone's attention class), ``router`` the
    ``Linear(H, N)`` whose softmax mixes the experts. ``forward`` takes and returns what the backbone's attention
    does, so the decoder layer is unchanged.
    """

    def __init__(
        self, attention_class: type[nn.Module], text_config: Any, layer_idx: int, num_experts: int, share_kv: bool
    ):
        super().__init__()
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        joint = copy.copy(text_config)
        joint.num_attention_heads = num_experts * heads
        joint.num_key_value_heads = kv_heads if share_kv else num_experts * kv_heads
        joint.head_dim = head_dim
        self.num_experts, self.share_kv = num_experts, share_kv
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.attention = attention_class(joint, layer_idx)
        norms = [name for name in PER_HEAD_NORMS if hasattr(self.attention, name)]
        if norms:
            raise ValueError(
                f"Mixture-of-Attention needs attention without per-head query/key norms ({type(self.attention).__name__}"
                f" has {norms}): the experts' norms would differ inside one joint attention."
            )
        self.output_name = next((n for n in OUTPUT_PROJECTIONS if hasattr(self.attention, n)), None)
        if self.output_name is None:
            raise ValueError(
                f"{type(self.attention).__name__} has no output projection named one of {OUTPUT_PROJECTIONS}."
            )
        order = attention_head_order(num_experts, heads, kv_heads, share_kv)
        has_bias = getattr(self.attention, self.output_name).bias is not None
        mixer = ExpertOutputMixer(num_experts, order, head_dim, text_config.hidden_size, has_bias)
        setattr(self.attention, self.output_name, mixer)
        self.router = nn.Linear(text_config.hidden_size, num_experts, bias=False)

    @property
    def mixer(self) -> ExpertOutputMixer:
        return getattr(self.attention, self.output_name)

    def routing_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``softmax(router(x))`` over the experts, computed in fp32 (at least)."""
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        logits = nn.functional.linear(hidden_states.to(dtype), self.router.weight.to(dtype))
        return torch.softmax(logits, dim=-1)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        mixer = self.mixer
        mixer.mixing = self.routing_weights(hidden_states)
        try:
            return self.attention(hidden_states, *args, **kwargs)
        finally:
            mixer.mixing = None

    @torch.no_grad()
    def load_experts(self, experts: list[nn.Module]) -> None:
        """Fill the joint attention from ``num_experts`` attention modules of the backbone's class (the seed models'
        ``self_attn``): each expert's query heads and output projection; its key-value heads, or their mean over the
        experts when they are shared."""
        if len(experts) != self.num_experts:
            raise ValueError(f"Expected {self.num_experts} attention experts, got {len(experts)}.")
        d, order = self.head_dim, self.mixer.head_order
        joint = self.attention
        for suffix in ("weight", "bias"):
            target = getattr(joint.q_proj, suffix)
            if target is None:
                continue
            for n, expert in enumerate(experts):
                source = getattr(expert.q_proj, suffix).unflatten(0, (self.num_heads, d))
                rows = order[n * self.num_heads : (n + 1) * self.num_heads]
                target.view(-1, d, *target.shape[1:])[rows] = source.to(target.dtype)
            for name in ("k_proj", "v_proj"):
                target = getattr(getattr(joint, name), suffix)
                sources = [getattr(getattr(expert, name), suffix) for expert in experts]
                merged = torch.stack(sources).mean(0) if self.share_kv else torch.cat(sources)
                target.copy_(merged.to(target.dtype))
        output_name = self.output_name
        for n, expert in enumerate(experts):
            projection = getattr(expert, output_name)
            self.mixer.weight[n] = projection.weight.to(self.mixer.weight.dtype)
            if self.mixer.bias is not None:
                self.mixer.bias[n] = projection.bias.to(self.mixer.bias.dtype)


def install_mixture_of_attention(
    decoder: nn.Module, text_config: Any, num_layers: int, num_experts: int, share_kv: bool
) -> list[SoftMixtureOfAttention]:
    """Replace every decoder layer's ``self_attn`` of ``decoder`` by a :class:`SoftMixtureOfAttention` of
    ``num_experts`` experts of the same attention class; returns them in layer order."""
    installed = []
    for index, layer in enumerate(find_decoder_layers(decoder, num_layers)):
        attention_class = type(layer.self_attn)
        layer.self_attn = SoftMixtureOfAttention(attention_class, text_config, index, num_experts, share_kv)
        installed.append(layer.self_attn)
    return installed
