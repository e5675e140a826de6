"""What the benchmark scripts share: device sync, step times, peak memory, the machine, conditioning modes by name,
the ``--out`` check.

Not a script: the scripts beside it import it as a sibling module (``python benchmarks/<script>.py`` puts this
folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any


def check_out(parser: argparse.ArgumentParser, out: str | None) -> None:
    """Refuse an ``--out`` that cannot be written (a directory, a parent that cannot be made or written) now: the
    file is written after the measurements, which take minutes, and a bad path would lose them."""
    if out is None:
        return
    from clp_lightning.callbacks.checkpoint import check_output_file

    try:
        check_output_file(out, "--out", "JSON")
    except OSError as err:
        parser.error(str(err))


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def step_times(ends: list[float], warmup: int) -> list[float]:
    """The time of each step after the first ``warmup``, from the wall-clock readings at the steps' ends.

    ``ends[0]`` is read when the first step starts, so ``ends`` has one reading more than there were steps.
    """
    return [b - a for a, b in zip(ends, ends[1:])][warmup:]


class Memory:
    """The peak memory of this process: allocated CUDA memory on the GPU, the resident set on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def reset(self) -> None:
        """Called when training starts: the CUDA peak is read from here on (the CPU peak is the process's)."""
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a worker would report its
        # parent's peak whenever that is the larger
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def conditioning(mode: str):
    """The conditioning of a mode, as the conditioning benchmark defines the modes; ``none`` is unconditioned."""
    from conditioning import MODES  # benchmarks/conditioning.py

    from clp_lightning.conditioning.config import ConditioningConfig

    return ConditioningConfig() if mode == "none" else MODES[mode]()


def machine() -> dict[str, Any]:
    """Python, torch, CPU, thread count and GPU of this run, with Transformers' and TRL's versions if TRL is here."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads()}
    try:
        import transformers
        import trl

        info.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
