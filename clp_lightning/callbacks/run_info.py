"""Records what a run needs to be reproduced: seed, git revision, versions (the resolved config is saved by the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import transformers

from clp_lightning.files import write_json


def git_revision(cwd: str | Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` if the tree has changes), or None outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class RunInfo(L.Callback):
    """Writes what each run of the log directory was (seed, git revision, command line, versions, CPU numerics).

    ``fit`` writes ``run_info.json``; a resumed fit keeps the records of the runs before it under ``"earlier"``.
    ``validate``, ``test`` and ``predict`` write ``run_info_<stage>.json``, so that evaluating a checkpoint in the
    training run's directory (the README's ``clp validate``) leaves the record of the training alone.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn ("fit", "validate", ...)
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        info = {
            "stage": stage,
            "seed": _seed(),
            "git_revision": git_revision(Path(__file__).resolve().parent),
            "argv": sys.argv,
            "versions": {
                "torch": torch.__version__, "lightning": L.__version__, "transformers": transformers.__version__
            },
            "world_size": trainer.world_size,
            # what CPU results depend on besides the seed (see `clp quickstart`'s pinning)
            "cpu_numerics": {"threads": torch.get_num_threads(), "kernels": torch.backends.cpu.get_cpu_capability(),
                             "MKL_CBWR": os.environ.get("MKL_CBWR")},
        }
        path = directory / ("run_info.json" if stage == "fit" else f"run_info_{stage}.json")
        if stage == "fit":
            earlier = _read(path)
            if earlier is not None:
                prior = earlier.pop("earlier", [])
                info["earlier"] = [*(prior if isinstance(prior, list) else []), earlier]
        write_json(path, info)


def _read(path: Path) -> dict | None:
    """An earlier record, or None when there is none (or it is unreadable: it is then replaced)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None
