"""The comparison study's smallest version runs offline and writes its table and figure."""

import importlib.util
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "study.py"


@pytest.mark.slow
def test_smallest_study_writes_table_and_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    table = study.main(["--out", str(tmp_path), "--variants", "logits", "rs_lora", "--seeds", "0",
                        "--steps", "4", "--sft-steps", "10"])
    rows = table.splitlines()
    assert rows[0].startswith("| variant | hypervolume") and len(rows) == 4
    assert rows[2].startswith("| logits |") and rows[3].startswith("| rs_lora |")
    assert (tmp_path / "table.md").read_text().strip() == table
    assert (tmp_path / "fronts.png").stat().st_size > 1000
    assert (tmp_path / "rs_lora" / "seed0" / "expert1" / "checkpoints" / "last.ckpt").exists()
