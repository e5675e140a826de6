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

from clp_lightning.callbacks import SafeCheckpointIO  # noqa: E402


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
    requeue = SlurmRequeue()
    preempted = trainer(run, steps, [requeue, SignalAt(batch_idx=1)])
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
    assert requeue.exit_code is None  # requeued: the job resumes by itself


@pytest.mark.parametrize("case", ["requeue_off", "scontrol_fails", "no_scontrol"])
def test_a_stop_that_no_requeue_follows_exits_as_interrupted(tmp_path, fake_slurm, monkeypatch, case):
    """The job would otherwise end with exit 0, as if finished, though nothing will continue it."""
    if case == "scontrol_fails":
        (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    if case == "no_scontrol":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    requeue = SlurmRequeue(requeue=case != "requeue_off")
    stopped = trainer(tmp_path / "run", 4, [requeue, SignalAt(batch_idx=1)])
    stopped.fit(make_module(), datamodule=make_data())
    assert stopped.global_step == 2 and (tmp_path / "run" / "hpc_ckpt_1.ckpt").exists()
    assert requeue.exit_code == 128 + signal.SIGUSR1


def test_clp_fit_exits_as_interrupted_when_no_requeue_follows(tmp_path, fake_slurm, capsys):
    from cli_helpers import TINY_CONFIG, clp, write_config

    config = {**TINY_CONFIG, "trainer": {**TINY_CONFIG["trainer"], "max_steps": 4, "default_root_dir": str(tmp_path),
                                         "enable_checkpointing": False,
                                         "callbacks": [{"class_path": "signal_helpers.SignalAt",
                                                        "init_args": {"batch_idx": 1, "signum": int(signal.SIGUSR1)}}]}}
    code, err = clp(capsys, "fit", "--config", str(write_config(tmp_path / "fit.yaml", config)),
                    "--slurm_requeue.requeue=false")
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert (tmp_path / "hpc_ckpt_1.ckpt").exists()


@pytest.mark.ddp
def test_every_ddp_rank_exits_as_interrupted_when_scontrol_requeue_fails(tmp_path, fake_slurm):
    """Only rank 0 runs ``scontrol requeue``; a rank that exits 0 while rank 0 exits 138 makes a launcher (torchrun,
    srun) report the ranks' outcomes inconsistently."""
    import copy
    import subprocess

    import yaml
    from cli_helpers import TINY_CONFIG

    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(max_steps=50, devices=2, strategy="ddp", enable_checkpointing=False, callbacks=[
        {"class_path": "signal_helpers.SignalAt", "init_args": {"batch_idx": 1, "signum": int(signal.SIGUSR1)}}])
    config["data"]["init_args"]["num_train"] = 8  # 2 batches per rank and epoch
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    exits = tmp_path / "exits"
    exits.mkdir()
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CLP_EXIT_DIR=str(exits),
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "exit_recorder", "fit", "--config", str(tmp_path / "fit.yaml"),
                           f"--trainer.default_root_dir={tmp_path}"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 128 + signal.SIGUSR1, done.stderr[-3000:]
    codes = sorted(int(p.read_text()) for p in exits.iterdir())
    assert codes == [128 + signal.SIGUSR1] * 2, done.stderr[-3000:]
    assert (tmp_path / "hpc_ckpt_1.ckpt").exists()


class _SlowCheckpointIO(SafeCheckpointIO):
    """A checkpoint write that takes a while (a real model's checkpoint on a network file system)."""

    def save_checkpoint(self, *args, **kwargs) -> None:
        import time

        time.sleep(1.0)
        super().save_checkpoint(*args, **kwargs)


def test_requeue_waits_for_an_asynchronous_checkpoint_write(tmp_path, fake_slurm):
    """With AsyncCheckpointIO, trainer.save_checkpoint returns before the file exists; SLURM ends the job soon after
    `scontrol requeue`, so a requeue before the write lands restarts the job without its checkpoint."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    run = tmp_path / "run"
    (tmp_path / "bin" / "scontrol").write_text(
        f'#!/bin/sh\n[ -f {run}/hpc_ckpt_1.ckpt ] && echo written >> {fake_slurm} || echo missing >> {fake_slurm}\n')
    fitted = make_trainer(run, 4, enable_checkpointing=False, plugins=[AsyncCheckpointIO(_SlowCheckpointIO())],
                          callbacks=[SlurmRequeue(), SignalAt(batch_idx=1)])
    fitted.fit(make_module(), datamodule=make_data())
    assert fake_slurm.read_text().split() == ["written"]


def test_stop_on_signal_links_last_to_an_asynchronously_written_checkpoint(tmp_path, fake_slurm):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from clp_lightning.callbacks.preemption import StopOnSignal

    run = tmp_path / "run"
    stop = StopOnSignal()
    fitted = make_trainer(run, 4, plugins=[AsyncCheckpointIO(_SlowCheckpointIO())], callbacks=[
        ModelCheckpoint(dirpath=run / "checkpoints", save_last=False), stop,
        SignalAt(batch_idx=1, signum=signal.SIGTERM)])
    fitted.fit(make_module(), datamodule=make_data())
    assert stop.exit_code == 128 + signal.SIGTERM
    assert (run / "checkpoints" / "last.ckpt").samefile(run / "hpc_ckpt_1.ckpt")


def test_a_requeue_stop_leaves_no_last_checkpoint_of_the_state_after_it(tmp_path, fake_slurm):
    # After the stop, Lightning's ModelCheckpoint(save_last=True) saved last.ckpt at train end, from a state that counts
    # the interrupted epoch as done: `--ckpt_path last` would skip the rest of its batches. The requeued job resumes
    # from hpc_ckpt_1; clp's ModelCheckpoint (the configs') writes nothing after a stop.
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    from clp_lightning.callbacks import ModelCheckpoint

    def stopped(cls, run):
        checkpoint = cls(dirpath=run / "checkpoints", save_last=True, every_n_train_steps=100)
        trainer = make_trainer(run, 6, callbacks=[SlurmRequeue(), SignalAt(batch_idx=1), checkpoint])
        trainer.fit(make_module(), datamodule=make_data())
        assert trainer.global_step == 2 and (run / "hpc_ckpt_1.ckpt").is_file()
        return sorted(p.name for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else []

    assert stopped(LightningModelCheckpoint, tmp_path / "lightning") == ["last.ckpt"]
    assert stopped(ModelCheckpoint, tmp_path / "clp") == []


KILLED_MID_WRITE = """
import os, signal, sys, torch
from clp_lightning.callbacks import SafeCheckpointIO

def killed(obj, f):  # SLURM's SIGKILL at the end of the grace period, half way through the file
    f.write(b"PK" + bytes(1000))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed
SafeCheckpointIO().save_checkpoint({"state_dict": {}}, sys.argv[1])
"""


def test_a_checkpoint_write_killed_midway_leaves_nothing_a_slurm_resume_takes(tmp_path, fake_slurm):
    """Lightning resumes a SLURM job from the highest number in any file name containing ``hpc_ckpt_``: a partial
    file named after its target would point the resume at a checkpoint that does not exist."""
    import subprocess

    from clp_lightning.callbacks import SafeCheckpointIO

    run = tmp_path / "run"
    trainer(run, 4, [SlurmRequeue(requeue=False), SignalAt(batch_idx=1)]).fit(make_module(), datamodule=make_data())
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(run / "hpc_ckpt_2.ckpt")])
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in run.iterdir())
    assert "hpc_ckpt_1.ckpt" in left and "hpc_ckpt_2.ckpt" not in left and len(left) == 2  # the partial file
    assert not any("hpc_ckpt_" in name for name in left if name != "hpc_ckpt_1.ckpt")
    resumed = trainer(run, 4, [SlurmRequeue()])
    resumed.fit(make_module(), datamodule=make_data(), ckpt_path="hpc")  # from hpc_ckpt_1.ckpt, step 2
    assert resumed.global_step == 4

    # an exception mid-write (a second Ctrl+C) leaves nothing at all
    def interrupted(obj, f):
        f.write(b"PK")
        raise KeyboardInterrupt

    before = sorted(p.name for p in run.iterdir())
    real_save = torch.save
    torch.save = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            SafeCheckpointIO().save_checkpoint({"state_dict": {}}, run / "hpc_ckpt_2.ckpt")
    finally:
        torch.save = real_save
    assert sorted(p.name for p in run.iterdir()) == before


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
    (dict(check_every_n_steps=1.5), "check_every_n_steps=1.5"),
    (dict(check_every_n_steps=True), "check_every_n_steps=True"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmRequeue(**kwargs)
