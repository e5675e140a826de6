"""The end-to-end step benchmark runs its cells in subprocesses and reports paired ratios, phases and memory."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl_step.py"


@pytest.fixture(scope="module")
def rl_step():
    spec = importlib.util.spec_from_file_location("rl_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rl_step"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _args(tmp_path, **kwargs) -> argparse.Namespace:
    defaults = dict(device="cpu", warmup=1, steps=2, rounds=1, profile=True, cache=str(tmp_path))
    return argparse.Namespace(**{**defaults, **kwargs})


def test_paired_cells_report_step_time_ratio_phases_and_memory(rl_step, tmp_path):
    work = dict(size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=4, group="g")
    cells = [rl_step.Cell("none", baseline=True, **work), rl_step.Cell("lora", mode="lora", **work)]
    rows = rl_step.measure(cells, _args(tmp_path))
    base, lora = rows
    assert base["ratio_to_baseline"] == 1.0 and lora["baseline"] == "none"
    assert lora["ratio_to_baseline"] == pytest.approx(lora["seconds_per_step"] / base["seconds_per_step"])
    assert base["samples_per_second"] == pytest.approx(4 / base["seconds_per_step"])
    # LoRA trains only its adapters; the unconditioned policy trains everything
    assert lora["trainable"] < lora["total"] and base["trainable"] == base["total"]
    for row in rows:
        assert row["peak_mb"] > 100 and set(row["phases"]) == {
            "generate", "policy forward", "reference", "rewards", "backward", "optimizer"}
        assert sum(row["phases"].values()) < row["seconds_per_step"] * 1.05  # the phases are parts of the step
    text = rl_step.table("objectives", rows, "cpu")
    assert "| none |" in text and "| lora |" in text and "generate" in text


def test_trl_cell_runs_the_same_work(rl_step, tmp_path):
    pytest.importorskip("trl", reason="the TRL comparison needs the bench extra (pip install -e .[bench])")
    work = dict(size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=4)
    result = rl_step.worker(rl_step.Cell("trl", framework="trl", **work), _args(tmp_path, profile=False))
    assert len(result["times"]) == 2 and all(t > 0 for t in result["times"])


def test_unknown_reward_count_is_refused(rl_step):
    with pytest.raises(ValueError, match="objectives=9"):
        rl_step.rewards("cheap", 9)
