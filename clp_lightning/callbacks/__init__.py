"""Cross-cutting work: grid evaluation and reports, checkpoint I/O, run records, SLURM preemption."""

from clp_lightning.callbacks.checkpoint import SafeCheckpointIO
from clp_lightning.callbacks.grid_evaluation import GridEvaluation
from clp_lightning.callbacks.preemption import SlurmRequeue
from clp_lightning.callbacks.run_info import RunInfo

__all__ = ["GridEvaluation", "RunInfo", "SafeCheckpointIO", "SlurmRequeue"]
