"""A 2-process DDP fit on CPU (gloo): ranks see different prompts and weightings, and metrics are synchronised."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")


@pytest.mark.ddp
def test_two_process_fit_splits_data_and_syncs_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "2"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank trained on its own prompts and drew its own weightings
    assert ranks[0]["ids"] and ranks[1]["ids"]  # (disjoint sets would hold trivially if a rank recorded none)
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])
    assert ranks[0]["weights"] != ranks[1]["weights"]
    # DDP keeps the replicas identical
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6)
    # train metrics are reduced across ranks (sync_dist) and the grid metrics are computed from both ranks' prompts
    for key in ("train/reward/brevity", "train/kl", "val/pareto/hypervolume", "val/steerability/brevity"):
        assert ranks[0]["logged"][key] == pytest.approx(ranks[1]["logged"][key], abs=1e-6, nan_ok=True), key
    assert ranks[0]["report"]["rewards"] == ranks[1]["report"]["rewards"]
