"""``clp compare``: overlay the Pareto fronts of several runs (or report files) and print a comparison table.

    clp compare runs/quickstart/rl runs/other/rl --labels full-CLP logit-CLP --output compare.png

The table gives each run's hypervolume with a bootstrap interval over its prompts and, for every run evaluated on
the same prompts as the first, the paired difference to the first run with its interval
(:func:`clp_lightning.evaluation.paired_bootstrap`); reports written before per-prompt rows were kept show ``n/a``.

A hypervolume is measured from a reference point, by default each report's own (the config's ``ref_point``, or the
reference policy's mean rewards on the prompts it evaluated): the line under the table names it, and says when the
runs' points differ, whose hypervolumes are then not comparable. ``--ref-point`` measures every run from one point
(the rewards are the reports', only the metric's reference point moves).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clp_lightning.callbacks.checkpoint import check_output_file
from clp_lightning.checks import is_integer, is_number
from clp_lightning.evaluation.reports import read_report, sampled_kl
from clp_lightning.files import figure_format, save_figure_atomic

REBASED = "a fixed point"  # ref_point_from of a report measured from another point than its own


REPORT_KEYS = ("objectives", "grid", "rewards", "hypervolume", "steerability", "step")  # what the table reads


def load_report(path: str | Path) -> dict[str, Any]:
    """A grid-evaluation report: a JSON file, or a run directory (its ``evaluation/latest.json``).

    Raises:
        FileNotFoundError: no report there.
        ValueError: the file is not JSON, or not a grid-evaluation report (the message names the file).
    """
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "evaluation" / "latest.json", path / "latest.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                report = read_report(candidate)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{str(candidate)!r} is not a grid-evaluation report: it is not JSON "
                                 f"({err})") from None
            # a results.json or a config given by mistake would fail later with a bare KeyError and a traceback
            missing = [k for k in REPORT_KEYS if k not in report] if isinstance(report, dict) else list(REPORT_KEYS)
            if missing:
                raise ValueError(f"{str(candidate)!r} is not a grid-evaluation report: it has no {missing} (clp fit "
                                 "and clp validate write one under <run>/evaluation/)")
            problem = report_problem(report)
            if problem is not None:  # a report is untrusted input: not a KeyError or IndexError deep in the table
                raise ValueError(f"{str(candidate)!r} is not a well-formed grid-evaluation report: {problem}")
            return report
    raise FileNotFoundError(f"no grid-evaluation report at {path} (looked for {[str(c) for c in candidates]})")


def report_problem(report: dict[str, Any]) -> str | None:
    """What in ``report`` (which has every key of ``REPORT_KEYS``) the table and the figure could not read, naming
    the field and what it should be, or None when they can read all of it. The hypervolume, steerability and KL may
    be NaN (null on disk); the rewards and the points a hypervolume is measured from may not (grid_report refuses
    them, and a hypervolume of them is undefined)."""
    objectives = report["objectives"]
    if not (isinstance(objectives, list) and objectives and all(isinstance(n, str) for n in objectives)
            and len(set(objectives)) == len(objectives)):
        return f"objectives {objectives!r} is not a list of distinct names"
    m = len(objectives)

    def numbers(value: Any, n: int, finite: bool = True) -> bool:
        return isinstance(value, list) and len(value) == n and all(
            is_number(x) and (math.isfinite(x) or not finite) for x in value)

    def rows(value: Any, n: int | None = None) -> bool:  # n (or, if None, one or more) lists of m numbers
        return isinstance(value, list) and (len(value) >= 1 if n is None else len(value) == n) and all(
            numbers(row, m) for row in value)

    if not rows(report["grid"]):
        return f"grid is not a list of weightings of {m} finite numbers each (one per objective {objectives})"
    g = len(report["grid"])
    if not rows(report["rewards"], g):
        return (f"rewards is not {g} rows (one per grid weighting) of {m} finite numbers (one per objective "
                f"{objectives})")
    if not is_number(report["hypervolume"]):
        return f"hypervolume {report['hypervolume']!r} is not a number"
    steerability = report["steerability"]
    if not (isinstance(steerability, dict) and all(is_number(steerability.get(n)) for n in objectives)):
        return f"steerability {steerability!r} does not give a number for each objective {objectives}"
    if not is_integer(report["step"]):
        return f"step {report['step']!r} is not an integer"
    for key in ("ref_point", "reference_rewards"):
        if key in report and not numbers(report[key], m):
            return f"{key} {report[key]!r} is not {m} finite numbers (one per objective {objectives})"
    if "kl_se" in report and report.get("kl") and not numbers(report["kl"], g, finite=False):  # what sampled_kl reads
        return f"kl is not {g} numbers (one per grid weighting)"
    if "per_prompt_rewards" in report:
        if "ref_point" not in report:  # the bootstrap measures each resample from it
            return "it has per_prompt_rewards but no ref_point to measure their hypervolumes from"
        per_prompt = report["per_prompt_rewards"]
        if not (isinstance(per_prompt, list) and len(per_prompt) == g and all(rows(p) for p in per_prompt)
                and len({len(p) for p in per_prompt}) == 1):
            return (f"per_prompt_rewards is not {g} lists (one per grid weighting) of the same number of prompts, "
                    f"each {m} finite numbers (one per objective {objectives})")
    if not isinstance(report.get("parameters", {}), dict):
        return f"parameters {report['parameters']!r} is not a dict of parameter counts"
    return None


def rebased(report: dict[str, Any], ref_point: Sequence[float], source: str = REBASED) -> dict[str, Any]:
    """``report`` with its hypervolumes measured from ``ref_point`` instead of its own point: the rewards are what
    they were, only the metric's reference point moves (the bootstrap intervals read ``ref_point`` from it too).

    Raises:
        ValueError: ``ref_point`` has not one value per objective.
    """
    import torch

    from clp_lightning.evaluation import hypervolume

    point = torch.tensor(ref_point, dtype=torch.float64)
    if point.shape != (len(report["objectives"]),):
        raise ValueError(f"ref_point {list(ref_point)} has {point.numel()} values; the report has "
                         f"{len(report['objectives'])} objectives {report['objectives']}")
    moved = {**report, "ref_point": point.tolist(), "ref_point_from": source,
             "hypervolume": hypervolume(torch.tensor(report["rewards"], dtype=torch.float64), point)}
    if "reference_rewards" in report:
        moved["reference_hypervolume"] = hypervolume(torch.tensor([report["reference_rewards"]],
                                                                  dtype=torch.float64), point)
    return moved


def reference_points_line(reports: list[dict[str, Any]], labels: list[str]) -> str:
    """The point the table's hypervolumes are measured from, or a warning naming each run's when they differ."""
    def show(r: dict[str, Any]) -> str:
        return "(" + ", ".join(f"{x:.4g}" for x in r["ref_point"]) + ")" if "ref_point" in r else "(not recorded)"

    points = {show(r) for r in reports}
    if len(points) == 1:
        return f"Hypervolumes from {points.pop()} ({reports[0].get('ref_point_from', 'not recorded')})."
    each = "; ".join(f"{label} {show(r)}" for label, r in zip(labels, reports))
    return (f"Hypervolumes from each run's own reference point, and these differ ({each}): hypervolumes from "
            "different points are not comparable; --ref-point measures every run from one point.")


# what makes two grid evaluations measure the same thing, besides the prompts (paired on their digest) and the grid
EVALUATION_KEYS = ("generation", "num_samples", "alpha", "num_prompts")


def evaluation_line(reports: list[dict[str, Any]], labels: list[str]) -> str | None:
    """A warning naming each evaluation setting (decoding, samples per prompt, KL strength, number of prompts) on
    which the runs that record them differ, or None when they agree."""
    settings = []
    for label, report in zip(labels, reports):
        evaluation = report.get("evaluation")
        if isinstance(evaluation, dict):
            flat = {f"{key}.{k}": v for key in EVALUATION_KEYS if isinstance(evaluation.get(key), dict)
                    for k, v in evaluation[key].items()}
            flat.update({key: evaluation[key] for key in EVALUATION_KEYS
                         if key in evaluation and not isinstance(evaluation[key], dict)})
            settings.append((label, flat))
    keys = sorted({key for _, flat in settings for key in flat})
    differ = [key for key in keys if len({json.dumps(flat.get(key), sort_keys=True) for _, flat in settings}) > 1]
    if not differ:
        return None
    each = "; ".join(f"{key}: " + ", ".join(f"{label} {flat.get(key)!r}" for label, flat in settings)
                     for key in differ)
    return (f"The runs were evaluated differently ({each}): their numbers are not measured the same way; "
            "clp validate with one config measures them alike.")


def grid_line(reports: list[dict[str, Any]], labels: list[str]) -> str | None:
    """A warning naming each run's grid of weightings when the runs' grids differ, or None when they agree: a front
    through other weightings has another hypervolume and steerability even from the same policy."""
    grids = [json.dumps([[round(x, 6) for x in w] for w in r["grid"]]) for r in reports]
    if len(set(grids)) == 1:
        return None
    each = "; ".join(f"{label} {len(r['grid'])} weightings" for label, r in zip(labels, reports))
    return (f"The runs were evaluated on different grids of weightings ({each}): their hypervolumes and "
            "steerabilities are not measured the same way; clp validate with one config measures them alike.")


def comparison_table(reports: list[dict[str, Any]], labels: list[str], num_resamples: int = 2000) -> str:
    """Markdown table: hypervolume, steerability per objective, steps, trainable and total parameters, the KL to the
    reference (sampled, mean over the grid), the hypervolume's 95% bootstrap interval and the paired difference to
    the first run (95% interval), ``n/a`` where a report lacks what they need; then the line that names the point
    the hypervolumes are measured from (:func:`reference_points_line`), and warnings when the runs' grids
    (:func:`grid_line`) or evaluation settings (:func:`evaluation_line`) differ."""
    from clp_lightning.evaluation.bootstrap import bootstrap_ci, paired_bootstrap

    names = reports[0]["objectives"]
    head = ["run", "hypervolume", *[f"steer {n}" for n in names], "steps", "trainable params", "total params", "KL",
            "HV 95% CI", f"HV - {labels[0]} (95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, (label, r) in enumerate(zip(labels, reports)):
        params, kl = r.get("parameters", {}), sampled_kl(r)
        interval = difference = "n/a"
        if "per_prompt_rewards" in r:
            low, high = bootstrap_ci(r, num_resamples)["ci"]
            interval = f"[{low:.4f}, {high:.4f}]"
        if k > 0 and _pairable(reports[0], r):
            paired = paired_bootstrap(r, reports[0], num_resamples)
            difference = f"{paired['difference']:+.4f} [{paired['ci'][0]:+.4f}, {paired['ci'][1]:+.4f}]"
        cells = [label, f"{r['hypervolume']:.4f}", *[f"{r['steerability'][n]:+.2f}" for n in names], str(r["step"]),
                 str(params.get("trainable_parameters", "?")), str(params.get("total_parameters", "?")),
                 "n/a" if math.isnan(kl) else f"{kl:.3f}", interval, difference]
        lines.append("| " + " | ".join(cells) + " |")
    differently = [line for line in (grid_line(reports, labels), evaluation_line(reports, labels)) if line]
    return "\n".join([*lines, "", reference_points_line(reports, labels), *differently])


def _pairable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two reports can be compared prompt by prompt (see :func:`paired_bootstrap`)."""
    keys = ("objectives", "grid", "ref_point", "prompts_sha256")
    return all(k in a and k in b and a[k] == b[k] for k in keys) and "per_prompt_rewards" in a and (
        "per_prompt_rewards" in b)


