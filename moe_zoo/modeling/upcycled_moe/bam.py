"""BAM: upcycle several dense models into one MoE with FFN experts **and** soft Mixture-of-Attention experts.

BAM (Zhang et al. 2024) branches one seed model into ``N`` copies, trains each further on its own data (or takes
``N`` related dense models), and builds an MoE whose ``N`` FFN experts and ``N`` attention experts are those
copies' FFNs and attentions; the routers are new, everything else (embeddings, norms, head) is the copies' mean.
The attention experts are soft-routed (all active, softmax weights), optionally sharing their keys and values
(BAM's second variant: the copies' key-value projections averaged). BAM uses a parallel attention+FFN block: use
seeds whose decoder layers are parallel (Phi); the Mixture-of-Attention works in sequential layers (Llama, Qwen2,
Mistral) as well.

``bam_upcycle([seed_1, ..., seed_N])`` returns an :class:`UpcycledMoeForCausalLM` with ``num_experts = N`` and
``num_attention_experts = N``; it saves and loads like any upcycled model. With ``N`` identical seeds it computes
the seed's function exactly (top-k weights renormalised, attention weights summing to 1), which the tests check.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ...core.block import SparseMoeBlock
from ...core.mixture_of_attention import SoftMixtureOfAttention
from ...core.upcycle import dense_expert_weights, find_decoder_layers
from ..moe_backbone import built_on_meta_whole
from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import UpcycledMoeForCausalLM


def _check_seeds(seeds: list[PreTrainedModel]) -> None:
    if len(seeds) < 2:
        raise ValueError(f"BAM needs at least 2 seed models (one per expert), got {len(seeds)}.")
    first = seeds[0]
    shapes = {name: p.shape for name, p in first.named_parameters(remove_duplicate=False)}
    for index, seed in enumerate(seeds[1:], start=1):
        if type(seed) is not type(first):
            raise ValueError(
                f"Seed {index} is a {type(seed).__name__}, seed 0 a {type(first).__name__}: BAM needs copies."
            )
        other = {name: p.shape for name, p in seed.named_parameters(remove_duplicate=False)}
        if other != shapes:
            differing = sorted(n for n in shapes.keys() | other.keys() if shapes.get(n) != other.get(n))[:5]
            raise ValueError(
                f"Seed {index} does not have seed 0's parameters and shapes (first differences: {differing})."
            )


@torch.no_grad()
def bam_upcycle(
    seeds: list[PreTrainedModel],
    num_experts_per_tok: int = 2,
    moe_layers: str | list[int] = "all",
    share_kv: bool = False,
    router_init_std: float | None = None,
    **moe_options: Any,
) -> UpcycledMoeForCausalLM:
    """Build the BAM MoE of ``seeds`` (dense causal LMs of one architecture; see the module docstring).

    Expert ``n`` of every MoE block is seed ``n``'s FFN of that layer, attention expert ``n`` its attention; layers
    outside ``moe_layers`` keep the seeds' mean FFN. Routers start from normal(0, ``router_init_std``) (default: the
    backbone's ``initializer_range``). Other MoE options (:class:`~moe_zoo.core.MoeOptions`) pass through.
    """
    _check_seeds(seeds)
    count = len(seeds)
    config = UpcycledMoeConfig(
        text_config=copy.deepcopy(seeds[0].config),
        num_experts=count,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        num_attention_experts=count,
        attention_experts_share_kv=share_kv,
        **moe_options,
    )
    parameter = next(seeds[0].parameters())
    with built_on_meta_whole():
        moe = UpcycledMoeForCausalLM(config)
    moe = moe.to_empty(device=parameter.device).to(parameter.dtype)
    std = router_init_std if router_init_std is not None else config.initializer_range
    layers = find_decoder_layers(moe.model, config.num_hidden_layers)
    seed_layers = [find_decoder_layers(seed.get_decoder(), config.num_hidden_layers) for seed in seeds]
    expert_prefixes = tuple(
        f"model.{name}."
        for name, m in moe.model.named_modules()
        if isinstance(m, SparseMoeBlock | SoftMixtureOfAttention)
    )
    _copy_mean_of_seeds(moe, seeds, expert_prefixes)
    for index, layer in enumerate(layers):
        layer.self_attn.load_experts([seed_layers[n][index].self_attn for n in range(count)])
        nn.init.normal_(layer.self_attn.router.weight, mean=0.0, std=std)
        if isinstance(layer.mlp, SparseMoeBlock):
            for n in range(count):
                for name, weight in dense_expert_weights(seed_layers[n][index].mlp).items():
                    target = getattr(layer.mlp.experts, name)
                    target[n] = weight.to(target.dtype)
            layer.mlp.reset_routing(std)
    moe.tie_weights()
    moe.generation_config = copy.deepcopy(seeds[0].generation_config)
    return moe.train(seeds[0].training)


def _copy_mean_of_seeds(moe: nn.Module, seeds: list[nn.Module], skip: tuple[str, ...]) -> None:
    """Every tensor of ``moe`` outside the expert modules (``skip`` prefixes) becomes the mean of the seeds' tensors
    of the same name (buffers such as RoPE frequencies included); a name the seeds lack raises ``ValueError``."""
    seed_tensors = [
        {**dict(seed.named_parameters(remove_duplicate=False)), **dict(seed.named_buffers())} for seed in seeds
    ]
    targets = {**dict(moe.named_parameters(remove_duplicate=False)), **dict(moe.named_buffers())}
    missing = []
    for name, target in targets.items():
        if name.startswith(skip):
            continue
        if name not in seed_tensors[0]:
            missing.append(name)
            continue
        values = torch.stack([tensors[name].detach().to(torch.float64) for tensors in seed_tensors])
        target.copy_(values.mean(0).to(target.dtype))
    if missing:
        raise ValueError(f"The BAM model has tensors the seed models lack: {missing[:5]}.")
