"""Bootstrap intervals for the hypervolume of a grid-evaluation report, over its prompts.

Notation: G grid points, P prompts, m objectives, R bootstrap resamples.

A report's front is the mean over prompts of its ``per_prompt_rewards`` (G, P, m) (each prompt's mean over its
samples), so the prompts are the unit of resampling: a resample draws P prompts with replacement, the front is their
mean and the hypervolume is measured from the report's own reference point. Two reports of the same prompts
(``prompts_sha256``) are compared *paired*: both are resampled with the same prompt indices, so the prompt-to-prompt
variation they share cancels in the difference. The sampling noise of each prompt's responses is inside its row,
so it is counted too; the grid and the reference point are held fixed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from clp_lightning.evaluation.pareto import hypervolume


def _per_prompt(report: dict[str, Any], name: str) -> Tensor:
    if "per_prompt_rewards" not in report:
        raise ValueError(f"{name} has no per_prompt_rewards: it was written before evaluations kept per-prompt rows; "
                         "evaluate the checkpoint again (clp validate) to bootstrap it")
    rows = torch.tensor(report["per_prompt_rewards"], dtype=torch.float64)
    g, m = len(report["grid"]), len(report["objectives"])
    if rows.ndim != 3 or rows.shape[0] != g or rows.shape[2] != m:
        raise ValueError(f"{name}: per_prompt_rewards must have shape (G, P, m) = ({g}, P, {m}), "
                         f"got {tuple(rows.shape)}")
    if rows.shape[1] < 1:
        raise ValueError(f"{name} has no prompts to resample")
    return rows


def _resampled_hypervolumes(rows: Tensor, index: Tensor, ref_point: Tensor) -> Tensor:
    """Hypervolume ``(R,)`` of the front ``rows[:, index[r]].mean(1)`` for each resample ``r`` of ``index`` (R, P)."""
    # each resample as prompt weights (how often it drew each prompt / P): (R, P) instead of (G, R, P, m) copies
    share = torch.zeros(index.shape, dtype=torch.float64).scatter_add_(1, index, torch.ones(index.shape,
                                                                                          dtype=torch.float64))
    fronts = torch.einsum("rp,gpm->rgm", share / index.shape[1], rows)  # (R, G, m)
    return torch.tensor([hypervolume(front, ref_point) for front in fronts], dtype=torch.float64)


def _indices(num_prompts: int, num_resamples: int, level: float, seed: int) -> Tensor:
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_prompts, (num_resamples, num_prompts), generator=generator)  # (R, P)


def _interval(values: Tensor, level: float) -> list[float]:
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(values, tails).tolist()


def bootstrap_ci(report: dict[str, Any], num_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of one report's hypervolume, resampling its prompts with replacement.

    Args:
        report: a grid-evaluation report with ``per_prompt_rewards`` (G, P, m) and ``ref_point`` (m,).
        num_resamples: R.
        level: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        ``hypervolume`` (of the mean over the report's prompts), ``ci`` ``[low, high]``, ``standard_error`` (std of
        the resampled hypervolumes), ``num_prompts``, ``num_resamples``, ``level``, ``seed``.

    Raises:
        ValueError: the report has no per-prompt rows, or bad ``num_resamples`` / ``level``.
    """
    rows = _per_prompt(report, "the report")
    ref_point = torch.tensor(report["ref_point"], dtype=torch.float64)
    values = _resampled_hypervolumes(rows, _indices(rows.shape[1], num_resamples, level, seed), ref_point)
    return {
        "hypervolume": hypervolume(rows.mean(1), ref_point),
        "ci": _interval(values, level),
        "standard_error": float(values.std()) if num_resamples > 1 else float("nan"),
        "num_prompts": rows.shape[1], "num_resamples": num_resamples, "level": level, "seed": seed,
    }


def paired_bootstrap(
    report_a: dict[str, Any], report_b: dict[str, Any], num_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
    """Hypervolume of ``report_a`` minus ``report_b`` on the prompts both evaluated, with a paired percentile interval.

    Each resample draws P prompt indices with replacement and applies the same indices to both reports; each report's
    front is the mean of its resampled ``per_prompt_rewards`` and its hypervolume is measured from the shared
    ``ref_point``. An interval that excludes 0 says that the difference is larger than the prompt sample explains.

    Args:
        report_a, report_b: grid-evaluation reports of the same objectives, grid, reference point and prompts.
        num_resamples: R.
        level: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        ``difference`` (a minus b, on all the prompts), ``ci`` ``[low, high]``, ``standard_error``,
        ``hypervolume_a``, ``hypervolume_b``, ``fraction_a_better`` (share of resamples with a positive difference),
        ``num_prompts``, ``num_resamples``, ``level``, ``seed``.

    Raises:
        ValueError: the reports differ in objectives, grid, reference point or prompts (``prompts_sha256``), or
            one has no per-prompt rows.
    """
    for key in ("objectives", "grid", "ref_point", "prompts_sha256"):
        if key not in report_a or key not in report_b:
            raise ValueError(f"cannot pair the reports: {key!r} is missing from report "
                             f"{'a' if key not in report_a else 'b'} (written before per-prompt rows were kept?)")
        if report_a[key] != report_b[key]:
            raise ValueError(f"cannot pair the reports: their {key} differ ({report_a[key]} vs {report_b[key]}); a "
                             "paired comparison needs the same objectives, grid, reference point and prompts")
    rows_a, rows_b = _per_prompt(report_a, "report a"), _per_prompt(report_b, "report b")
    if rows_a.shape != rows_b.shape:
        raise ValueError(f"per_prompt_rewards shapes differ: {tuple(rows_a.shape)} vs {tuple(rows_b.shape)}")
    ref_point = torch.tensor(report_a["ref_point"], dtype=torch.float64)
    index = _indices(rows_a.shape[1], num_resamples, level, seed)
    hv_a, hv_b = hypervolume(rows_a.mean(1), ref_point), hypervolume(rows_b.mean(1), ref_point)
    diffs = _resampled_hypervolumes(rows_a, index, ref_point) - _resampled_hypervolumes(rows_b, index, ref_point)
    return {
        "difference": hv_a - hv_b,
        "ci": _interval(diffs, level),
        "standard_error": float(diffs.std()) if num_resamples > 1 else float("nan"),
        "hypervolume_a": hv_a, "hypervolume_b": hv_b,
        "fraction_a_better": float((diffs > 0).double().mean()),
        "num_prompts": rows_a.shape[1], "num_resamples": num_resamples, "level": level, "seed": seed,
    }
