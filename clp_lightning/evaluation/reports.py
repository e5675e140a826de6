"""Reading grid-evaluation reports, old and new: what a reader may take from ``kl`` (see ``grid_report``)."""

from __future__ import annotations

import math
from typing import Any


def grid_mean(values: list[float]) -> float:
    """The mean over the grid of a report's per-weighting column (nan if any value is nan, or if there is none)."""
    return sum(values) / len(values) if values else math.nan


def sampled_kl(report: dict[str, Any]) -> float:
    """The mean over the grid of a report's KL to the reference, estimated from sampled responses; nan when the report
    has none: ``kl_samples: 0``, or a report written before the KL was sampled, whose ``kl`` (no ``kl_se`` beside it)
    is the log-ratio of the greedy responses, not a KL."""
    if "kl_se" not in report or not report.get("kl"):
        return math.nan
    return grid_mean([float(v) for v in report["kl"]])
