"""Grid evaluation as torchmetrics, so that per-rank partial results reduce correctly under DDP.

Notation: P grid points (weightings), m objectives, B samples in one ``update``.

Each rank scores its share of (grid point, prompt) pairs and calls ``update``. :class:`GridRewardMeans` keeps per-point
sums and counts reduced with ``sum``, so ``compute`` gives the same means whatever the split across ranks, provided
each sample is scored once (a distributed sampler that repeats prompts to even out the shards counts those twice);
:class:`PromptRows` keeps one row per prompt, gathered from every rank, deduplicated and put in an order that does not
depend on the split either: :class:`~clp_lightning.callbacks.GridEvaluation` takes its means over these rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from clp_lightning.evaluation.pareto import hypervolume, pareto_front_mask
from clp_lightning.evaluation.steerability import steerability


class GridRewardMeans(Metric):
    """Mean raw reward of each objective (and mean KL to the reference) at each grid point.

    Args:
        num_points: P, the number of grid weightings.
        num_objectives: m.
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ``sync_on_compute``, ...).

    Call ``update`` (not ``forward``, which would also compute on a single batch that rarely covers every point).

    Example:
        >>> metric = GridRewardMeans(num_points=2, num_objectives=2)
        >>> metric.update(torch.tensor([0, 1, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        >>> metric.compute()["rewards"]
        tensor([[1., 2.],
                [4., 5.]])
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    reward_sum: Tensor
    count: Tensor
    kl_sum: Tensor
    kl_count: Tensor

    def __init__(self, num_points: int, num_objectives: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_points < 1 or num_objectives < 1:
            raise ValueError(f"need num_points >= 1 and num_objectives >= 1, got {num_points} and {num_objectives}")
        self.num_points, self.num_objectives = num_points, num_objectives
        self.add_state("reward_sum", torch.zeros(num_points, num_objectives), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_points, dtype=torch.long), dist_reduce_fx="sum")
        # KL is optional per update, so it keeps its own count.
        self.add_state("kl_sum", torch.zeros(num_points), dist_reduce_fx="sum")
        self.add_state("kl_count", torch.zeros(num_points, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, point_index: Tensor, rewards: Tensor, kl: Tensor | None = None) -> None:
        """Add a batch of scored samples.

        Args:
            point_index: (B,) integer index of each sample's grid point, in ``[0, P)``.
            rewards: (B, m) raw rewards of each sample.
            kl: (B,) per-sample KL to the reference, or None.

        Raises:
            ValueError: bad shapes, a non-integer index, or an index outside ``[0, P)``.
        """
        # a bool tensor is a mask, not indices: read as indices it would put every sample on point 0 or 1
        if point_index.ndim != 1 or point_index.is_floating_point() or point_index.is_complex() or \
                point_index.dtype == torch.bool:
            raise ValueError(
                f"`point_index` must be a (B,) integer tensor, got {point_index.dtype} {tuple(point_index.shape)}"
            )
        b = point_index.shape[0]
        if rewards.shape != (b, self.num_objectives):
            raise ValueError(
                f"`rewards` must have shape (B, m) = ({b}, {self.num_objectives}), got {tuple(rewards.shape)}"
            )
        if kl is not None and kl.shape != (b,):
            raise ValueError(f"`kl` must have shape (B,) = ({b},), got {tuple(kl.shape)}")
        # Checked here because an out-of-range index_add_ on CUDA is a device-side assert, not a readable error.
        bad = (point_index < 0) | (point_index >= self.num_points)
        if bad.any():
            raise ValueError(f"`point_index` must be in [0, {self.num_points}), got {point_index[bad].tolist()}")
        point_index = point_index.long()
        self.reward_sum.index_add_(0, point_index, rewards.to(self.reward_sum.dtype))
        self.count.index_add_(0, point_index, torch.ones_like(point_index))
        if kl is not None:
            self.kl_sum.index_add_(0, point_index, kl.to(self.kl_sum.dtype))
            self.kl_count.index_add_(0, point_index, torch.ones_like(point_index))

    def compute(self) -> dict[str, Tensor]:
        """Per-point means over all ranks.

        Returns:
            ``rewards`` (P, m) mean rewards; ``kl`` (P,) mean KL, nan at points that got no KL values; ``counts``
            (P,) samples per point.

        Raises:
            ValueError: some grid points received no samples (their indices are in the message).
        """
        empty = (self.count == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"grid points {empty} received no samples; every point needs at least one to average")
        return {
            "rewards": self.reward_sum / self.count[:, None],
            "kl": torch.where(self.kl_count > 0, self.kl_sum / self.kl_count.clamp_min(1), torch.nan),
            "counts": self.count.clone(),
        }


def pareto_steerability(
    weights: Tensor, means: Tensor, ref_point: Tensor | None = None, tol: float = 0.0
) -> dict[str, Tensor]:
    """Pareto and steerability summary of a policy evaluated on a grid.

    Args:
        weights: (P, m) grid weightings.
        means: (P, m) mean raw reward of each objective at each grid point.
        ref_point: (m,) hypervolume reference point; None skips the hypervolume.
        tol: slack for monotonicity violations.

    Returns:
        On ``means``' device: ``front_mask`` (P,) bool, ``spearman`` (m,) float (nan where undefined),
        ``violations`` (m,) long and, with a reference point, ``hypervolume`` () float.
    """
    rho, violations = steerability(weights, means, tol)
    out = {
        "front_mask": pareto_front_mask(means).to(means.device),
        "spearman": rho.to(means.device, means.dtype),
        "violations": violations.to(means.device),
    }
    if ref_point is not None:
        out["hypervolume"] = torch.tensor(hypervolume(means, ref_point), dtype=means.dtype, device=means.device)
    return out


def mean_over_ranks(rows: Tensor, group: Any = None) -> Tensor:
    """Mean of every rank's rows ``(B, m)`` -> ``(m,)``, weighting each rank by its row count (a collective call when
    ``torch.distributed`` is initialised; ``group=False`` keeps it local).

    Raises:
        ValueError: no rank has a row.
    """
    total = torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])])  # (m + 1,) sums and row count
    if group is not False and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    if total[-1] == 0:
        raise ValueError("cannot average zero reward rows")
    return total[:-1] / total[-1]


