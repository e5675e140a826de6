"""The README's main job, on its smallest setting, and the README's references to files."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_name_existing_files():
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"(conf/[\w/.-]+\.yaml)", readme)):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    assert "clp quickstart" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest -q" in ci and "pytest -q -m slow" in ci and "pytest -q && pytest -q -m slow" in readme


@pytest.mark.slow
def test_quickstart_smallest_setting(tmp_path, capsys):
    from clp_lightning.quickstart import quickstart

    report = quickstart(["--run-dir", str(tmp_path / "run"), "--sft-steps", "30", "--rl-steps", "4"])
    out = capsys.readouterr().out
    assert "mean reward per objective" in out and "(0.5, 0.5)" in out
    evaluation = tmp_path / "run" / "rl" / "evaluation"
    assert (evaluation / "metrics.csv").exists() and list(evaluation.glob("*_front.png"))
    assert (tmp_path / "run" / "rl" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "sft" / "model" / "config.json").exists()
    assert report["objectives"] == ["relevance", "brevity"] and len(report["grid"]) == 11
    assert list((tmp_path / "run" / "rl").glob("events.out.tfevents.*"))
