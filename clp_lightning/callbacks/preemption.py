"""Stopping on a signal: checkpoint at an optimizer-step boundary every rank agrees on, then stop (and requeue).

Saving inside a signal handler is unsafe under DDP: the handler runs wherever each rank happens to be, so one rank can
enter the checkpoint's barrier while another is inside a gradient all-reduce, and the job hangs until it is killed
(Lightning issue 21406; Lightning's ``SLURMEnvironment(auto_requeue=True)`` hung here on a 2-task CPU job). So the
handlers here only record the signal. After each optimizer step the ranks all-reduce "did any rank get one?", and when
one did, all of them save together through the normal, collective ``trainer.save_checkpoint`` path and stop.

- :class:`SlurmRequeue`: SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90``) -> ``hpc_ckpt_<n>.ckpt``, then
  ``scontrol requeue``; the requeued job resumes from it (Lightning picks the newest ``hpc_ckpt_*`` under SLURM).
- :class:`StopOnSignal`: SIGTERM (``kill``, ``scancel``, a scheduler's preemption) and SIGINT (Ctrl+C) ->
  ``last.ckpt`` where ``--ckpt_path last`` finds it; ``clp fit`` then exits with ``128 + signal`` (143, 130). Without
  it, Lightning's own SIGTERM handling exits 0 with nothing saved, and Ctrl+C exits 1 with nothing saved.

Both install their handlers when training starts, after Lightning has installed its own (``Trainer._run`` does so
after the callbacks' ``setup``), so they replace Lightning's for their signals; Lightning restores the handlers it
found when the fit ends, however it ends.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal as sig
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

log = logging.getLogger("clp_lightning.preemption")


def hpc_checkpoint_path(directory: str | Path) -> Path:
    """The next ``hpc_ckpt_<n>.ckpt`` in ``directory``: the name Lightning looks for when a SLURM job restarts."""
    numbers = [int(m.group(1)) for p in Path(directory).glob("hpc_ckpt_*.ckpt")
               if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return Path(directory) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def _link_over(source: Path, target: Path) -> None:
    """Make ``target`` a hard link to ``source``, replacing any file there atomically (a copy if links fail)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".clp-partial-{os.getpid()}-link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _save_and_wait(trainer: L.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` (collective: every rank must be here, at the same step), returning once the file
    is written: under ``AsyncCheckpointIO`` the save only starts a write in a thread, and what follows a stop (a
    requeue, after which SLURM ends the job; a link to the file) needs the file itself."""
    trainer.save_checkpoint(path, weights_only=False)
    io = trainer.strategy.checkpoint_io
    while io is not None:
        if isinstance(io, AsyncCheckpointIO):
            io.teardown()  # waits for the writes in flight and raises their error; the next save starts a new thread
        io = getattr(io, "checkpoint_io", None)


def validation_due(trainer: L.Trainer) -> bool:
    """Whether the fit validates after the training batch that just ended: Lightning 2.x's own test (private names,
    which the stop-and-resume tests guard)."""
    fit_loop = trainer.fit_loop
    return trainer.enable_validation and fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)


@contextmanager
def _validation_pending(trainer: L.Trainer) -> Iterator[None]:
    """Inside: a checkpoint of a stop at a step that validates says that this step's validation has not run yet.

    The stop skips that validation (see :class:`_StopAtStepBoundary`), and a checkpoint saved after a training batch
    tells a resumed fit that the step's validation ran (Lightning fast-forwards it, as after a ModelCheckpoint save at
    the same step): the step's grid evaluation, its report and its metrics.csv row would be lost. So the loops' progress
    is saved as Lightning saves it at the start of a validation (the batch completed, a first validation batch
    started), which a resumed fit finishes before it trains on; the live progress is put back after the save."""
    epoch_loop = trainer.fit_loop.epoch_loop
    # read before the stop sets should_stop, which would make any step count as one that validates
    if trainer.should_stop or not validation_due(trainer):
        yield
        return
    train, val = epoch_loop.batch_progress, epoch_loop.val_loop.batch_progress
    saved = train.state_dict(), val.state_dict()
    train.increment_completed()
    val.increment_ready()
    val.increment_started()
    try:
        yield
    finally:
        train.load_state_dict(saved[0])
        val.load_state_dict(saved[1])


def _parse_signals(owner: str, names: str | list[str] | tuple[str, ...]) -> tuple[sig.Signals, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    valid = sorted(s.name for s in sig.Signals)
    for name in names:
        if name not in valid:
            raise ValueError(f"{owner} signal={name!r} is not a signal name; expected one of e.g. SIGTERM, SIGINT, "
                             f"SIGUSR1 (all: {valid})")
        if name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{owner} signal={name!r} cannot be caught; expected e.g. SIGTERM, SIGINT or SIGUSR1")
    return tuple(sig.Signals[name] for name in dict.fromkeys(names))


def stopped_by_signal(trainer: L.Trainer) -> bool:
    """Whether a :class:`SlurmRequeue` or :class:`StopOnSignal` of ``trainer`` stopped its current fit (every rank
    gives the same answer): the fit is not finished, it continues from its checkpoint."""
    return any(isinstance(cb, _StopAtStepBoundary) and cb._acted for cb in trainer.callbacks)


class _StopAtStepBoundary(L.Callback):
    """Shared mechanism: flag-only handlers, agreement across ranks at optimizer-step boundaries, then :meth:`_act`.

    Subclasses choose the signals (:meth:`_signals_for`) and what to do once the ranks agree (:meth:`_act`). The
    stop then skips the validation that Lightning runs when training stops early: with a grid evaluation that is
    minutes of generation on a real model, past a scheduler's grace period, and a report at an odd step. The
    trainer's ``limit_val_batches`` is 0 until the fit ends, then restored. A stop at a step that validates leaves
    that validation to the resumed fit, which runs it before it trains on.
    """

    def __init__(self, signal_names: str | list[str] | tuple[str, ...], check_every_n_steps: int) -> None:
        owner = type(self).__name__
        # an int: 1.5 made `global_step % 1.5` act at odd steps, and True passed as 1
        if type(check_every_n_steps) is not int or check_every_n_steps < 1:
            raise ValueError(f"{owner} check_every_n_steps={check_every_n_steps!r}; expected an integer >= 1")
        self.signals = _parse_signals(owner, signal_names)
        self.check_every_n_steps = check_every_n_steps
        self.received: sig.Signals | None = None  # the first signal of this fit, until acted on
        self._handling: tuple[sig.Signals, ...] = ()  # decided in setup, identically on every rank
        self._ignored: set[sig.Signals] = set()
        self._previous: dict[sig.Signals, object] = {}
        self._acted = False
        self._limit_val_batches: int | float | None = None  # the trainer's, while a stop keeps validation off

    def _signals_for(self, trainer: L.Trainer) -> tuple[sig.Signals, ...]:
        """The signals this callback handles in this fit; the default is all of ``signals``."""
        return self.signals

    def _act(self, trainer: L.Trainer, received: sig.Signals) -> None:
        """Runs on every rank at the same step once any rank got a signal; collectives are safe here."""
        raise NotImplementedError

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # nothing heavy here: the handler can interrupt any bytecode, collectives included
        if self.received is None:
            self.received = sig.Signals(signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received, self._acted, self._previous = None, False, {}
        self._handling = self._signals_for(trainer) if stage == "fit" else ()
        # a signal ignored when the fit starts (SIGINT under `nohup ... &`) was ignored on purpose: it stays ignored
        self._ignored = {s for s in self._handling if sig.getsignal(s) is sig.SIG_IGN}

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)  # again: the sanity check may have been skipped

    def _install(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set handlers; Lightning's then stay in place
        for signum in self._handling:
            if signum not in self._ignored and signum not in self._previous:
                self._previous[signum] = sig.signal(signum, self._on_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # every condition up to the all-reduce must read the same on every rank, or the ranks' collectives mismatch
        if not self._handling or self._acted or trainer.global_step % self.check_every_n_steps:
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # mid-accumulation: wait for the optimizer step
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        # ranks that got no signal themselves stop for the same reason as the one that did
        with _validation_pending(trainer):
            self._act(trainer, self.received or self._handling[0])
        self._acted = True
        trainer.should_stop = True
        # the same on every rank (they all act at this step), so no rank waits in a validation collective
        self._limit_val_batches, trainer.limit_val_batches = trainer.limit_val_batches, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(trainer)

    def _restore(self, trainer: L.Trainer) -> None:
        if self._limit_val_batches is not None:  # a later trainer.validate() validates as configured
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None
        for signum, previous in self._previous.items():
            # a handler someone set after ours (Lightning's restore at teardown) is theirs to keep
            if sig.getsignal(signum) == self._on_signal:
                sig.signal(signum, previous)
        self._previous = {}


class SlurmRequeue(_StopAtStepBoundary):
    """Checkpoint and requeue on ``signal`` (what ``#SBATCH --signal=<signal>@<seconds>`` sends).

    Inert outside a SLURM job (no ``SLURM_JOB_ID``) and outside ``fit``. Costs one boolean all-reduce per training
    step under DDP, every ``check_every_n_steps`` steps.

    Args:
        signal: name of the signal to handle, e.g. ``SIGUSR1``; must match the sbatch ``--signal``. When it is one
            that :class:`StopOnSignal` also handles (``SIGTERM``), this callback handles it in a SLURM job.
        requeue: run ``scontrol requeue`` after the checkpoint; with False the run only checkpoints and stops.
        check_every_n_steps: how often the ranks compare flags; the job must get its signal at least this many
            steps (times the step time) before the time limit.

    A stop that no requeue follows (``requeue: false``, or ``scontrol requeue`` failed) sets ``exit_code`` to
    ``128 + signal`` and ``clp fit`` exits with it, so that the job ends as interrupted, not as finished (an
    ``afterok`` dependency does not start); after a requeue the code stays None and the job resumes by itself.
    """

    def __init__(self, signal: str = "SIGUSR1", requeue: bool = True, check_every_n_steps: int = 1) -> None:
        super().__init__(signal, check_every_n_steps)
        self.signal, self.requeue = self.signals[0], requeue
        self.exit_code: int | None = None

    @staticmethod
    def job_id() -> str | None:
        """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return os.environ.get("SLURM_JOB_ID")

    def _signals_for(self, trainer: L.Trainer) -> tuple[sig.Signals, ...]:
        return self.signals if self.job_id() is not None else ()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.exit_code = None
        if not self._handling:
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # setup runs before Lightning registers its handlers, so turning this off here keeps Lightning's
            # in-handler checkpoint from racing with ours
            environment.auto_requeue = False
            log.info("SlurmRequeue handles %s at step boundaries (Lightning's auto_requeue turned off)",
                     self.signal.name)

    def _act(self, trainer: L.Trainer, received: sig.Signals) -> None:
        path = hpc_checkpoint_path(trainer.default_root_dir)
        log.info("SLURM signal %s: saving %s at step %d", received.name, path, trainer.global_step)
        _save_and_wait(trainer, path)
        # one rank asks SLURM; all of them take its outcome, so every rank exits with the same code
        requeued = self.requeue and trainer.strategy.broadcast(
            self._requeue_job(path) if trainer.is_global_zero else False, src=0)
        if not requeued:
            self.exit_code = 128 + received

    def _requeue_job(self, path: Path) -> bool:
        """``scontrol requeue`` this job; False (with a warning naming the checkpoint to resume from) if it failed."""
        job = self.job_id()
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            failure = None if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()}"
        except OSError as err:  # no scontrol on this node's PATH
            failure = str(err)
        if failure is None:
            log.info("Requeued SLURM job %s", job)
            return True
        log.warning("scontrol requeue %s failed (%s): the job stops here; resume it with --ckpt_path %s",
                    job, failure, path)
        return False


