"""StopOnSignal: SIGTERM or SIGINT during `clp fit` gives a checkpoint at an optimizer-step boundary, an exit code of
128 + signal, and a run that `--ckpt_path last` resumes."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from cli_helpers import TINY_CONFIG

from clp_lightning.callbacks import SlurmRequeue
from clp_lightning.callbacks.preemption import StopOnSignal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from signal_helpers import SignalAt  # noqa: E402
from test_module import make_data, make_module, make_trainer  # noqa: E402

# far more steps than the test waits for: the run is still training when the signal comes
MAX_STEPS = 1000

def write_config(tmp_path: Path, **trainer) -> tuple[Path, Path, Path]:
    """The tiny config with ``trainer`` settings, a ModelCheckpoint that never saves by itself (no validation, no
    epoch-end saves, and no save_last, which would save at the end of training) so that a ``last.ckpt`` can only come
    from the stop, and a log of the steps taken."""
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["max_steps"] = MAX_STEPS
    config["trainer"].update(trainer)
    checkpoints, steps = tmp_path / "checkpoints", tmp_path / "steps.txt"
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(checkpoints), "save_last": False, "save_on_train_epoch_end": False}},
        {"class_path": "signal_helpers.StepLog", "init_args": {"path": str(steps)}},
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, checkpoints, steps


def clp_fit(tmp_path: Path, config: Path, *overrides: str, log_name: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    output = tmp_path / log_name
    with open(output, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clp_lightning", "fit", "--config", str(config),
             f"--trainer.default_root_dir={tmp_path}", *overrides],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            # a shell without job control starts background commands with SIGINT ignored, and an ignored signal
            # stays ignored in the fit; give the child the default
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    return process, output


def logged_steps(steps: Path) -> list[str]:
    return steps.read_text().split("\n")[:-1] if steps.exists() else []


def wait_for_a_step(process: subprocess.Popen, steps: Path, output: Path, timeout: float = 300) -> None:
    # generous: two DDP processes start slowly on a loaded 2-core machine (120 s was once not enough)
    deadline = time.monotonic() + timeout
    while not any(line.isdigit() and int(line) >= 1 for line in logged_steps(steps)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the fit did not reach step 1 (exit {process.poll()}):\n{output.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.parametrize("signum, resume", [(signal.SIGTERM, True), (signal.SIGINT, False)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_fit_saves_last_exits_nonzero_and_resumes(tmp_path, signum, resume):
    config, checkpoints, steps = write_config(tmp_path)
    process, output = clp_fit(tmp_path, config, log_name="fit.log")
    wait_for_a_step(process, steps, output)
    process.send_signal(signum)
    try:
        code = process.wait(timeout=120)
    finally:
        process.kill()
    log = output.read_text()
    assert code == 128 + signum, log[-3000:]
    # one complete checkpoint where `--ckpt_path last` looks, no temporary file beside it
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"], log[-3000:]
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    # saved after the step it stopped at, and no step ran after it
    assert 1 <= saved < MAX_STEPS and int(logged_steps(steps)[-1]) == saved
    assert "--ckpt_path last" in log and f"exit code {128 + signum}" in log
    if not resume:
        return

    steps.unlink()
    process, output = clp_fit(tmp_path, config, "--ckpt_path=last", f"--trainer.max_steps={saved + 2}",
                              log_name="resume.log")
    try:
        code = process.wait(timeout=120)
    finally:
        process.kill()
    assert code == 0, output.read_text()[-3000:]
    assert logged_steps(steps) == [f"start {saved}", str(saved + 1), str(saved + 2)]


@pytest.mark.ddp
def test_ddp_ranks_stop_at_the_same_step_when_only_rank_zero_is_signalled(tmp_path):
    # Lightning's launcher starts rank 1 as a child of rank 0; SIGINT to rank 0 alone is not forwarded, so rank 1
    # learns of it only through the all-reduce at the step boundary
    config, checkpoints, steps = write_config(tmp_path, devices=2, strategy="ddp")
    process, output = clp_fit(tmp_path, config, log_name="fit.log")
    wait_for_a_step(process, steps, output)
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=120)
    finally:
        process.kill()
    assert code == 130, output.read_text()[-3000:]
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    # both ranks log each step; both stopped after the saved one
    ranked = [int(line) for line in logged_steps(steps) if line.isdigit()]
    assert ranked[-2:] == [saved, saved] and max(ranked) == saved


def test_signal_mid_accumulation_waits_for_the_optimizer_step(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    # batches 0-1 are step 1, 2-3 step 2: the signal comes while step 2 accumulates its first micro-batch
    trainer = make_trainer(tmp_path, 4, enable_checkpointing=False, accumulate_grad_batches=2,
                           callbacks=[stop, SignalAt(batch_idx=2, signum=signal.SIGTERM)])
    trainer.fit(make_module(), datamodule=make_data())
    assert trainer.global_step == 2 and stop.exit_code == 143
    # without a ModelCheckpoint, the checkpoint goes where `--ckpt_path hpc` or an explicit path finds it
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGTERM) is previous


class CountValidations(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


def test_a_stop_skips_the_validation_of_an_early_stop_and_restores_it_after(tmp_path):
    # validation every 2 steps: steps 2 and 4 validate, then the signal at batch 4 stops after step 5, which would
    # otherwise validate once more (Lightning validates when training stops early)
    count = CountValidations()
    trainer = make_trainer(tmp_path, 50, enable_checkpointing=False, limit_val_batches=1, val_check_interval=2,
                           check_val_every_n_epoch=None, num_sanity_val_steps=0,
                           callbacks=[StopOnSignal(), SignalAt(batch_idx=4, signum=signal.SIGTERM), count])
    module = make_module()
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step == 5 and count.steps == [2, 4]
    assert trainer.limit_val_batches == 1  # restored: validating later validates as configured
    trainer.validate(module, datamodule=make_data())
    assert count.steps == [2, 4, 5]


def test_sigterm_that_slurm_requeue_handles_is_left_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    stop = StopOnSignal()
    trainer = make_trainer(tmp_path, 4, enable_checkpointing=False, callbacks=[
        stop, SlurmRequeue(signal="SIGTERM", requeue=False), SignalAt(batch_idx=1, signum=signal.SIGTERM)])
    trainer.fit(make_module(), datamodule=make_data())
    assert trainer.global_step == 2
    # one checkpoint, SlurmRequeue's; StopOnSignal neither saved another nor asks for a non-zero exit
    assert [p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert stop.exit_code is None


def test_second_sigint_aborts_and_second_sigterm_is_ignored():
    forwarded = []
    stop = StopOnSignal()
    stop._launcher = SimpleNamespace(kill=forwarded.append)
    stop._on_signal(signal.SIGTERM, None)
    stop._on_signal(signal.SIGTERM, None)
    assert stop.received == signal.SIGTERM and forwarded == [signal.SIGTERM]  # forwarded to child ranks once
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)

    forwarded.clear()
    stop = StopOnSignal()
    stop._launcher = SimpleNamespace(kill=forwarded.append)
    stop._on_signal(signal.SIGINT, None)
    assert stop.received == signal.SIGINT and forwarded == []  # Ctrl+C already reached the whole process group
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGINT, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(signals=["TERM"]), "signal='TERM'"),
    (dict(signals=["SIGKILL"]), "signal='SIGKILL' cannot be caught"),
    (dict(check_every_n_steps=0), "check_every_n_steps=0"),
    (dict(check_every_n_steps=1.5), "check_every_n_steps=1.5"),
    (dict(check_every_n_steps=True), "check_every_n_steps=True"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StopOnSignal(**kwargs)


def test_stop_with_save_last_resumes_mid_epoch_at_the_next_batch(tmp_path):
    """The shipped configs keep save_last on: the ModelCheckpoint must not save "last" again at the end of the
    stopped fit, from a state that counts the interrupted epoch as finished (the resume would skip its batches).
    clp's ModelCheckpoint, which the configs use, saves a fit's last step when it ends: not a stopped one's."""
    from clp_lightning.callbacks import ModelCheckpoint

    class Batches(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.current_epoch, batch_idx, batch["id"]))

    def checkpoint():
        return ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=100,
                               save_on_train_epoch_end=False)

    # 8 batches an epoch; the signal comes during batch 2 (step 3): the stop saves after it
    stop, first = StopOnSignal(), Batches()
    trainer = make_trainer(tmp_path, 6, callbacks=[stop, SignalAt(batch_idx=2, signum=signal.SIGTERM), checkpoint(),
                                                   first])
    trainer.fit(make_module(), datamodule=make_data())
    assert stop.exit_code == 143 and trainer.global_step == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]

    again, full = Batches(), Batches()
    make_trainer(tmp_path, 6, callbacks=[checkpoint(), again]).fit(
        make_module(), datamodule=make_data(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    make_trainer(tmp_path / "uninterrupted", 6, enable_checkpointing=False, callbacks=[full]).fit(
        make_module(), datamodule=make_data())
    # the resumed run takes epoch 0's batch 3 next, the very batches the uninterrupted run took
    assert again.seen[0][:2] == (0, 3)
    assert first.seen + again.seen == full.seen


def test_in_a_slurm_job_the_stop_writes_what_a_requeued_job_resumes_from(tmp_path, monkeypatch):
    # a preemption (SIGTERM) that SLURM requeues: the requeued job runs `clp fit` again with no --ckpt_path, and
    # Lightning resumes it from the newest hpc_ckpt_* in default_root_dir, never from last.ckpt
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    from lightning.pytorch.callbacks import ModelCheckpoint

    stop = StopOnSignal()
    run = tmp_path / "run"
    run.mkdir()
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"")  # an earlier SlurmRequeue's checkpoint, older than this stop
    trainer = make_trainer(run, 6, callbacks=[SlurmRequeue(), stop, SignalAt(batch_idx=1, signum=signal.SIGTERM),
                                              ModelCheckpoint(dirpath=run / "checkpoints", save_last=False)])
    trainer.fit(make_module(), datamodule=make_data())
    assert (trainer.global_step, stop.exit_code) == (2, 143)
    resumed_from = make_trainer(run, 6, callbacks=[])._checkpoint_connector._hpc_resume_path
    assert Path(resumed_from).name == "hpc_ckpt_2.ckpt"
    assert torch.load(resumed_from, weights_only=True)["global_step"] == 2
    assert os.path.samefile(resumed_from, run / "checkpoints" / "last.ckpt")  # `--ckpt_path last` takes the same


def test_a_stop_at_a_step_that_validates_leaves_that_validation_to_the_resumed_run(tmp_path):
    """The stop skips the validation of its step; the checkpoint must not tell the resumed run that it ran (Lightning
    would fast-forward it, and the step's grid evaluation, report and metrics.csv row would be lost)."""
    from clp_lightning.callbacks import ModelCheckpoint  # the configs' (it saves where a fit ends: not a stopped one)

    class Batches(CountValidations):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.current_epoch, batch_idx, batch["id"]))

    def run(directory, *callbacks, **fit):
        log = Batches()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=100,
                                     save_on_train_epoch_end=False)
        trainer = make_trainer(directory, 6, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None,
                               num_sanity_val_steps=0, callbacks=[*callbacks, checkpoint, log])
        trainer.fit(make_module(), datamodule=make_data(), **fit)
        return trainer, log

    # validation at steps 2, 4 and 6; the signal comes during batch 3 (step 4): the stop saves before step 4 validates
    stopped, first = run(tmp_path, StopOnSignal(), SignalAt(batch_idx=3, signum=signal.SIGTERM))
    assert stopped.global_step == 4 and first.steps == [2]
    resumed, again = run(tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    full, uninterrupted = run(tmp_path / "uninterrupted")
    assert again.steps == [4, 6] and first.steps + again.steps == uninterrupted.steps == [2, 4, 6]
    assert first.seen + again.seen == uninterrupted.seen  # and then trains on the very batches it would have
    epoch_loop, full_loop = resumed.fit_loop.epoch_loop, full.fit_loop.epoch_loop
    assert epoch_loop._batches_that_stepped == full_loop._batches_that_stepped  # the loggers' step too
