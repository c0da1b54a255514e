"""Expert load: which experts each kind of input is routed to, per MoE layer (MoE-LLaVA's routing figures).

:func:`expert_load_by_label` runs a model over labelled inputs and counts, for every MoE layer, the fraction of
each label's routed assignments that went to each expert (padding excluded); :func:`plot_expert_load` draws one
heat map per layer (labels x experts) into a PNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.recording import collect_routing


@torch.no_grad()
def expert_load_by_label(
    model: nn.Module,
    inputs: Iterable[dict],
    labels: Sequence[int],
    num_labels: int,
    token_id: int | None = None,
) -> torch.Tensor:
    """``(layers, num_labels, experts)``: the share of each label's token-expert assignments per expert.

    ``inputs`` are model-ready batches of one example each (``input_ids``, ``attention_mask``, ``pixel_values``...),
    aligned with ``labels``. Padding never counts; with ``token_id`` only the positions holding that token count
    (MoE-LLaVA's image tokens, say, whose routing is what differs between image classes). Rows of labels that never
    occur are zero.
    """
    counts = None
    was_training = model.training
    model.eval()
    try:
        for batch, label in zip(inputs, labels, strict=True):
            with collect_routing() as routing:
                model(**batch)
            real = _counted_positions(batch, token_id)
            layer_counts = []
            for record in routing:
                slots = record.logits.shape[-1]
                indices = record.indices if real is None else record.indices[real]
                indices = indices[indices < slots]
                layer_counts.append(torch.bincount(indices.cpu(), minlength=slots).float())
            stacked = torch.stack(layer_counts)  # (layers, experts)
            if counts is None:
                counts = torch.zeros(stacked.shape[0], num_labels, stacked.shape[1])
            counts[:, label] += stacked
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("expert_load_by_label needs at least one input.")
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def _counted_positions(batch: dict, token_id: int | None) -> torch.Tensor | None:
    """A flat boolean mask of the positions whose routing counts (``None``: all of them)."""
    mask = batch.get("attention_mask")
    real = mask.reshape(-1).bool() if mask is not None else None
    if token_id is None:
        return real
    chosen = batch["input_ids"].reshape(-1) == token_id
    return chosen if real is None else chosen & real


def plot_expert_load(load: torch.Tensor, label_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Save one heat map per MoE layer (rows: labels, columns: experts, colour: share of assignments) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers, _, experts = load.shape
    figure, axes = plt.subplots(1, layers, figsize=(2.2 + 1.6 * layers, 0.35 * len(label_names) + 1.8), squeeze=False)
    for layer, axis in enumerate(axes[0]):
        image = axis.imshow(load[layer].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_title(f"MoE layer {layer}", fontsize=9)
        axis.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=7)
        axis.set_xlabel("expert", fontsize=8)
        axis.set_yticks(range(len(label_names)), label_names if layer == 0 else [""] * len(label_names), fontsize=7)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
    if title:
        figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
