"""The comparison study's smallest version runs offline and writes its table and figure."""

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "study.py"


@pytest.mark.slow
def test_smallest_study_writes_table_and_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    variants = ["logits", "rs_lora", "mix_lora", "fixed"]
    table = study.main(["--out", str(tmp_path), "--variants", *variants, "--seeds", "0",
                        "--steps", "4", "--sft-steps", "10", "--grid-step", "0.5"])
    rows = table.splitlines()
    assert rows[0].startswith("| variant | hypervolume") and len(rows) == 2 + len(variants)
    assert [r.split("|")[1].strip() for r in rows[2:]] == variants
    assert (tmp_path / "table.md").read_text().strip() == table
    assert (tmp_path / "fronts.png").stat().st_size > 1000
    # decoding-time mixing reuses the Rewarded Soups experts instead of training its own
    assert (tmp_path / "rs_lora" / "seed0" / "expert1" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "mix_lora" / "seed0" / "expert0").exists()
    # one fixed-weighting policy per grid point (step 0.5: 3 points), each point taken at its own weighting
    fixed = json.loads((tmp_path / "fixed" / "seed0" / "report.json").read_text())
    assert fixed["grid"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]] and fixed["step"] == 3 * 4
    for g in range(3):
        own = json.loads((tmp_path / "fixed" / "seed0" / f"point{g}" / "evaluation" / "latest.json").read_text())
        assert fixed["rewards"][g] == own["rewards"][g]
    assert 0 <= fixed["hypervolume"]
    assert rows[-1].split("|")[5].strip() == "12"  # steps column: the G policies' budgets together
