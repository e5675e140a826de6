"""SlurmRequeue: a signal mid-run gives a checkpoint at a step boundary, a requeue call, a stop, and an exact resume."""

import os
import signal
import stat
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from clp_lightning.callbacks import SlurmRequeue
from clp_lightning.callbacks.preemption import hpc_checkpoint_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from signal_helpers import SignalAt  # noqa: E402
from test_module import make_data, make_module, make_trainer  # noqa: E402


def trainer(directory: Path, max_steps: int, callbacks: list) -> L.Trainer:
    return make_trainer(directory, max_steps, enable_checkpointing=False, callbacks=callbacks)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A SLURM job id and an `scontrol` on PATH that records its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return calls


def test_signal_checkpoints_at_step_boundary_requeues_stops_and_resumes_exactly(tmp_path, fake_slurm):
    steps = 4
    L.seed_everything(0)
    straight = make_module()
    trainer(tmp_path / "straight", steps, []).fit(straight, datamodule=make_data())

    L.seed_everything(0)
    run = tmp_path / "run"
    preempted = trainer(run, steps, [SlurmRequeue(), SignalAt(batch_idx=1)])
    preempted.fit(make_module(), datamodule=make_data())
    # the signal came during step 2: that step finished, then the checkpoint, the requeue and the stop
    assert preempted.global_step == 2
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    checkpoint = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is removed after the run

    L.seed_everything(123)
    resumed = make_module()
    second = trainer(run, steps, [SlurmRequeue()])
    second.fit(resumed, datamodule=make_data(), ckpt_path="hpc")  # what Lightning picks by itself under SLURM
    assert second.global_step == steps
    for name, param in straight.policy.named_parameters():
        assert torch.allclose(param, dict(resumed.policy.named_parameters())[name], atol=1e-6), name
    assert fake_slurm.read_text().count("requeue") == 1


def test_outside_slurm_the_signal_keeps_its_previous_handler(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append(1))
    try:
        run = tmp_path / "run"
        fitted = trainer(run, 3, [SlurmRequeue(), SignalAt(batch_idx=1)])
        fitted.fit(make_module(), datamodule=make_data())
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert fitted.global_step == 3 and seen == [1]
    assert not list(run.glob("hpc_ckpt_*.ckpt"))


def test_array_task_id_and_next_checkpoint_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert SlurmRequeue.job_id() == "99_3"
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_7.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_8.ckpt"


@pytest.mark.parametrize("kwargs, message", [
    (dict(signal="USR1"), "signal='USR1'"),
    (dict(check_every_n_steps=0), "check_every_n_steps=0"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmRequeue(**kwargs)
