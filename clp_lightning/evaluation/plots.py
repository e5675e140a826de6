"""Figures of Pareto fronts: this epoch's grid points labelled by ``w``, the reference point, earlier epochs faded."""

from __future__ import annotations

import itertools
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def front_figure(report: dict[str, Any], history: list[dict[str, Any]] | None = None, title: str | None = None):
    """One panel for 2 objectives, the pairwise projections for 3 or more."""
    names = report["objectives"]
    pairs = list(itertools.combinations(range(len(names)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    history = history or []
    for ax, (i, j) in zip(axes[0], pairs):
        for age, past in enumerate(history[-5:]):
            pts = past["rewards"]
            ax.plot([p[i] for p in pts], [p[j] for p in pts], "o-", color="grey", alpha=0.15 + 0.1 * age, ms=3)
        pts, front = report["rewards"], report["front_mask"]
        ax.plot([p[i] for p in pts], [p[j] for p in pts], "-", color="tab:blue", alpha=0.5)
        ax.scatter([p[i] for p in pts], [p[j] for p in pts], c=["tab:blue" if f else "tab:orange" for f in front],
                   zorder=3, s=25)
        for w, p in zip(report["grid"], pts):
            ax.annotate(",".join(f"{x:.2g}" for x in w), (p[i], p[j]), fontsize=6, alpha=0.7)
        # the reference policy's own point and the hypervolume's reference point are different things: the latter
        # may be fixed in the config, and only coincides with the former when it is not
        start, ref = report.get("reference_rewards"), report.get("ref_point")
        if start is not None:
            ax.scatter([start[i]], [start[j]], marker="*", s=140, color="black", label="reference policy", zorder=4)
        if ref is not None:
            ax.scatter([ref[i]], [ref[j]], marker="x", s=60, color="tab:red", label="hypervolume reference point",
                       zorder=4)
        if start is not None or ref is not None:
            ax.legend(loc="best", fontsize=7)
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"step {report['step']}: hypervolume {report['hypervolume']:.4g}")
    fig.tight_layout()
    return fig
