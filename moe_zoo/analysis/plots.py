"""Expert-load plots: a heat map of every MoE block's expert shares, written as a PNG (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from .expert_statistics import ExpertStatistics

STATISTICS = ("counts", "gate_mass", "importance")


def plot_expert_load(
    stats: ExpertStatistics, path: str | Path, statistic: str = "counts", title: str | None = None
) -> Path:
    """Write a layers x experts heat map of each block's share of ``statistic`` (each row sums to 1; a uniform
    load is ``1 / E`` everywhere) to ``path`` (PNG) and return the path."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    table = getattr(stats, statistic)
    rows = np.stack([(t / t.sum().clamp_min(1e-30)).numpy() for t in table.values()])
    figure, axes = plt.subplots(figsize=(max(5.0, 2.0 + 0.45 * rows.shape[1]), 1.5 + 0.3 * rows.shape[0]))
    image = axes.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0)
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE block")
    axes.set_yticks(range(len(table)), [name.replace(".mlp", "") for name in table], fontsize=7)
    axes.set_xticks(range(rows.shape[1]))
    axes.set_title(title or f"share of {statistic} per expert ({stats.tokens} tokens)", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.05)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
