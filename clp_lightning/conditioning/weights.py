"""Weightings over the objectives: validation, samplers and the evaluation grid.

A weighting ``w`` lies on the probability simplex: ``m`` finite, non-negative entries summing to one. A batch of
weightings has shape ``(B, m)``, one row per prompt or sequence.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

SIMPLEX_ATOL = 1e-4


def parse_weights(text: str) -> list[float]:
    """``"0.3,0.7"`` (or ``"0.3, 0.7"``) -> ``[0.3, 0.7]``; a clear error for anything else.

    Spaces around a comma are allowed; a space inside a value is not, since ``"1 0"`` is a weighting typed without
    its comma, not the number 10.
    """
    parts = [part.strip() for part in text.split(",")]
    try:
        if any(part == "" or any(c.isspace() for c in part) for part in parts):
            raise ValueError
        return [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"weighting {text!r} is not a comma-separated list of numbers, e.g. '0.3,0.7'") from None


def validate_weights(
    weights: Any,
    num_objectives: int | None = None,
    *,
    atol: float = SIMPLEX_ATOL,
    name: str = "weighting",
) -> Tensor:
    """Check that ``weights`` is a weighting ``(m,)`` or a batch of weightings ``(B, m)`` on the simplex.

    Args:
        weights: a tensor, a sequence of numbers (or of sequences), or a string such as ``"0.3,0.7"``.
        num_objectives: the expected ``m``; None accepts any ``m >= 1``.
        atol: tolerance on ``sum(w) == 1``.
        name: what to call the value in error messages.

    Returns:
        The weights as a float tensor of the same shape (float32 unless a floating tensor was given).

    Raises:
        ValueError: wrong shape or length, a NaN or infinite entry, a negative entry, or a row not summing to 1;
            the message names the offending value.
    """
    if isinstance(weights, str):
        weights = parse_weights(weights)
    if _holds_bool(weights):  # True would pass as 1: a YAML `[true, false]` is a typo, not a weighting
        raise ValueError(f"{name} {weights!r} contains bools; expected numbers >= 0 that sum to 1")
    w = weights if isinstance(weights, Tensor) else torch.as_tensor(weights, dtype=torch.float32)
    if not w.is_floating_point():
        w = w.float()
    if w.dim() not in (1, 2) or w.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (m,) or (B, m), got shape {tuple(w.shape)}: {_show(w)}")
    if num_objectives is not None and w.shape[-1] != num_objectives:
        raise ValueError(f"{name} {_show(w)} has {w.shape[-1]} entries, expected {num_objectives} (one per objective)")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} {_show(w)} contains NaN or infinite entries")
    if (w < 0).any():
        raise ValueError(f"{name} {_show(w)} has negative entries; weights must be >= 0")
    sums = w.sum(-1)
    bad = (sums - 1).abs() > atol
    if bad.any():
        row = w if w.dim() == 1 else w[bad.nonzero()[0, 0]]
        raise ValueError(f"{name} {_show(row)} sums to {float(row.sum()):.6g}, expected 1 (a point on the simplex)")
    return w


def _holds_bool(x: Any) -> bool:
    """Whether ``x`` is a bool or a bool tensor / array, or a (nested) sequence with one in it."""
    if isinstance(x, (list, tuple)):
        return any(_holds_bool(v) for v in x)
    return _is_bool(x) or (isinstance(x, np.ndarray) and x.dtype == np.bool_)


def _show(w: Tensor, limit: int = 6) -> str:
    flat = w.detach().flatten().tolist()
    text = ", ".join(f"{x:.4g}" for x in flat[:limit]) + (", ..." if len(flat) > limit else "")
    return f"[{text}]"


def simplex_grid(num_objectives: int, step: float) -> Tensor:
    """All weightings whose entries are multiples of ``step``, shape ``(P, m)``.

    ``m = 2``, ``step = 0.1`` gives 11 points (``w_1 = 0, 0.1, ..., 1``); ``m = 3``, ``step = 0.25`` gives 15. Points
    are ordered lexicographically by their lattice coordinates, so for ``m = 2`` ``w_1`` increases along the grid.
    """
    if num_objectives < 1:
        raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
    if not 0 < step <= 1:
        raise ValueError(f"grid step must be in (0, 1], got {step}")
    n = round(1 / step)
    if not math.isclose(n * step, 1.0, abs_tol=1e-9):
        raise ValueError(f"grid step {step} does not divide 1 (expected 1/n for an integer n, e.g. 0.1 or 0.25)")
    points = list(_compositions(n, num_objectives))  # C(n + m - 1, m - 1) points, not the (n + 1)^m of a cube
    return torch.tensor(points, dtype=torch.float64).div(n).float()


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """The tuples of ``parts`` non-negative integers summing to ``total``, in lexicographic order."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _is_bool(x: Any) -> bool:
    # bool is an int to Python: True would pass as 1 (a concentration, an index, a count) without a word
    return isinstance(x, (bool, np.bool_)) or (isinstance(x, Tensor) and x.dtype == torch.bool)


