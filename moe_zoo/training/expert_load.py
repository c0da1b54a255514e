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

from ..core.recording import LayerRouting, collect_routing


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
            stacked = routed_counts(routing, counted_positions(batch, token_id))
            if counts is None:
                counts = torch.zeros(stacked.shape[0], num_labels, stacked.shape[1])
            counts[:, label] += stacked
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("expert_load_by_label needs at least one input.")
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def routed_counts(routing: Sequence[LayerRouting], positions: torch.Tensor | None = None) -> torch.Tensor:
    """``(layers, experts)``: how many token-expert assignments each expert got in each recorded layer, over the
    flat ``positions`` mask (``None``: all tokens). Empty slots (the sentinel index ``E``) do not count."""
    layer_counts = []
    for record in routing:
        slots = record.logits.shape[-1]
        indices = record.indices if positions is None else record.indices[positions]
        indices = indices[indices < slots]
        layer_counts.append(torch.bincount(indices.detach().cpu(), minlength=slots).float())
    return torch.stack(layer_counts)


def counted_positions(batch: dict, token_id: int | None = None) -> torch.Tensor | None:
    """A flat boolean mask of the positions whose routing counts (``None``: all of them)."""
    mask = batch.get("attention_mask")
    real = mask.reshape(-1).bool() if mask is not None else None
    if token_id is None:
        return real
    chosen = batch["input_ids"].reshape(-1) == token_id
    return chosen if real is None else chosen & real


def plot_expert_load(
    load: torch.Tensor,
    label_names: Sequence[str],
    path: str | Path,
    title: str = "",
    layer_names: Sequence[str] | None = None,
    columns: int = 8,
) -> Path:
    """Save one heat map per MoE layer (rows: labels, columns: experts, colour: share of assignments) as a PNG.

    The panels fill a grid of at most ``columns`` per row, titled by ``layer_names`` (default ``"MoE layer i"``);
    the colour scale runs from 0 to the largest share (with top-k routing no expert can take more than 1/k).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers, _, experts = load.shape
    names = list(layer_names) if layer_names is not None else [f"MoE layer {i}" for i in range(layers)]
    if len(names) != layers:
        raise ValueError(f"layer_names has {len(names)} names for {layers} layers.")
    columns = min(columns, layers)
    rows = -(-layers // columns)
    height = 0.3 * len(label_names) + 1.2
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 + 1.5 * columns, height * rows + 0.6), squeeze=False)
    top = max(float(load.max()), 1e-6)
    for index, axis in enumerate(axes.flat):
        if index >= layers:
            axis.axis("off")
            continue
        image = axis.imshow(load[index].numpy(), vmin=0, vmax=top, cmap="viridis", aspect="auto")
        axis.set_title(names[index], fontsize=9)
        axis.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=7)
        axis.set_xlabel("expert", fontsize=8)
        first_column = index % columns == 0
        axis.set_yticks(range(len(label_names)), label_names if first_column else [""] * len(label_names), fontsize=7)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of assignments")
    if title:
        figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