class ParetoSteerabilityMetric(GridRewardMeans):
    """:class:`GridRewardMeans` plus the Pareto front, hypervolume and steerability of the grid's mean rewards.

    The hypervolume reference point is either given at construction or set **once** later with
    :meth:`set_reference_point` from the reference policy's rewards. It lives in a persistent buffer, not a metric
    state: ``reset()`` leaves it alone, so every validation epoch measures against the same point, and it is saved
    in checkpoints, so a resumed run keeps it too. The grid weights are a non-persistent buffer (they come from
    the config).

    Args:
        weights: (P, m) grid weightings; P and m are taken from it.
        ref_point: (m,) hypervolume reference point, or None to set it later.
        tol: slack for monotonicity violations (decreases up to ``tol`` are not counted).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    grid_weights: Tensor
    ref_point: Tensor

    def __init__(
        self,
        weights: Tensor | Sequence[Sequence[float]],
        ref_point: Tensor | Sequence[float] | None = None,
        tol: float = 0.0,
        **kwargs: Any,
    ) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.ndim != 2:
            raise ValueError(f"`weights` must have shape (P, m), got {tuple(weights.shape)}")
        super().__init__(num_points=weights.shape[0], num_objectives=weights.shape[1], **kwargs)
        if not tol >= 0:  # otherwise refused only by compute(), after the whole evaluation
            raise ValueError(f"tol must be >= 0 (the decrease that is still not a violation), got {tol}")
        self.tol = tol
        self.register_buffer("grid_weights", weights, persistent=False)
        self.register_buffer("ref_point", torch.full((weights.shape[1],), torch.nan), persistent=True)
        if ref_point is not None:
            ref_point = torch.as_tensor(ref_point, dtype=torch.float32)
            # the point itself: set_reference_point would average (B, m) rows into one, without a word
            if ref_point.shape != (weights.shape[1],):
                raise ValueError(f"`ref_point` must have shape (m,) = ({weights.shape[1]},), got "
                                 f"{tuple(ref_point.shape)}")
            self.set_reference_point(ref_point)

    @property
    def has_reference_point(self) -> bool:
        """Whether the hypervolume reference point has been set."""
        return bool(self.ref_point.isfinite().all())

    def set_reference_point(self, rewards: Tensor, overwrite: bool = False) -> None:
        """Fix the hypervolume reference point.

        Args:
            rewards: (m,) the point itself, which must then be the same on every rank; or (B, m) the reference
                policy's per-sample rewards on this rank, averaged over all ranks here (a collective call: every
                rank must call it).
            overwrite: replace a point that is already set. By default a second call is an error, because moving
                the reference point makes hypervolumes of different epochs incomparable.

        Raises:
            RuntimeError: the point is already set and ``overwrite`` is False.
            ValueError: wrong shape, no rows, or non-finite values.
        """
        if self.has_reference_point and not overwrite:
            raise RuntimeError(
                f"the reference point is already set to {self.ref_point.tolist()}; it stays fixed so that "
                "hypervolumes stay comparable (pass overwrite=True to replace it)"
            )
        m = self.num_objectives
        if rewards.ndim == 2 and rewards.shape[1] == m:
            rows = rewards.detach().to(self.device, torch.float32)
            sync = self.sync_on_compute and self.distributed_available_fn()
            point = mean_over_ranks(rows, self.process_group if sync else False)
        elif rewards.shape == (m,):
            point = rewards
        else:
            raise ValueError(f"reference rewards must have shape (m,) or (B, m) with m={m}, got {tuple(rewards.shape)}")
        if not point.isfinite().all():
            raise ValueError(f"the reference point must be finite, got {point.tolist()}")
        self.ref_point.copy_(point.to(self.ref_point.dtype))

    def compute(self) -> dict[str, Tensor]:
        """Grid means plus their Pareto and steerability summary.

        Returns:
            The entries of :meth:`GridRewardMeans.compute` and of :func:`pareto_steerability`: ``rewards`` (P, m),
            ``kl`` (P,), ``counts`` (P,), ``front_mask`` (P,), ``spearman`` (m,), ``violations`` (m,),
            ``hypervolume`` ().

        Raises:
            RuntimeError: no reference point has been set.
        """
        if not self.has_reference_point:
            raise RuntimeError(
                "no hypervolume reference point: pass ref_point= or call set_reference_point() with the reference "
                "policy's rewards before compute()"
            )
        out = super().compute()
        return {**out, **pareto_steerability(self.grid_weights, out["rewards"], self.ref_point, self.tol)}


def prompt_digest(prompt: str, source: str = "", reference: str = "") -> bytes:
    """The 32-byte SHA-256 of a prompt's text and of the texts its rewards read (``source``, ``reference``): the
    identity of a prompt in per-prompt rows, whatever batch or rank it was evaluated in."""
    return hashlib.sha256(json.dumps([prompt, source, reference]).encode()).digest()


def prompts_sha256(digests: Sequence[bytes]) -> str:
    """One hex digest of a list of prompts, in order (each one's :func:`prompt_digest`): two reports with the same value
    evaluated the same prompts in the same order, so their per-prompt rows pair up."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


def mean_and_standard_error(rows: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean over ``dim`` and its standard error ``std / sqrt(n)`` (``std`` with Bessel's correction), in float64.

    The rows are the units of the SE (here: prompts, each already averaged over its samples). nan where ``n < 2``.

    Example:
        >>> mean_and_standard_error(torch.tensor([1.0, 2.0, 3.0, 6.0]), dim=0)
        (tensor(3., dtype=torch.float64), tensor(1.0801, dtype=torch.float64))
    """
    rows = rows.to(torch.float64)
    n = rows.shape[dim]
    mean = rows.mean(dim)
    if n < 2:
        return mean, torch.full_like(mean, torch.nan)
    var = (rows - mean.unsqueeze(dim)).pow(2).sum(dim) / (n - 1)
    return mean, var.sqrt() / math.sqrt(n)


class PromptRows(Metric):
    """Each prompt's mean reward (and mean sequence log-ratio) at each grid point, gathered from every rank.

    Notation: G grid points, m objectives, n prompts in one ``update``, P distinct prompts in all.

    A prompt is identified by its :func:`prompt_digest`. ``compute`` sorts the prompts by digest, so two evaluations
    of the same prompts list them in the same order whatever the batch size, the number of ranks or the policy
    evaluated; and it keeps a digest once: the distributed sampler repeats prompts to give every rank the same
    number (a prompt repeated in the data also counts once here).

    The states are flat float lists concatenated across ranks (``dist_reduce_fx="cat"``): one dtype and one dimension,
    so that uneven shares gather (torchmetrics pads and trims them) and a rank without prompts still takes part. The
    digest's bytes are stored as floats, which hold 0..255 exactly.

    Args:
        num_points: G.
        num_objectives: m.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    DIGEST_BYTES = 32

    def __init__(self, num_points: int, num_objectives: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_points < 1 or num_objectives < 1:
            raise ValueError(f"need num_points >= 1 and num_objectives >= 1, got {num_points} and {num_objectives}")
        self.num_points, self.num_objectives = num_points, num_objectives
        self.add_state("digest_bytes", [], dist_reduce_fx="cat")  # (n * 32,)
        self.add_state("reward_rows", [], dist_reduce_fx="cat")  # (n * G * m,)
        self.add_state("kl_rows", [], dist_reduce_fx="cat")  # (n * G,), nan where no KL was measured

    def update(self, digests: Sequence[bytes], rewards: Tensor, kl: Tensor | None = None) -> None:
        """Add the rows of ``n`` prompts.

        Args:
            digests: n :func:`prompt_digest` values.
            rewards: (n, G, m) each prompt's mean raw reward over its samples at each grid point.
            kl: (n, G) each prompt's mean sequence log-ratio over its KL samples at each grid point, or None (nan).

        Raises:
            ValueError: bad shapes or a digest that is not 32 bytes.
        """
        shape = (len(digests), self.num_points, self.num_objectives)
        if rewards.shape != shape:
            raise ValueError(f"`rewards` must have shape (n, G, m) = {shape}, got {tuple(rewards.shape)}")
        if kl is not None and kl.shape != shape[:2]:
            raise ValueError(f"`kl` must have shape (n, G) = {shape[:2]}, got {tuple(kl.shape)}")
        if any(len(d) != self.DIGEST_BYTES for d in digests):
            raise ValueError(f"every digest must be {self.DIGEST_BYTES} bytes (prompt_digest), got lengths "
                             f"{[len(d) for d in digests]}")
        kl = torch.full(shape[:2], torch.nan) if kl is None else kl
        digest_bytes = torch.tensor([list(d) for d in digests], dtype=self.dtype, device=self.device)
        self.digest_bytes.append(digest_bytes.view(-1))
        self.reward_rows.append(rewards.detach().to(self.device, self.dtype).reshape(-1))
        self.kl_rows.append(kl.detach().to(self.device, self.dtype).reshape(-1))

    def compute(self) -> dict[str, Any]:
        """The rows of every rank, sorted by digest, each digest once.

        Returns:
            ``digests`` list of P bytes, ``rewards`` (G, P, m), ``kl`` (G, P) (on the metric's device, its dtype).

        Raises:
            ValueError: no prompt was added on any rank.
        """
        if isinstance(self.digest_bytes, list) and not self.digest_bytes:
            raise ValueError("no prompt rows to compute: update() was never called")
        raw = dim_zero_cat(self.digest_bytes).round().to(torch.uint8).view(-1, self.DIGEST_BYTES).tolist()
        if not raw:
            raise ValueError("no prompt rows to compute: every rank's share was empty")
        digests = [bytes(d) for d in raw]
        rewards = dim_zero_cat(self.reward_rows).view(len(digests), self.num_points, self.num_objectives)
        kl = dim_zero_cat(self.kl_rows).view(len(digests), self.num_points)
        order, seen = [], set()
        for i in sorted(range(len(digests)), key=digests.__getitem__):  # stable: a repeat keeps its first copy
            if digests[i] not in seen:
                seen.add(digests[i])
                order.append(i)
        index = torch.tensor(order, device=rewards.device)
        return {"digests": [digests[i] for i in order], "rewards": rewards[index].transpose(0, 1),
                "kl": kl[index].T}
