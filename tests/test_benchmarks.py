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


def _run(times: list[float], peak_mb: float = 100.0, **phases: list[float]) -> dict:
    """What a worker reports for one cell in one round."""
    return {"times": times, "phases": phases, "peak_mb": peak_mb, "trainable": 10, "total": 20}


def test_ratio_is_the_median_over_rounds_of_paired_step_time_ratios(rl_step, monkeypatch, tmp_path):
    work = dict(prompts=2, samples=3)  # 6 samples per step
    cells = [
        rl_step.Cell("base", baseline=True, group="g", **work), rl_step.Cell("lora", mode="lora", group="g", **work),
        rl_step.Cell("base_h", baseline=True, group="h", **work), rl_step.Cell("all", mode="all", group="h", **work),
    ]
    runs = {  # three rounds each; a run's time is the median of its steps, so the 50 s outlier does not count
        "base": [_run([1.0, 1.0, 50.0]), _run([2.0]), _run([1.0])],
        "lora": [_run([1.5], 300.0, generate=[0.4, 0.5, 9.0]), _run([2.0], 100.0, generate=[1.0]),
                 _run([3.0], 200.0, generate=[0.6])],
        "base_h": [_run([4.0])] * 3,
        "all": [_run([6.0])] * 3,
    }
    pending = {name: iter(r) for name, r in runs.items()}
    monkeypatch.setattr(rl_step, "run_cell", lambda cell, args: next(pending[cell.name]))
    rows = {row["cell"]["name"]: row for row in rl_step.measure(cells, _args(tmp_path, rounds=3))}
    assert all(next(p, None) is None for p in pending.values())  # each cell ran once per round
    # lora / base per round: 1.5, 1.0, 3.0 -> 1.5 (the unpaired ratio of medians, 2.0 / 1.0, would be 2.0)
    assert rows["lora"]["ratio_to_baseline"] == pytest.approx(1.5) and rows["lora"]["baseline"] == "base"
    assert rows["lora"]["seconds_per_step"] == pytest.approx(2.0)
    assert rows["lora"]["samples_per_second"] == pytest.approx(3.0)  # 6 samples in 2 s
    assert rows["lora"]["peak_mb"] == 200.0 and rows["lora"]["phases"] == {"generate": pytest.approx(0.6)}
    assert rows["base"]["ratio_to_baseline"] == 1.0 and rows["base"]["seconds_per_step"] == pytest.approx(1.0)
    # each cell is compared with its own group's baseline: 6 s against base_h's 4 s
    assert rows["all"]["ratio_to_baseline"] == pytest.approx(1.5) and rows["all"]["baseline"] == "base_h"

    text = rl_step.table("modes", list(rows.values()), "cpu")
    assert "| lora | 2.000 | 3.0 | 1.500 | base | 200 | 10 | 20 | **missed** (target <= 1.2) |" in text
    assert "| all | 6.000 | 1.0 | 1.500 | base_h | 100 | 10 | 20 | met |" in text  # attention-like modes: <= 1.5
    assert "| base | 1.000 | 6.0 | 1.000 | base | 100 | 10 | 20 |  |" in text  # a baseline has no target
    # the phase table: generate took 0.6 of 2 s, the rest is not attributed to a phase
    assert "| lora | 30% | 0% | 0% | 0% | 0% | 0% | 70% |" in text


def test_trl_target_is_one_and_a_half_times_the_steps_per_second(rl_step):
    row = lambda ratio: {"cell": {"baseline": False, "mode": "none"}, "ratio_to_baseline": ratio}  # noqa: E731
    assert rl_step.verdict("trl", row(0.66)) == "met"  # 1 / 0.66 > 1.5 steps per second
    assert rl_step.verdict("trl", row(0.67)).startswith("**missed**")


def test_paired_cells_run_in_subprocesses_and_report_phases_and_memory(rl_step, tmp_path):
    work = dict(size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=4, group="g")
    cells = [rl_step.Cell("none", baseline=True, **work), rl_step.Cell("lora", mode="lora", **work)]
    rows = rl_step.measure(cells, _args(tmp_path))
    base, lora = rows
    assert base["ratio_to_baseline"] == 1.0 and lora["baseline"] == "none"
    assert lora["ratio_to_baseline"] > 0 and base["seconds_per_step"] > 0
    # LoRA trains only its adapters; the unconditioned policy trains everything
    assert 0 < lora["trainable"] < lora["total"] and base["trainable"] == base["total"]
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
