"""Callbacks the signal tests put into a fit, in-process or in a ``clp fit`` subprocess (as a ``class_path``)."""

import os
import signal
from pathlib import Path

import lightning as L


class SignalAt(L.Callback):
    """Sends ``signum`` to this process when training batch ``batch_idx`` starts (as SLURM or kill would, mid-step)."""

    def __init__(self, batch_idx: int, signum: int = signal.SIGUSR1) -> None:
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx and trainer.current_epoch == 0:
            os.kill(os.getpid(), self.signum)


class StepLog(L.Callback):
    """Appends ``start <global_step>`` when training starts and ``<global_step>`` after each batch to ``path``, so a
    test outside the process can tell how far the fit got."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(f"start {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(str(trainer.global_step))
