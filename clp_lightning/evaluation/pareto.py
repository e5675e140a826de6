"""Pareto front and hypervolume of a set of reward vectors (maximisation: higher reward is better).

Notation: P points (one per grid weighting), m objectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def cpu64(x: Tensor | Sequence) -> Tensor:
    """``x`` on the CPU in float64: grids are tiny (exact sweeps, and float64 exists on every backend there). Python
    floats go straight to float64: ``torch.as_tensor`` would round them to float32 first, merging or splitting ties."""
    return (x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)).detach().to("cpu", torch.float64)


def _as_points(points: Tensor | Sequence[Sequence[float]], name: str = "points") -> Tensor:
    points = cpu64(points)
    if points.ndim != 2:
        raise ValueError(f"`{name}` must have shape (P, m), got {tuple(points.shape)}")
    if points.isnan().any():
        bad = points.isnan().any(-1).nonzero().flatten().tolist()
        raise ValueError(f"`{name}` has nan in rows {bad}; a Pareto front of undefined rewards is undefined")
    return points


def pareto_front_mask(points: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """Which points are non-dominated.

    A point is dominated when another is at least as good in every objective and strictly better in one.
    Duplicates do not dominate each other, so equal non-dominated points are all kept.

    Args:
        points: (P, m) reward vectors.

    Returns:
        (P,) bool on the CPU, True on the Pareto front.

    Raises:
        ValueError: ``points`` is not 2-D or contains nan.
    """
    pts = _as_points(points)
    # ge[a, b]: b >= a everywhere; gt[a, b]: b > a somewhere. O(P^2 m), fine for evaluation grids.
    ge = (pts[None, :, :] >= pts[:, None, :]).all(-1)
    gt = (pts[None, :, :] > pts[:, None, :]).any(-1)
    return ~(ge & gt).any(-1)


def _hv_2d(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    # Sweep in decreasing x: each point adds the strip [ref_x, x] x [best y so far, y].
    area, best_y = 0.0, ref[1]
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def _hv(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    # Slice along the last objective: between consecutive levels z_i > z_{i+1} the cross-section is the
    # (m-1)-dimensional hypervolume of the points with last coordinate >= z_i.
    m = len(ref)
    if not points:
        return 0.0
    if m == 1:
        return max(p[0] for p in points) - ref[0]
    if m == 2:
        return _hv_2d(points, ref)
    points = sorted(points, key=lambda p: -p[-1])
    volume = 0.0
    for i, p in enumerate(points):
        next_level = points[i + 1][-1] if i + 1 < len(points) else ref[-1]
        if p[-1] > next_level:
            volume += _hv([q[:-1] for q in points[: i + 1]], ref[:-1]) * (p[-1] - next_level)
    return volume


def hypervolume(points: Tensor | Sequence[Sequence[float]], ref: Tensor | Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` and bounded below by ``ref``.

    The volume of the union of the boxes ``[ref, p]``. Points not strictly better than ``ref`` in every objective
    contribute nothing. Exact for any m by recursive slicing (a 2-D sweep at the bottom) after removing dominated
    points; the cost is about ``O(P^(m-1) log P)`` for P front points, fine for simplex grids (m = 2: 11 points,
    m = 3: 15, m = 4 with step 0.25: 35) but not meant for thousands of points in high dimension.

    Args:
        points: (P, m) reward vectors.
        ref: (m,) reference point, e.g. the reference policy's mean rewards.

    Returns:
        The hypervolume (0.0 when no point beats ``ref``), computed in float64.

    Raises:
        ValueError: shapes do not match, the input contains nan, or ``ref`` is infinite.
    """
    pts = _as_points(points)
    ref_t = cpu64(ref)
    if ref_t.shape != (pts.shape[1],):
        raise ValueError(f"`ref` must have shape (m,) = ({pts.shape[1]},), got {tuple(ref_t.shape)}")
    if ref_t.isnan().any():
        raise ValueError(f"`ref` contains nan: {ref_t.tolist()}")
    if ref_t.isinf().any():  # -inf bounds nothing (every volume infinite), +inf leaves nothing to measure
        raise ValueError(f"`ref` must be finite, got {ref_t.tolist()}")
    pts = pts[(pts > ref_t).all(-1)]
    if pts.shape[0] == 0:
        return 0.0
    pts = pts[pareto_front_mask(pts)].unique(dim=0)
    return float(_hv([tuple(p) for p in pts.tolist()], tuple(ref_t.tolist())))
