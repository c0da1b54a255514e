"""``moe_zoo.expand_to_metis_home``: a dense model -> Metis-HOME, every branch a copy of the dense FFN.

In the paper both experts start from the RL-trained thinking model, so the expanded model computes exactly what the
dense one did, whichever branch a query takes; only the router is new.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils.logging import tqdm

from .configuration_metis_home import MetisHomeConfig
from .modeling_metis_home import MetisHomeForConditionalGeneration

_BRANCH_SEGMENT = re.compile(r"\.mlp\.branches\.[A-Za-z_][A-Za-z0-9_]*\.")


def expand_to_metis_home(model: PreTrainedModel, **metis_options: Any) -> MetisHomeForConditionalGeneration:
    """Metis-HOME from a dense model: a ``Qwen2_5_VLForConditionalGeneration``, a Llava-style model (MoE-LLaVA
    included: its MoE blocks are duplicated whole), or any causal LM.

    Every decoder layer's FFN is copied into each branch of ``branch_names``; attention, embeddings, the vision tower
    and the head are shared and copied once. The router starts at normal(0, ``initializer_range``). Options are the
    fields of :class:`MetisHomeConfig` (``router_layer``, ``router_pooling``, ``router_loss_coef``, ...). ``model``
    is not modified. Seed torch for a reproducible router.

    Example:
    ```python
    >>> metis = moe_zoo.expand_to_metis_home(dense, router_layer=8)
    >>> metis.save_pretrained("my-metis-home")  # AutoModelForCausalLM / AutoModelForImageTextToText load it back
    ```
    """
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise ValueError(
            "expand_to_metis_home() needs a transformers model with an LM head (a causal LM or an image-text-to-text "
            f"model), got {type(model).__name__}."
        )
    if isinstance(model, MetisHomeForConditionalGeneration):
        raise ValueError("The model is already a Metis-HOME model.")
    base_config = copy.deepcopy(model.config)
    base_config.architectures = None
    config = MetisHomeConfig(base_config=base_config, **metis_options)
    parameter = next(model.parameters())
    with torch.device("meta"):
        metis = MetisHomeForConditionalGeneration(config)
    metis = metis.to_empty(device=parameter.device).to(parameter.dtype)
    _copy_dense_weights(model, metis)
    metis.router.float()
    metis._init_weights(metis.router)
    metis.generation_config = copy.deepcopy(model.generation_config)
    metis.train(model.training)
    return metis


@torch.no_grad()
def _copy_dense_weights(dense: PreTrainedModel, metis: MetisHomeForConditionalGeneration) -> None:
    """Fill every tensor of ``metis`` but the router from ``dense``: ``model.<name>`` from ``<name>``, and each
    branch's ``...mlp.branches.<branch>.<rest>`` from the dense ``...mlp.<rest>``. Refuses any tensor left over on
    either side, so no weight is ever silently left random."""
    sources = {**dict(dense.named_parameters(remove_duplicate=False)), **dict(dense.named_buffers())}
    targets = {**dict(metis.named_parameters(remove_duplicate=False)), **dict(metis.named_buffers())}
    used, missing = set(), []
    for name, target in tqdm(targets.items(), desc="Expanding FFNs into branches", leave=False):
        if name.startswith("router."):
            continue
        source_name = _BRANCH_SEGMENT.sub(".mlp.", name.removeprefix("model."))
        if source_name not in sources:
            missing.append(name)
            continue
        target.copy_(sources[source_name])
        used.add(source_name)
    unused = sorted(set(sources) - used)
    if missing or unused:
        raise ValueError(
            f"Expanding {type(dense).__name__} left tensors unmatched (no source for: {missing[:5]}; unused: "
            f"{unused[:5]}); its layout is not one Metis-HOME supports."
        )
    metis.tie_weights()


__all__ = ["expand_to_metis_home"]