class StopOnSignal(_StopAtStepBoundary):
    """On SIGTERM or SIGINT during ``fit``: save a resumable checkpoint at the next optimizer step, then stop.

    The checkpoint is ``last.ckpt`` in the first ``ModelCheckpoint``'s directory, where ``--ckpt_path last`` finds it,
    or ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` when checkpointing is off. In a SLURM job it is
    ``hpc_ckpt_<n>.ckpt``, which a requeued job resumes from by itself, with ``last.ckpt`` a link to it.
    ``exit_code`` then holds ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), and ``clp fit`` exits with it. A
    second SIGINT while the stop is pending raises ``KeyboardInterrupt`` at once (Lightning's abort: exit 1, no
    checkpoint); a second SIGTERM is ignored. The stop skips the validation that Lightning runs when training stops
    early, so the process exits right after the checkpoint.

    Inert outside ``fit``. A signal that an active :class:`SlurmRequeue` handles (one configured with ``SIGTERM``,
    in a SLURM job) is left to it. Costs one boolean all-reduce per training step under DDP, every
    ``check_every_n_steps`` steps.

    Args:
        signals: names of the signals to handle; an empty list turns the callback off.
        check_every_n_steps: how often the ranks compare flags; a stop waits for up to this many steps.
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGINT"),
                 check_every_n_steps: int = 1) -> None:
        super().__init__(signals, check_every_n_steps)
        self.exit_code: int | None = None
        self._launcher = None

    def _signals_for(self, trainer: L.Trainer) -> tuple[sig.Signals, ...]:
        owned = {s for cb in trainer.callbacks if isinstance(cb, SlurmRequeue) for s in cb._signals_for(trainer)}
        for signum in owned & set(self.signals):
            log.info("StopOnSignal leaves %s to SlurmRequeue (checkpoint and requeue)", signum.name)
        return tuple(s for s in self.signals if s not in owned)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.exit_code = None
        self._launcher = getattr(trainer.strategy, "launcher", None)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        signum = sig.Signals(signum)
        if self.received is not None:
            if signum == sig.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl+C: the user wants out now, checkpoint or not
            return
        self.received = signum
        log.info("Received %s: saving a checkpoint and stopping after the current step%s", signum.name,
                 " (Ctrl+C again to abort without one)" if signum == sig.SIGINT else "")
        # Lightning's own SIGTERM handler forwarded the signal to the processes its launcher started, and ours
        # replaces it. Not SIGINT: a terminal's Ctrl+C already reaches the whole process group, and a forwarded copy
        # would be each child's second SIGINT.
        if signum != sig.SIGINT and self._launcher is not None:
            self._launcher.kill(signum)

    def _act(self, trainer: L.Trainer, received: sig.Signals) -> None:
        checkpoint = trainer.checkpoint_callback
        as_last = isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None
        if as_last:
            # the name ModelCheckpoint gives its own last checkpoint; `--ckpt_path last` takes the newest last*.ckpt
            # in its directory
            path = Path(checkpoint.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step},
                                                          checkpoint.CHECKPOINT_NAME_LAST))
            # so that its next save of "last" replaces this file instead of writing last-v1.ckpt beside it
            checkpoint.last_model_path = str(path)
            resume = "--ckpt_path last"
        else:
            path = hpc_checkpoint_path(trainer.default_root_dir)
            resume = f"--ckpt_path {path}"
        if SlurmRequeue.job_id() is not None:
            # In a SLURM job the stop may be a preemption or a node failure that SLURM requeues (fit.sbatch has
            # --requeue): the requeued job resumes by itself from the newest hpc_ckpt_* only, so last.ckpt alone would
            # restart it from scratch, or from an older hpc_ckpt_* of an earlier SlurmRequeue. Write that, and make
            # last.ckpt the same file (a hard link: no second write in the grace period) for `--ckpt_path last`.
            written = hpc_checkpoint_path(trainer.default_root_dir)
            _save_and_wait(trainer, written)
            if as_last and trainer.is_global_zero and written.is_file():
                _link_over(written, path)
            resume = f"{resume} (a requeued job resumes from {written.name} by itself)"
        else:
            _save_and_wait(trainer, path)
        if as_last:
            # Tell the ModelCheckpoint that this step's last checkpoint exists. Otherwise, with save_last, its
            # on_train_end saves "last" again over this file, from the state after the stop, which counts the
            # interrupted epoch as finished: the resumed run would skip the rest of that epoch's batches.
            checkpoint._last_checkpoint_saved, checkpoint._last_global_step_saved = str(path), trainer.global_step
        self.exit_code = 128 + received
        log.info("%s: saved %s at step %d; resume with the same command and %s", received.name, path,
                 trainer.global_step, resume)
