"""Cross-cutting work: grid evaluation and reports, checkpoints and their I/O, run records, stopping on signals and
SLURM preemption."""

from clp_lightning.callbacks.checkpoint import CheckpointError, SafeCheckpointIO, read_checkpoint
from clp_lightning.callbacks.grid_evaluation import GridEvaluation
from clp_lightning.callbacks.model_checkpoint import ModelCheckpoint
from clp_lightning.callbacks.preemption import SlurmRequeue, StopOnSignal
from clp_lightning.callbacks.run_info import RunInfo

__all__ = ["CheckpointError", "GridEvaluation", "ModelCheckpoint", "RunInfo", "SafeCheckpointIO", "SlurmRequeue",
           "StopOnSignal", "read_checkpoint"]
