"""``moe_zoo.upcycle``: turn a dense HF causal LM into an :class:`UpcycledMoeForCausalLM`, function-preserving."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils.logging import tqdm

from ...core.block import SparseMoeBlock
from ...core.upcycle import copy_ffn_into_experts, copy_ffn_into_shared_expert, find_decoder_layers
from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import UpcycledMoeForCausalLM


def upcycle(
    model: PreTrainedModel,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_layers: str | list[int] = "all",
    router_init_std: float | None = None,
    **moe_options: Any,
) -> UpcycledMoeForCausalLM:
    """Sparse upcycling of a dense decoder: every FFN in ``moe_layers`` becomes an MoE block whose
    ``num_experts`` experts are exact copies of it, with a fresh router (normal(0, ``router_init_std``), default
    the backbone's ``initializer_range``). Everything else is copied unchanged; ``model`` is not modified.

    With a top-k router that renormalises its weights (the default ``softmax_topk`` with ``norm_topk_prob=True``)
    the result computes the same function as ``model``; top-p, top-any, dense-to-sparse, capacity dropping and
    shared / zero-computation experts change the function by design. Any other option of
    :class:`~moe_zoo.core.MoeOptions` can be passed as a keyword argument. Seed torch for a reproducible router.

    Example:
    ```python
    >>> moe = moe_zoo.upcycle(dense, num_experts=8, num_experts_per_tok=2, moe_layers="sparse")
    >>> moe.save_pretrained("my-moe")  # loads back with AutoModelForCausalLM after `import moe_zoo`
    ```
    """
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_output_embeddings"):
        raise ValueError(
            f"upcycle() needs a transformers causal LM (e.g. LlamaForCausalLM), got {type(model).__name__}."
        )
    config = UpcycledMoeConfig(
        text_config=copy.deepcopy(model.config),
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        **moe_options,
    )
    config.text_config.architectures = None
    parameter = next(model.parameters())
    # Build on the meta device and fill every tensor by copying: no time is spent on a random init that the
    # copies would overwrite, and memory holds the MoE once.
    with torch.device("meta"):
        moe = UpcycledMoeForCausalLM(config)
    moe = moe.to_empty(device=parameter.device).to(parameter.dtype)
    moe_layer_indices = set(config.moe_layer_indices)
    _copy_shared_tensors(model, moe, moe_layer_indices)

    std = router_init_std if router_init_std is not None else config.initializer_range
    dense_layers = find_decoder_layers(model, config.num_hidden_layers)
    moe_layers_list = find_decoder_layers(moe, config.num_hidden_layers)
    for index in tqdm(sorted(moe_layer_indices), desc="Upcycling FFNs into experts", leave=False):
        block: SparseMoeBlock = moe_layers_list[index].mlp
        dense_ffn = dense_layers[index].mlp
        copy_ffn_into_experts(dense_ffn, block.experts)
        if block.shared_expert is not None:
            if config.num_shared_experts == 1 and not config.shared_expert_intermediate_size:
                copy_ffn_into_shared_expert(dense_ffn, block.shared_expert)
            else:
                for linear in block.shared_expert.children():
                    moe._init_weights(linear)
        block.reset_routing(std)
    moe.tie_weights()
    moe.generation_config = copy.deepcopy(model.generation_config)
    moe.train(model.training)
    return moe


@torch.no_grad()
def _copy_shared_tensors(dense: PreTrainedModel, moe: UpcycledMoeForCausalLM, moe_layer_indices: set[int]) -> None:
    """Copy every parameter and buffer (non-persistent ones such as RoPE frequencies included) that the two
    models share by name, i.e. everything but the FFNs that became MoE blocks; refuse any mismatch."""
    dense_tensors = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
    moe_tensors = {**dict(moe.named_parameters()), **dict(moe.named_buffers())}
    missing = []
    for name, target in moe_tensors.items():
        if _in_moe_ffn(name, moe_layer_indices):
            continue
        if name in dense_tensors:
            target.copy_(dense_tensors[name])
        elif not _is_tied_copy(moe, name):
            missing.append(name)
    unexpected = [n for n in dense_tensors if n not in moe_tensors and not _in_moe_ffn(n, moe_layer_indices)]
    if missing or unexpected:
        raise ValueError(
            f"Upcycling {type(dense).__name__} left tensors unmatched (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); the backbone's layout is not one upcycling supports."
        )


def _is_tied_copy(model: PreTrainedModel, name: str) -> bool:
    return name in (getattr(model, "all_tied_weights_keys", None) or {})


def _in_moe_ffn(name: str, moe_layer_indices: set[int]) -> bool:
    """Whether a dense state-dict key belongs to the FFN of a layer that becomes MoE."""
    parts = name.split(".")
    for position, part in enumerate(parts[:-2]):
        if part.isdigit() and parts[position + 1] == "mlp":
            return int(part) in moe_layer_indices
    return False


@torch.no_grad()
def max_logit_difference(dense: PreTrainedModel, moe: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """Largest absolute difference between the two models' logits on ``input_ids`` (eval mode, no cache)."""
    modes = dense.training, moe.training
    dense.eval()
    moe.eval()
    try:
        reference = dense(input_ids=input_ids, use_cache=False).logits
        upcycled = moe(input_ids=input_ids, use_cache=False).logits
    finally:
        dense.train(modes[0])
        moe.train(modes[1])
    return (reference.double() - upcycled.double()).abs().max().item()
