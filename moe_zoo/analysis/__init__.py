"""Expert analysis and pruning: per-expert routing statistics over a dataset, EASY-EP's domain-specific pruning
from a few demonstrations, and expert-load plots."""

from .expert_statistics import ExpertStatistics, block_statistics, collect_expert_statistics
from .plots import plot_expert_load
from .pruning import easy_ep_prune, prune_experts, select_experts

__all__ = [
    "ExpertStatistics",
    "block_statistics",
    "collect_expert_statistics",
    "easy_ep_prune",
    "plot_expert_load",
    "prune_experts",
    "select_experts",
]