def overlay_figure(reports: list[dict[str, Any]], labels: list[str]):
    """The fronts of several runs in one figure (pairwise projections for 3 or more objectives)."""
    import matplotlib.pyplot as plt

    from clp_lightning.evaluation import plots  # selects the Agg backend

    names = reports[0]["objectives"]
    pairs = list(itertools.combinations(range(len(names)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        for k, (label, r) in enumerate(zip(labels, reports)):
            pts, kl = r["rewards"], sampled_kl(r)
            kl_text = "" if math.isnan(kl) else f", KL {kl:.3g}"
            ax.plot([p[i] for p in pts], [p[j] for p in pts], marker="o", ms=4, **plots.series_style(k),
                    label=f"{label} (HV {r['hypervolume']:.3g}{kl_text})")
        # each run's reference policy (its warm start, on its prompts): one star when they agree, else one per run
        # in the run's colour, never the first run's star standing for every run's
        starts = [(k, label, r["reference_rewards"]) for k, (label, r) in enumerate(zip(labels, reports))
                  if "reference_rewards" in r]
        if len({json.dumps(start) for _, _, start in starts}) == 1:
            ax.scatter([starts[0][2][i]], [starts[0][2][j]], marker="*", s=120, color="black",
                       label="reference policy", zorder=4)
        else:
            for k, label, start in starts:
                ax.scatter([start[i]], [start[j]], marker="*", s=120, color=plots.series_style(k)["color"],
                           edgecolors="black", label=f"{label}: reference policy", zorder=4)
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=3)  # long enough to show dashes
    fig.tight_layout()
    return fig


def compare(argv: list[str] | None = None) -> str:
    """Command-line entry point (``clp compare``)."""
    parser = argparse.ArgumentParser(prog="clp compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or report JSON files")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the paths)")
    parser.add_argument("--output", default=None,
                        help="write the overlay figure here (format from the extension: .png, .pdf, .svg, ...)")
    parser.add_argument("--ref-point", default=None, metavar="X,Y[,...]",
                        help="measure every run's hypervolume from this point, one value per objective (default: "
                             "each report's own, which may differ between runs)")
    from clp_lightning.steer import attach_weights

    args = parser.parse_args(attach_weights(argv, "--ref-point"))  # a negative point, "-2,-3", is not an option
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        raise ValueError(f"{len(labels)} labels for {len(args.runs)} runs")
    ref_point = None
    if args.ref_point is not None:
        from clp_lightning.conditioning.weights import parse_weights  # a comma-separated list of numbers

        try:
            ref_point = parse_weights(args.ref_point)
        except ValueError:
            raise ValueError(f"--ref-point {args.ref_point!r} is not a comma-separated list of numbers, e.g. "
                             "'0,-3'") from None
        if not all(math.isfinite(x) for x in ref_point):
            raise ValueError(f"--ref-point {args.ref_point!r} has a value that is not finite")
    reports = [load_report(r) for r in args.runs]
    objectives = {tuple(r["objectives"]) for r in reports}
    if len(objectives) != 1:
        each = "; ".join(f"{label} {r['objectives']}" for label, r in zip(labels, reports))
        raise ValueError(f"the runs have different objectives ({each}): their columns would not line up; compare runs "
                         "of the same objectives, in the same order")
    if ref_point is not None:
        reports = [rebased(r, ref_point, "--ref-point") for r in reports]
    output = Path(args.output) if args.output else None
    if output is not None:  # found only after the tables' bootstrap otherwise
        check_output_file(output, "--output", "figure")
        figure_format(output, "--output")
        if len(reports[0]["objectives"]) < 2:  # a front has no plane to be drawn in
            raise ValueError(f"--output: a figure of fronts needs 2 or more objectives; these runs have "
                             f"{reports[0]['objectives']} (leave --output out for the table alone)")
    table = comparison_table(reports, labels)
    print(table)
    if output is not None:
        # a crash mid-write keeps the figure that was there, never half of the new one
        save_figure_atomic(overlay_figure(reports, labels), output, dpi=100)
        print(f"figure written to {args.output}")
    return table
