"""Per-objective reward normalisation, so that a weighting ``w`` means the same whatever each reward's scale.

Notation: ``N`` rewarded samples in a batch, ``m`` objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

NormalizeMode = Literal["none", "batch", "running"]


def _all_reduce_sum(stats: Tensor) -> Tensor:
    """Sum ``stats`` over ranks when a process group is up; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats


class RewardNormalizer(nn.Module):
    """Standardise each reward column: ``(r - mean) / (std + eps)``.

    Modes:
        - ``"none"``: return the rewards unchanged.
        - ``"batch"``: the batch's own mean and (population) std, gathered over all ranks.
        - ``"running"``: statistics of every batch seen so far *including the current one* (so the first batch
          comes out zero-mean). Merged exactly (Chan et al.'s parallel update), or as an exponential moving average
          when ``momentum`` is set.

    The running statistics live in float64 buffers (``count``, ``mean``, ``var``): they are saved in checkpoints,
    restored on resume, and stay float64 when the parent module is cast to a lower precision. Under
    ``torch.distributed`` each batch's count and sum, then its squared deviations from their mean, are all-reduced
    first, so every rank holds the same statistics.

    Args:
        num_objectives: ``m``, the number of reward columns.
        mode: ``"none"``, ``"batch"`` or ``"running"``.
        momentum: for ``"running"``: None merges all batches exactly; a value in (0, 1] is the weight of the newest
            batch in an exponential moving average (the first batch initialises it).
        eps: added to the std, so constant rewards normalise to 0 instead of dividing by zero; must be > 0.
        sync_fn: sums a 1-D float64 tensor across workers (replaces the ``torch.distributed`` all-reduce; for tests
            or custom launchers). Called twice per batch, in the same order on every worker.
    """

    def __init__(
        self,
        num_objectives: int,
        mode: NormalizeMode = "running",
        momentum: float | None = None,
        eps: float = 1e-8,
        sync_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
        if mode not in ("none", "batch", "running"):
            raise ValueError(f"mode must be 'none', 'batch' or 'running', got {mode!r}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] or None, got {momentum}")
        if not (math.isfinite(eps) and eps > 0):  # eps <= 0 divides constant rewards by zero; NaN makes all NaN
            raise ValueError(f"eps must be finite and > 0, got {eps}")
        self.num_objectives, self.mode, self.momentum, self.eps = num_objectives, mode, momentum, eps
        self.sync_fn = sync_fn or _all_reduce_sum
        # Before any update the stats are the identity transform: mean 0, var 1.
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(num_objectives, dtype=torch.float64))
        self.register_buffer("var", torch.ones(num_objectives, dtype=torch.float64))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RewardNormalizer:
        # Follow device moves but never a dtype cast (e.g. model.to(torch.bfloat16)): bf16 statistics would drift.
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    @property
    def std(self) -> Tensor:
        """``(m,)`` running standard deviation (population)."""
        return self.var.sqrt()

    def batch_stats(self, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Count ``()``, mean ``(m,)`` and population variance ``(m,)`` of ``rewards`` ``(N, m)`` over all ranks.

        Raises:
            ValueError: a reward on any rank is NaN or infinite (the message lists the columns).
        """
        r = rewards.detach().to(torch.float64)
        # Two sums over ranks: count and sum first, then the squared deviations from the global mean. One all-reduce of
        # the sum of squares (E[r^2] - E[r]^2) cancels catastrophically when |mean| >> std: a reward near 1e8 with
        # spread 1 came out with variance 0.
        stats = self.sync_fn(torch.cat([r.new_tensor([r.shape[0]]), r.sum(0)]))  # (1 + m,)
        count, total = stats[0], stats[1:]
        self._check_finite(total)
        mean = total / count.clamp(min=1.0)
        squares = self.sync_fn((r - mean).square().sum(0))  # (m,)
        self._check_finite(squares)
        return count, mean, squares / count.clamp(min=1.0)

    @staticmethod
    def _check_finite(summed: Tensor) -> None:
        # Checked after the sync, so every rank raises together instead of the others waiting in the next all-reduce;
        # folded into the running statistics, one NaN would make every later reward of its column NaN, for good.
        finite = torch.isfinite(summed)
        if not finite.all():
            columns = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"rewards in column(s) {columns} are NaN or infinite (on this rank or another)")

    @torch.no_grad()
    def update(self, rewards: Tensor) -> None:
        """Fold a batch ``(N, m)`` into the running statistics."""
        count, mean, var = self.batch_stats(rewards)
        if count == 0:
            return
        if self.count == 0:
            self.mean.copy_(mean)
            self.var.copy_(var)
        elif self.momentum is not None:
            delta = mean - self.mean
            self.mean.add_(self.momentum * delta)
            # EMA of the variance around the moving mean (the cross term keeps it consistent with the mean's shift).
            self.var.mul_(1 - self.momentum).add_(self.momentum * (var + (1 - self.momentum) * delta * delta))
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean.add_(delta * count / total)
            self.var.copy_((self.var * self.count + var * count + delta * delta * self.count * count / total) / total)
        self.count.add_(count)

    def forward(self, rewards: Tensor, update: bool = True) -> Tensor:
        """Normalise ``rewards`` ``(N, m)``; returns ``(N, m)`` in the input's dtype.

        Args:
            rewards: raw rewards, one column per objective.
            update: fold this batch into the running statistics first (turn off for validation).
        """
        if rewards.ndim != 2 or rewards.shape[1] != self.num_objectives:
            raise ValueError(f"expected rewards of shape (N, {self.num_objectives}), got {tuple(rewards.shape)}")
        if self.mode == "none":
            return rewards
        if self.mode == "batch":
            _, mean, var = self.batch_stats(rewards)
        else:
            if update:
                self.update(rewards)
            mean, var = self.mean, self.var
        mean, std = mean.to(rewards.device), var.to(rewards.device).sqrt()
        return ((rewards.to(torch.float64) - mean) / (std + self.eps)).to(rewards.dtype)

    def extra_repr(self) -> str:
        return f"num_objectives={self.num_objectives}, mode={self.mode!r}, momentum={self.momentum}, eps={self.eps}"
