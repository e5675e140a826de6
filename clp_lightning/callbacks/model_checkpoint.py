"""Lightning's ``ModelCheckpoint``, which also saves the step a fit ends on when that step is off its schedule."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from clp_lightning.callbacks.preemption import stopped_by_signal


class ModelCheckpoint(LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments) that never leaves a fit's last steps unsaved.

    Lightning's saves on its schedule (``every_n_train_steps``, validation ends, ``train_time_interval``) and, at the
    end of a fit, writes ``last.ckpt`` only if it never wrote one: a fit of 10 steps that checkpoints every 4 ends
    with ``last.ckpt`` at step 8, so the final policy is lost, ``--ckpt_path last`` retrains steps 9 and 10, and a
    test or export of ``last.ckpt`` reads an earlier policy than the one the last evaluation measured. Here a fit that
    finishes on a step nothing saved also gets the checkpoints the schedule would have written there: ``last.ckpt``
    (with ``save_last``) and, when nothing is monitored, the periodic ``...step=<N>.ckpt`` (a monitored top-k is
    left alone: the monitored value would be an earlier step's). A fit stopped by :class:`StopOnSignal` or
    :class:`SlurmRequeue` saves nothing more when it ends: they saved at the stop (Lightning's class would still
    write ``last.ckpt`` after a :class:`SlurmRequeue` stop, from a state that a resume misreads).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if stopped_by_signal(trainer):
            # The stop saved what to resume from. A save now (Lightning's own save_last included) would record the
            # state after the stop, which counts the interrupted epoch as finished: a resume would skip its batches.
            return
        # _should_skip_saving_checkpoint: not fitting, fast_dev_run, or this step already saved
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
