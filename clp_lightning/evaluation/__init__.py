"""Evaluation over a grid of weightings: Pareto front, hypervolume and steerability, as torchmetrics; bootstrap
intervals of a report's hypervolume and of the difference between two reports. Generation at given weightings, which
every evaluation runs through, is the module's mixin in :mod:`clp_lightning.evaluation.generation`."""

from clp_lightning.evaluation.bootstrap import bootstrap_ci, paired_bootstrap
from clp_lightning.evaluation.metrics import (
    GridRewardMeans,
    ParetoSteerabilityMetric,
    PromptRows,
    mean_and_standard_error,
    pareto_steerability,
    prompt_digest,
    prompts_sha256,
)
from clp_lightning.evaluation.pareto import hypervolume, pareto_front_mask
from clp_lightning.evaluation.steerability import grid_step, monotonicity_violations, pearson, spearman, steerability

__all__ = [
    "GridRewardMeans",
    "ParetoSteerabilityMetric",
    "PromptRows",
    "bootstrap_ci",
    "grid_step",
    "hypervolume",
    "mean_and_standard_error",
    "monotonicity_violations",
    "paired_bootstrap",
    "pareto_front_mask",
    "pareto_steerability",
    "pearson",
    "prompt_digest",
    "prompts_sha256",
    "spearman",
    "steerability",
]
