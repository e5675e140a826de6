"""Spearman correlation and monotonicity violations on m = 2 and m = 3 weight grids."""

import itertools
import math

import pytest
import torch

from clp_lightning.evaluation import grid_step, monotonicity_violations, spearman, steerability


def grid_m2(n: int = 11) -> torch.Tensor:
    w1 = torch.linspace(0, 1, n)  # float noise on purpose: 0.1 steps are not exact in binary
    return torch.stack([w1, 1 - w1], dim=-1)


def lattice_m3(step: float = 0.25) -> torch.Tensor:
    units = round(1 / step)
    rows = [(a, b, units - a - b) for a, b in itertools.product(range(units + 1), repeat=2) if a + b <= units]
    return torch.tensor(rows, dtype=torch.float32) * step


def test_spearman_by_hand_with_ties():
    # Ranks of y with the tie at 7 averaged: [1, 2, 3.5, 5, 3.5]; centred rank products sum to 8,
    # squared deviations to 10 and 9.5.
    assert spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7])) == pytest.approx(8 / 95**0.5)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 0.5, -3])) == pytest.approx(-1.0)
    # Monotone but nonlinear: ranks only.
    assert spearman(torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.tensor([1.0, 10, 100, 1000])) == pytest.approx(1.0)


def test_pearson_of_a_constant_is_nan_whatever_its_rounding():
    from clp_lightning.evaluation.steerability import pearson

    # 0.1 is not exact in binary: centring three copies leaves residues of about 1e-17, not zeros
    assert math.isnan(pearson(torch.tensor([0.1] * 3, dtype=torch.float64), torch.tensor([1.0, 2, 3])))
    assert math.isnan(pearson(torch.tensor([1.0, 2, 3]), torch.full((3,), 0.7)))
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)) == pytest.approx(1)


def test_spearman_reads_python_floats_in_float64():
    # rounded to float32 first, the rewards would all be 0.3: a constant, so nan
    assert spearman([0.0, 0.1, 0.2], [0.3, 0.3 + 1e-9, 0.3 + 2e-9]) == pytest.approx(1.0)


def test_spearman_undefined_is_nan_and_shape_errors():
    assert math.isnan(spearman(torch.tensor([1.0, 2, 3]), torch.tensor([4.0, 4, 4])))
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))
    with pytest.raises(ValueError, match=r"got \(3,\) and \(2,\)"):
        spearman(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 2]))


def test_grid_step():
    assert grid_step(grid_m2()) == pytest.approx(0.1)
    assert grid_step(lattice_m3()) == pytest.approx(0.25)
    assert grid_step(torch.tensor([[0.5, 0.5]])) == 0.0


def test_monotonicity_m2_counts_consecutive_decreases():
    weights = grid_m2()
    r1 = torch.tensor([0.0, 1, 2, 1.5, 3, 4, 5, 4.9, 6, 7, 8])  # drops 2 -> 1.5 and 5 -> 4.9 as w_1 grows
    r2 = torch.tensor([10.0, 9, 8, 7, 6, 6.5, 4, 3, 2, 1, 0])  # along w_2 (right to left): 4 -> 6.5 -> 6 drops once
    means = torch.stack([r1, r2], dim=-1)
    assert monotonicity_violations(weights, means, 0) == 2
    assert monotonicity_violations(weights, means, 0, tol=0.2) == 1  # 0.1 drop is within tolerance
    assert monotonicity_violations(weights, means, 1) == 1
    # a plateau is no violation: only a strict decrease counts (3 flat steps here)
    plateau = torch.tensor([0.0, 1, 1, 1, 2, 3, 3, 4, 5, 6, 7])
    assert monotonicity_violations(weights, torch.stack([plateau, plateau.flip(0)], dim=-1), 0) == 0
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    assert monotonicity_violations(weights[perm], means[perm], 0) == 2  # row order does not matter
    rho, violations = steerability(weights, means)
    assert violations.tolist() == [2, 1]
    assert rho[0] > 0.9 and rho[1] > 0.9


def test_monotonicity_m3_lattice():
    weights = lattice_m3()
    assert weights.shape == (15, 3)
    # Adjacent pairs for objective i: a point a and an objective j != i with a_j >= one step. In units of the
    # step (coordinates summing to 4) 10 points have a_j >= 1 for each j, so 2 * 10 = 20 pairs per objective.
    assert [monotonicity_violations(weights, -weights, i) for i in range(3)] == [20, 20, 20]
    assert [monotonicity_violations(weights, weights, i) for i in range(3)] == [0, 0, 0]

    means = weights.clone()
    spike = (weights - torch.tensor([0.5, 0.25, 0.25])).abs().sum(-1).argmin()
    means[spike, 0] = 10.0
    # Moving a step onto objective 0 from the spike leads to (0.75, 0, 0.25) and (0.75, 0.25, 0): both drop.
    # Steps into the spike go up; objectives 1 and 2 are unchanged.
    rho, violations = steerability(weights, means)
    assert violations.tolist() == [2, 0, 0]
    assert rho[1:].tolist() == [pytest.approx(1.0), pytest.approx(1.0)]


def test_monotonicity_errors():
    with pytest.raises(ValueError, match="i=2 out of range for m=2"):
        monotonicity_violations(grid_m2(), grid_m2(), 2)
    with pytest.raises(ValueError, match=r"got \(11, 2\) and \(10, 2\)"):
        monotonicity_violations(grid_m2(), grid_m2()[:10], 0)
    # a flat reward is no violation; a negative slack would count each of its 10 steps
    for tol in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"tol must be >= 0 .*got (-0.1|nan)"):
            monotonicity_violations(grid_m2(), torch.ones(11, 2), 0, tol=tol)


def test_nan_rewards_are_not_ranked_into_a_trend():
    # a nan compares False with everything: ranked, it would sit below every value and give a finite rho
    y = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    assert math.isnan(spearman(torch.tensor([0.0, 1, 2, 3]), y))
    assert math.isnan(spearman(y, torch.tensor([0.0, 1, 2, 3])))
    weights, means = grid_m2(4), torch.stack([torch.tensor([1.0, float("nan"), 0.5, 0.0])] * 2, dim=-1)
    with pytest.raises(ValueError, match=r"`means` has nan in grid points \[1\]"):
        steerability(weights, means)
    with pytest.raises(ValueError, match=r"`means` has nan in grid points \[1\]"):
        monotonicity_violations(weights, means, 0)
    with pytest.raises(ValueError, match=r"`weights` has nan in grid points \[0\]"):
        steerability(torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), torch.zeros(2, 2))
