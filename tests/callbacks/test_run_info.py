"""RunInfo: the record of a training run survives its resumption and the evaluation of its checkpoints."""

import json
import sys

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from clp_lightning.callbacks import RunInfo


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[RunInfo()], **kwargs)


def test_fit_resume_and_validate_each_keep_their_record(tmp_path, monkeypatch):
    L.seed_everything(3)
    monkeypatch.setattr(sys, "argv", ["clp", "fit", "--first"])
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(BoringModel())
    first = json.loads((tmp_path / "run_info.json").read_text())
    assert first["stage"] == "fit" and first["argv"][-1] == "--first" and first["seed"] == 3
    assert "earlier" not in first

    monkeypatch.setattr(sys, "argv", ["clp", "validate", "--ckpt_path", "last.ckpt"])
    trainer(tmp_path, limit_val_batches=1).validate(BoringModel())
    assert json.loads((tmp_path / "run_info.json").read_text()) == first  # the training's record, untouched
    assert json.loads((tmp_path / "run_info_validate.json").read_text())["argv"][-1] == "last.ckpt"

    for flag in ("--resumed", "--resumed-again"):
        monkeypatch.setattr(sys, "argv", ["clp", "fit", flag])
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(BoringModel())
    latest = json.loads((tmp_path / "run_info.json").read_text())
    assert latest["argv"][-1] == "--resumed-again"
    assert [r["argv"][-1] for r in latest["earlier"]] == ["--first", "--resumed"]
    assert not list(tmp_path.glob(".*.tmp"))
