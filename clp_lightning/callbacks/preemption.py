"""SLURM preemption: on the requeue signal, checkpoint at a step boundary every rank agrees on, then requeue.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside the signal handler.
Under DDP that handler runs wherever each rank happens to be, so one rank can enter the checkpoint's barrier while
another is inside a gradient all-reduce, and the job hangs until SLURM kills it (Lightning issue 21406; it hung
here on a 2-task CPU job). This callback only sets a flag in the handler; after each training step the ranks
all-reduce the flag, and when any rank got the signal all of them save ``hpc_ckpt_<n>.ckpt`` together through the
normal, collective ``trainer.save_checkpoint`` path. Rank 0 then requeues the job, and the requeued job resumes
from that checkpoint (Lightning picks the newest ``hpc_ckpt_*`` in ``default_root_dir`` under SLURM).
"""

from __future__ import annotations

import logging
import os
import re
import signal as signals
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger("clp_lightning.preemption")


def hpc_checkpoint_path(directory: str | Path) -> Path:
    """The next ``hpc_ckpt_<n>.ckpt`` in ``directory``: the name Lightning looks for when a SLURM job restarts."""
    numbers = [int(m.group(1)) for p in Path(directory).glob("hpc_ckpt_*.ckpt")
               if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return Path(directory) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SlurmRequeue(L.Callback):
    """Checkpoint and requeue on ``signal`` (what ``#SBATCH --signal=<signal>@<seconds>`` sends).

    Inert outside a SLURM job (no ``SLURM_JOB_ID``) and outside ``fit``. Costs one boolean all-reduce per training
    step under DDP, every ``check_every_n_steps`` steps.

    Args:
        signal: name of the signal to handle, e.g. ``SIGUSR1``; must match the sbatch ``--signal``.
        requeue: run ``scontrol requeue`` after the checkpoint; with False the run only checkpoints and stops.
        check_every_n_steps: how often the ranks compare flags; the job must get its signal at least this many
            steps (times the step time) before the time limit.
    """

    def __init__(self, signal: str = "SIGUSR1", requeue: bool = True, check_every_n_steps: int = 1) -> None:
        names = sorted(s.name for s in signals.Signals)
        if signal not in names:
            raise ValueError(f"SlurmRequeue signal={signal!r} is not a signal name; expected one of e.g. SIGUSR1, "
                             f"SIGUSR2, SIGTERM (all: {names})")
        if check_every_n_steps < 1:
            raise ValueError(f"SlurmRequeue check_every_n_steps={check_every_n_steps}; expected an integer >= 1")
        self.signal, self.requeue, self.check_every_n_steps = signals.Signals[signal], requeue, check_every_n_steps
        self.requested = False
        self._previous_handler = None

    @staticmethod
    def job_id() -> str | None:
        """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return os.environ.get("SLURM_JOB_ID")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.job_id() is None:
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # setup runs before Lightning registers its handlers, so turning this off here keeps Lightning's
            # in-handler checkpoint from racing with ours
            environment.auto_requeue = False
            log.info("SlurmRequeue handles %s at step boundaries (Lightning's auto_requeue turned off)",
                     self.signal.name)
        self.requested = False
        self._previous_handler = signals.signal(self.signal, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.requested = True  # nothing else here: the handler can interrupt any bytecode, collectives included

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._previous_handler is None or trainer.global_step % self.check_every_n_steps:
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # mid-accumulation: wait for the optimizer step
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = hpc_checkpoint_path(trainer.default_root_dir)
        log.info("SLURM signal %s: saving %s at step %d", self.signal.name, path, trainer.global_step)
        trainer.save_checkpoint(path)  # collective: every rank is here, at the same step
        if self.requeue and trainer.is_global_zero:
            job = self.job_id()
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.info("Requeued SLURM job %s", job)
            else:
                log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        trainer.should_stop = True
        self.requested = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signals.signal(self.signal, self._previous_handler)
            self._previous_handler = None
