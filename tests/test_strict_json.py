"""Every JSON file the project writes is strict JSON (a NaN or infinite number is written as null, which other
languages' parsers and a browser's ``JSON.parse`` accept), and every reader takes that null as the NaN it was: a
report with a NaN in it reads, tabulates and draws as it did when the file said ``NaN``."""

import json
import math
from pathlib import Path

import pytest
from test_compare import new_report

from clp_lightning.compare import compare
from clp_lightning.evaluation.reports import read_report, report_numbers
from clp_lightning.export import _evaluation_section, find_evaluation
from clp_lightning.files import json_text, write_json
from clp_lightning.quickstart import print_summary
from clp_lightning.serve.backends import read_report as serve_report


def strict_loads(text: str):
    """``json.loads`` as a strict parser reads: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def nan_report() -> dict:
    """A report with NaN where real ones have it: a KL not measured at one point, a reward model's overflow in a
    sample, a vertex gain's SE of one prompt, a front of an alpha whose KL was off."""
    report = new_report()
    report["kl"][1] = math.nan
    report["vertex_gain_se"] = {"relevance": math.nan, "brevity": 0.1}
    report["greedy_log_ratio"] = [0.1, math.nan, 0.3]
    report["samples"] = [{"prompt": "p", "responses": [{"weights": "0.5,0.5", "response": "r",
                                                         "rewards": [math.nan, 0.5]}],
                          "reference": {"response": "s", "rewards": [0.1, math.nan]}}]
    report["by_alpha"] = [{"alpha": 0.1, "rewards": report["rewards"], "rewards_se": None, "kl": [math.nan] * 3,
                           "kl_se": None, "hypervolume": math.nan, "steerability": {"relevance": math.nan,
                                                                                     "brevity": 1.0}}]
    return report


def test_json_text_writes_non_finite_numbers_as_null(tmp_path):
    value = {"a": [1.0, math.nan, (math.inf, -math.inf)], "b": {"c": math.nan}, "n": None, "i": 3}
    assert strict_loads(json_text(value)) == {"a": [1.0, None, [None, None]], "b": {"c": None}, "n": None, "i": 3}
    write_json(tmp_path / "x.json", value)
    assert strict_loads((tmp_path / "x.json").read_text()) == strict_loads(json_text(value))
    with pytest.raises(ValueError, match="not JSON compliant"):  # the guard: a value only `default` sees
        json_text({"x": object()}, default=lambda _: math.nan)


@pytest.fixture
def written(tmp_path) -> tuple[Path, Path]:
    """The same NaN report written as the project writes it now (strict) and as it did before (``NaN``)."""
    report = nan_report()
    strict, legacy = tmp_path / "strict" / "latest.json", tmp_path / "legacy" / "latest.json"
    for path in (strict, legacy):
        path.parent.mkdir()
    strict.write_text(json_text(report, indent=2))
    legacy.write_text(json.dumps(report, indent=2))
    strict_loads(strict.read_text())
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_loads(legacy.read_text())
    return strict, legacy


def test_a_report_reads_back_with_its_nans(written):
    strict, legacy = written
    back = read_report(strict)
    assert repr(back) == repr(read_report(legacy)) == repr(nan_report())  # repr: nan == nan, None != nan
    # a column that is null as a whole stays None, and what is not a report passes through
    assert back["by_alpha"][0]["rewards_se"] is None and math.isnan(back["by_alpha"][0]["hypervolume"])
    assert report_numbers([None]) == [None] and report_numbers({"samples": 3, "kl": None}) == {"samples": 3,
                                                                                                 "kl": None}


def test_every_reader_reads_a_strict_report_as_it_read_nan(written, capsys):
    strict, legacy = written
    # clp compare: the table (n/a for a KL the report did not measure), from the file and from the run directory
    tables = [compare([str(p), "--labels", "run"]) for p in (strict, legacy, strict.parent)]
    assert tables[0] == tables[1] == tables[2] and "| n/a |" in tables[0]
    # clp serve: the front the page draws
    names = nan_report()["objectives"]
    assert repr(serve_report(strict, names)) == repr(serve_report(legacy, names))
    # clp export: the report it copies, and the card's evaluation section
    found = [find_evaluation("unused", str(p), names)[1] for p in (strict, legacy)]
    assert repr(found[0]) == repr(found[1])
    sections = [_evaluation_section(r, Path("latest.json"), False) for r in found]
    assert sections[0] == sections[1] and not any("could not be tabulated" in line for line in sections[0])
    # the quick start's summary (the KL line leaves out the point whose KL was not measured)
    summaries = []
    for p in (strict, legacy):
        capsys.readouterr()
        print_summary(read_report(p))
        summaries.append(capsys.readouterr().out)
    assert summaries[0] == summaries[1] and "KL to the reference" in summaries[0]
