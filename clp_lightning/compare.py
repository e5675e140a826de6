"""``clp compare``: overlay the Pareto fronts of several runs (or report files) and print a comparison table.

    clp compare runs/quickstart/rl runs/other/rl --labels full-CLP logit-CLP --output compare.png
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any


def load_report(path: str | Path) -> dict[str, Any]:
    """A grid-evaluation report: a JSON file, or a run directory (its ``evaluation/latest.json``)."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "evaluation" / "latest.json", path / "latest.json"]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no grid-evaluation report at {path} (looked for {[str(c) for c in candidates]})")


def comparison_table(reports: list[dict[str, Any]], labels: list[str]) -> str:
    """Markdown table: hypervolume, steerability per objective, steps, trainable and total parameters."""
    names = reports[0]["objectives"]
    head = ["run", "hypervolume", *[f"steer {n}" for n in names], "steps", "trainable params", "total params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in zip(labels, reports):
        params = r.get("parameters", {})
        cells = [label, f"{r['hypervolume']:.4f}", *[f"{r['steerability'][n]:+.2f}" for n in names], str(r["step"]),
                 str(params.get("trainable_parameters", "?")), str(params.get("total_parameters", "?"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overlay_figure(reports: list[dict[str, Any]], labels: list[str]):
    """The fronts of several runs in one figure (pairwise projections for 3 or more objectives)."""
    import matplotlib.pyplot as plt

    from clp_lightning.evaluation import plots  # noqa: F401  (selects the Agg backend)

    names = reports[0]["objectives"]
    pairs = list(itertools.combinations(range(len(names)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        for label, r in zip(labels, reports):
            pts = r["rewards"]
            ax.plot([p[i] for p in pts], [p[j] for p in pts], "o-", ms=4, label=f"{label} (HV {r['hypervolume']:.3g})")
        ref = reports[0].get("reference_rewards")
        if ref is not None:
            ax.scatter([ref[i]], [ref[j]], marker="*", s=120, color="black", label="reference policy", zorder=4)
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def compare(argv: list[str] | None = None) -> str:
    """Command-line entry point (``clp compare``)."""
    parser = argparse.ArgumentParser(prog="clp compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or report JSON files")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the paths)")
    parser.add_argument("--output", default=None, help="write the overlay figure here (PNG)")
    args = parser.parse_args(argv)
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        raise ValueError(f"{len(labels)} labels for {len(args.runs)} runs")
    reports = [load_report(r) for r in args.runs]
    objectives = {tuple(r["objectives"]) for r in reports}
    if len(objectives) != 1:
        raise ValueError(f"runs have different objectives: {sorted(objectives)}")
    table = comparison_table(reports, labels)
    print(table)
    if args.output:
        overlay_figure(reports, labels).savefig(args.output, dpi=100)
        print(f"figure written to {args.output}")
    return table
