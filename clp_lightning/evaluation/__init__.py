"""Evaluation over a grid of weightings: Pareto front, hypervolume and steerability, as torchmetrics."""

from clp_lightning.evaluation.metrics import GridRewardMeans, ParetoSteerabilityMetric, pareto_steerability
from clp_lightning.evaluation.pareto import hypervolume, pareto_front_mask
from clp_lightning.evaluation.steerability import grid_step, monotonicity_violations, pearson, spearman, steerability

__all__ = [
    "GridRewardMeans",
    "ParetoSteerabilityMetric",
    "grid_step",
    "hypervolume",
    "monotonicity_violations",
    "pareto_front_mask",
    "pareto_steerability",
    "pearson",
    "spearman",
    "steerability",
]