class WeightSampler:
    """Draws a weighting per prompt; subclasses implement :meth:`sample`."""

    def __init__(self, num_objectives: int) -> None:
        if _is_bool(num_objectives) or num_objectives < 1:
            raise ValueError(f"num_objectives must be an int >= 1, got {num_objectives!r}")
        self.num_objectives = num_objectives

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Return ``n`` weightings, shape ``(n, m)``, deterministic given ``generator``."""
        raise NotImplementedError


class DirichletSampler(WeightSampler):
    """``w ~ Dirichlet(concentration)``; a scalar concentration ``beta`` means ``beta * 1_m`` (1 = uniform)."""

    def __init__(self, num_objectives: int, concentration: float | Sequence[float] = 1.0) -> None:
        super().__init__(num_objectives)
        scalar = isinstance(concentration, (int, float))
        conc = [concentration] * num_objectives if scalar else list(concentration)
        # a bool passes as 1 and "1.0" as its characters: only numbers are numbers here
        if isinstance(concentration, str) or not all(isinstance(c, numbers.Real) and not _is_bool(c) for c in conc):
            raise ValueError(f"Dirichlet concentration {concentration!r} must be a positive number or "
                             f"{num_objectives} of them (not bools or text)")
        conc = [float(c) for c in conc]
        if len(conc) != num_objectives or any(not (c > 0 and math.isfinite(c)) for c in conc):
            raise ValueError(
                f"Dirichlet concentration {concentration!r} must be a positive number or {num_objectives} of them"
            )
        self.concentration = np.asarray(conc, dtype=np.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        # torch's Dirichlet takes no generator; seeding numpy from the torch generator keeps one source of randomness.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        w = np.random.default_rng(seed).dirichlet(self.concentration, size=n)
        return torch.from_numpy(w / w.sum(-1, keepdims=True)).float()


class OneHotSampler(WeightSampler):
    """One-hot weightings: always objective ``index``, or a random objective per row when ``index`` is None."""

    def __init__(self, num_objectives: int, index: int | None = None) -> None:
        super().__init__(num_objectives)
        if index is not None and (_is_bool(index) or not isinstance(index, (int, np.integer))):
            raise ValueError(f"one-hot index {index!r} must be an int (the objective's position) or None")
        if index is not None and not 0 <= index < num_objectives:
            raise ValueError(f"one-hot index {index} out of range for {num_objectives} objectives")
        self.index = index

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.index is None:
            idx = torch.randint(0, self.num_objectives, (n,), generator=generator)
        else:
            idx = torch.full((n,), self.index)
        return torch.nn.functional.one_hot(idx, self.num_objectives).float()


class FixedSampler(WeightSampler):
    """The same weighting for every row (fixed-weighting policies, single-reward experts)."""

    def __init__(self, weights: Sequence[float] | str, num_objectives: int | None = None) -> None:
        w = validate_weights(weights, num_objectives, name="fixed weighting")
        if w.dim() != 1:
            raise ValueError(f"a fixed weighting must have shape (m,), got {tuple(w.shape)}")
        super().__init__(w.numel())
        self.weights = w

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.weights.expand(n, -1).clone()
