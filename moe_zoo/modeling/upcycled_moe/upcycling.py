"""``moe_zoo.upcycle``: turn a dense HF causal LM into an :class:`UpcycledMoeForCausalLM`, function-preserving."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from ..moe_backbone import built_on_meta_whole, upcycle_weights
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
    if moe_options.get("num_attention_experts"):
        raise ValueError(
            "upcycle() copies one dense model; attention experts come from several seeds: use "
            "moe_zoo.bam_upcycle([seed_1, ..., seed_N]) for BAM's Mixture-of-Attention."
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
    with built_on_meta_whole():
        moe = UpcycledMoeForCausalLM(config)
    moe = moe.to_empty(device=parameter.device).to(parameter.dtype)
    std = router_init_std if router_init_std is not None else config.initializer_range
    upcycle_weights(model, moe, model, moe, config, config.num_hidden_layers, std)
    moe.generation_config = copy.deepcopy(model.generation_config)
    moe.train(model.training)
    return moe


@torch.no_grad()
def max_logit_difference(
    dense: PreTrainedModel, moe: PreTrainedModel, inputs: torch.Tensor | Mapping[str, torch.Tensor]
) -> float:
    """Largest absolute difference between the two models' logits on ``inputs`` (eval mode, no cache): ``input_ids``,
    or a dict of model inputs (``input_ids``, ``attention_mask``, ``pixel_values``...)."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    modes = dense.training, moe.training
    dense.eval()
    moe.eval()
    try:
        reference = dense(**inputs, use_cache=False).logits
        upcycled = moe(**inputs, use_cache=False).logits
    finally:
        dense.train(modes[0])
        moe.train(modes[1])
    return (reference.double() - upcycled.double()).abs().max().item()
