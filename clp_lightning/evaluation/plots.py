"""Figures of Pareto fronts: this epoch's grid points labelled by ``w``, the reference point, earlier epochs faded;
for a policy conditioned on alpha, one front per alpha with its KL in the legend."""

from __future__ import annotations

import itertools
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clp_lightning.evaluation.reports import sampled_kl  # noqa: E402


def series_style(k: int) -> dict[str, str]:
    """Colour and line style of the ``k``-th series of a figure with many: the 10 default colours, then the same
    colours dashed, dotted, dash-dotted, so that no two of the first 40 series look alike."""
    return {"color": f"C{k % 10}", "linestyle": ("-", "--", ":", "-.")[k // 10 % 4]}


def _kl_label(kl: float) -> str:
    return "KL n/a" if math.isnan(kl) else f"KL {kl:.3g}"


def front_figure(report: dict[str, Any], history: list[dict[str, Any]] | None = None, title: str | None = None):
    """One panel for 2 objectives, the pairwise projections for 3 or more.

    Error bars are the rewards' standard errors over prompts (reports that have ``rewards_se``). A report with
    ``by_alpha`` draws one front per alpha, coloured, with alpha, mean KL over the grid and hypervolume in the legend.
    """
    names = report["objectives"]
    if len(names) < 2:
        raise ValueError(f"a front figure needs 2 or more objectives, got {names}")
    pairs = list(itertools.combinations(range(len(names)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    # fronts of other objectives (another module evaluated by the same callback) have no place on these axes
    history = [past for past in history or [] if all(len(p) == len(names) for p in past["rewards"])]
    by_alpha = report.get("by_alpha") or []
    for ax, (i, j) in zip(axes[0], pairs):
        for age, past in enumerate(history[-5:]):
            pts = past["rewards"]
            ax.plot([p[i] for p in pts], [p[j] for p in pts], "o-", color="grey", alpha=0.15 + 0.1 * age, ms=3)
        if by_alpha:
            colours = plt.get_cmap("viridis")([k / max(len(by_alpha) - 1, 1) * 0.85 for k in range(len(by_alpha))])
            for entry, colour in zip(by_alpha, colours):
                _front(ax, entry, i, j, colour, label=f"alpha {entry['alpha']:g}: {_kl_label(sampled_kl(entry))}, "
                                                      f"HV {entry['hypervolume']:.3g}")
        else:
            _front(ax, report, i, j, "tab:blue", label=None)
            ax.scatter([p[i] for p in report["rewards"]], [p[j] for p in report["rewards"]],
                       c=["tab:blue" if f else "tab:orange" for f in report["front_mask"]], zorder=3, s=25)
            for w, p in zip(report["grid"], report["rewards"]):
                ax.annotate(",".join(f"{x:.2g}" for x in w), (p[i], p[j]), fontsize=6, alpha=0.7)
        # the reference policy's own point and the hypervolume's reference point are different things: the latter
        # may be fixed in the config, and only coincides with the former when it is not
        start, ref = report.get("reference_rewards"), report.get("ref_point")
        if start is not None:
            ax.scatter([start[i]], [start[j]], marker="*", s=140, color="black", label="reference policy", zorder=4)
        if ref is not None:
            ax.scatter([ref[i]], [ref[j]], marker="x", s=60, color="tab:red", label="hypervolume reference point",
                       zorder=4)
        if start is not None or ref is not None or by_alpha:
            ax.legend(loc="best", fontsize=7)
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
    kl = sampled_kl(report)
    default = f"step {report['step']}: hypervolume {report['hypervolume']:.4g}" + (
        "" if math.isnan(kl) else f", KL {kl:.3g} (mean over the grid)")
    fig.suptitle(title or default)
    fig.tight_layout()
    return fig


def _front(ax, front: dict[str, Any], i: int, j: int, colour: Any, label: str | None) -> None:
    """The line through a front's grid points, with standard-error bars where the front has them."""
    pts, se = front["rewards"], front.get("rewards_se")
    xs, ys = [p[i] for p in pts], [p[j] for p in pts]
    if se is not None:
        ax.errorbar(xs, ys, xerr=[s[i] for s in se], yerr=[s[j] for s in se], fmt="o-" if label else "-",
                    color=colour, alpha=0.6 if label is None else 0.9, ms=4, elinewidth=0.8, capsize=1.5,
                    label=label)
    else:
        ax.plot(xs, ys, "o-" if label else "-", color=colour, alpha=0.5 if label is None else 0.9, ms=4, label=label)
