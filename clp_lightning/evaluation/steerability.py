"""Steerability over a grid of weightings: does raising ``w_i`` raise reward ``i``?

Notation: P grid points, m objectives; ``weights`` (P, m) are the grid weightings, ``means`` (P, m) the mean raw
reward of each objective at each grid point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clp_lightning.evaluation.pareto import cpu64


def _average_ranks(x: Tensor) -> Tensor:
    # 1-based ranks, ties get the mean of the ranks they span: #smaller + (#equal + 1) / 2. O(P^2), P is a grid.
    smaller = (x[None, :] < x[:, None]).sum(-1)
    equal = (x[None, :] == x[:, None]).sum(-1)
    return smaller + (equal + 1) / 2


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation, with average ranks for ties.

    Args:
        x: (P,) values, e.g. the grid's ``w_i``.
        y: (P,) values, e.g. the mean of reward ``i`` at each grid point.

    Returns:
        The Pearson correlation of the ranks, in [-1, 1]. nan when either input is constant (or P < 2) or has a nan
        value: the correlation is undefined there, and nan says so instead of passing for "no trend". A grid's
        ``w_i`` is never constant, so on real grids only a policy whose reward ``i`` is exactly constant gives nan.

    Raises:
        ValueError: ``x`` and ``y`` are not 1-D of equal length.
    """
    x, y = cpu64(x), cpu64(y)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"`x` and `y` must both have shape (P,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.isnan().any() or y.isnan().any():  # a nan has no rank: ranking around it would hide it in a finite number
        return math.nan
    return pearson(_average_ranks(x), _average_ranks(y))


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two ``(P,)`` tensors, in float64; nan when either is constant or ``P < 2``."""
    x, y = cpu64(x), cpu64(y)
    # constancy is checked on the values: centring a constant leaves rounding residues (1e-17), not zeros
    if x.numel() < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    if denom == 0:
        return math.nan
    return float((x * y).sum() / denom)


def _check_grid(weights: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    weights, means = cpu64(weights), cpu64(means)
    if weights.ndim != 2 or weights.shape != means.shape:
        raise ValueError(
            f"`weights` and `means` must both have shape (P, m), got {tuple(weights.shape)} and {tuple(means.shape)}"
        )
    for name, values in (("weights", weights), ("means", means)):
        if values.isnan().any():  # comparisons with nan are all False: it would pass for "no violation"
            bad = values.isnan().any(-1).nonzero().flatten().tolist()
            raise ValueError(f"`{name}` has nan in grid points {bad}; the steerability of undefined rewards is "
                             "undefined")
    return weights, means


def grid_step(weights: Tensor, rtol: float = 1e-3) -> float:
    """The lattice step of a weight grid: the smallest nonzero difference between two grid values of one objective.

    Args:
        weights: (P, m) grid weightings.
        rtol: differences below ``rtol`` times the largest difference count as zero (float noise in grids built
            as ``i * 0.1``).

    Returns:
        The step, or 0.0 when all grid points are equal.
    """
    weights = cpu64(weights)
    diffs = (weights[None, :, :] - weights[:, None, :]).abs().flatten()
    if diffs.numel() == 0 or diffs.max() == 0:
        return 0.0
    return float(diffs[diffs > rtol * diffs.max()].min())


def monotonicity_violations(weights: Tensor, means: Tensor, i: int, tol: float = 0.0) -> int:
    """Count lattice-adjacent steps that move weight onto objective ``i`` and yet lower reward ``i``.

    A pair (a, b) is adjacent for ``i`` when b is a with one grid step of weight moved from some objective j != i
    to i: ``w_b[i] = w_a[i] + step``, ``w_b[j] = w_a[j] - step``, all other weights equal. The step is inferred as
    the smallest nonzero weight difference (:func:`grid_step`); weights equal up to 1e-3 of a step count as equal.
    The pair is a violation when ``means[b, i] < means[a, i] - tol``. For m = 2 this is the number of consecutive
    decreases of reward ``i`` along ``w_i``.

    Args:
        weights: (P, m) grid weightings, in any order.
        means: (P, m) mean reward of each objective at each grid point.
        i: the objective, ``0 <= i < m``.
        tol: slack: decreases up to ``tol`` (e.g. sampling noise) are not violations.

    Returns:
        The number of violating adjacent pairs (0 when the grid has a single distinct point).

    Raises:
        ValueError: shapes differ, an input has nan, ``i`` is out of range, or ``tol`` is negative or nan.
    """
    weights, means = _check_grid(weights, means)
    m = weights.shape[1]
    if not 0 <= i < m:
        raise ValueError(f"objective index i={i} out of range for m={m} objectives")
    if not tol >= 0:  # negative slack would count flat steps (and small rises) as violations; nan would count none
        raise ValueError(f"tol must be >= 0 (the decrease that is still not a violation), got {tol}")
    step = grid_step(weights)
    if step == 0.0:
        return 0
    # units[a, b, :] = (w_b - w_a) / step, rounded: adjacent pairs are +1 at i, -1 at one j, 0 elsewhere.
    units = (weights[None, :, :] - weights[:, None, :]) / step
    rounded = units.round()
    exact = ((units - rounded).abs() < 1e-3).all(-1)
    others = torch.ones(m, dtype=torch.bool)
    others[i] = False
    adjacent = (
        exact
        & (rounded[..., i] == 1)
        & ((rounded[..., others] == -1).sum(-1) == 1)
        & ((rounded[..., others] == 0).sum(-1) == m - 2)
    )
    decrease = means[None, :, i] < means[:, None, i] - tol  # [a, b]: reward i at b below that at a
    return int((adjacent & decrease).sum())


def steerability(weights: Tensor, means: Tensor, tol: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-objective steerability of a policy evaluated on a grid of weightings.

    Args:
        weights: (P, m) grid weightings.
        means: (P, m) mean reward of each objective at each grid point.
        tol: slack for :func:`monotonicity_violations`.

    Returns:
        ``(rho, violations)`` on the CPU: (m,) float64 Spearman correlations between ``w_i`` and ``means[:, i]``
        (nan where undefined, see :func:`spearman`), and (m,) int64 counts of monotonicity violations.

    Raises:
        ValueError: shapes differ or an input has nan.
    """
    weights, means = _check_grid(weights, means)
    m = weights.shape[1]
    rho = torch.tensor([spearman(weights[:, i], means[:, i]) for i in range(m)], dtype=torch.float64)
    violations = torch.tensor([monotonicity_violations(weights, means, i, tol) for i in range(m)], dtype=torch.long)
    return rho, violations
