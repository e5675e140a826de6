"""clp-lightning: Conditional Language Policy (steerable multi-objective finetuning) on PyTorch Lightning."""

__version__ = "0.1.0"
