"""Reading grid-evaluation reports, old and new: what a reader may take from ``kl`` (see ``grid_report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# a report's numbers, any of which may be NaN (a KL not measured, the Spearman correlation of constant rewards, a
# report written by hand or by an older version; grid_report itself refuses NaN mean rewards): written as null
# (clp_lightning.files.strict_json), read back as NaN
_SCALARS = ("hypervolume", "reference_hypervolume", "alpha")
_COLUMNS = ("rewards", "rewards_se", "kl", "kl_se", "greedy_log_ratio", "ref_point", "reference_rewards",
            "vertex_gain", "vertex_gain_se", "steerability", "per_prompt_rewards", "reference_per_prompt_rewards")


def read_report(path: str | Path) -> Any:
    """The grid-evaluation report in the JSON file at ``path``, its nulls where a number belongs read as NaN
    (:func:`report_numbers`); the one way the project reads a report. Raises what reading and :func:`json.loads`
    raise (OSError, UnicodeDecodeError, json.JSONDecodeError); a legacy file with ``NaN`` in it reads too."""
    return report_numbers(json.loads(Path(path).read_text(encoding="utf-8")))


def report_numbers(report: Any) -> Any:
    """``report`` (parsed JSON) with null read as NaN where the report has a number: the hypervolumes, the rewards
    and their standard errors, the KL, the reference point, the per-objective dicts (steerability, vertex gains), the
    same in each ``by_alpha`` entry and the samples' rewards, as the report held them before it was written
    (:func:`clp_lightning.files.strict_json`). A column that is null as a whole (``by_alpha``'s ``rewards_se`` when
    none was measured) stays None, and anything that is not shaped like a report is returned as it is (a report is
    untrusted input; its readers check its shape)."""
    if not isinstance(report, dict):
        return report
    report = _numbers(report)
    if isinstance(report.get("by_alpha"), list):
        report["by_alpha"] = [_numbers(entry) if isinstance(entry, dict) else entry for entry in report["by_alpha"]]
    if isinstance(report.get("samples"), list):
        report["samples"] = [_sample_numbers(sample) for sample in report["samples"]]
    return report


def _numbers(entry: dict[str, Any]) -> dict[str, Any]:
    entry = dict(entry)
    for key in _SCALARS:
        if key in entry and entry[key] is None:
            entry[key] = math.nan
    for key in _COLUMNS:
        if isinstance(entry.get(key), (list, dict)):
            entry[key] = _nan_for_null(entry[key])
    return entry


def _sample_numbers(sample: Any) -> Any:
    if not isinstance(sample, dict):
        return sample
    sample = dict(sample)
    if isinstance(sample.get("responses"), list):
        sample["responses"] = [{**row, "rewards": _nan_for_null(row["rewards"])}
                               if isinstance(row, dict) and isinstance(row.get("rewards"), list) else row
                               for row in sample["responses"]]
    reference = sample.get("reference")
    if isinstance(reference, dict) and isinstance(reference.get("rewards"), list):
        sample["reference"] = {**reference, "rewards": _nan_for_null(reference["rewards"])}
    return sample


def _nan_for_null(value: Any) -> Any:
    """Every None inside ``value`` (nested lists and dicts) as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_nan_for_null(v) for v in value]
    if isinstance(value, dict):
        return {key: _nan_for_null(v) for key, v in value.items()}
    return value


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
