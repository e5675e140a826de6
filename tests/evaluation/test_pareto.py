"""Pareto front and exact hypervolume against hand-computed and brute-force values."""

import itertools

import pytest
import torch

from clp_lightning.evaluation import hypervolume, pareto_front_mask


def test_front_by_hand_keeps_duplicates():
    points = [(1, 3), (2, 2), (3, 1), (1, 1), (2, 2)]
    # (1, 1) is dominated by (2, 2); the two equal (2, 2) do not dominate each other.
    assert pareto_front_mask(points).tolist() == [True, True, True, False, True]


def test_front_weak_domination_and_3d():
    # (1, 2) loses to (1, 3): equal in one objective, worse in the other.
    assert pareto_front_mask([(1, 3), (1, 2)]).tolist() == [True, False]
    points = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    assert pareto_front_mask(points).tolist() == [True, True, False, True]


def test_front_errors():
    with pytest.raises(ValueError, match=r"shape \(P, m\), got \(3,\)"):
        pareto_front_mask([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"nan in rows \[1\]"):
        pareto_front_mask([(1.0, 2.0), (float("nan"), 0.0)])


STAIRCASE = [(1, 3), (2, 2), (3, 1)]


@pytest.mark.parametrize(
    ("points", "ref", "expected"),
    [
        (STAIRCASE, (0, 0), 3 + 2 + 1),  # columns [0,1] x 3, [1,2] x 2, [2,3] x 1
        (STAIRCASE, (0.5, 0.5), 0.5 * 2.5 + 1 * 1.5 + 1 * 0.5),
        # Only (2, 2) is strictly better than (1, 1) in both objectives; the others touch the reference point.
        (STAIRCASE, (1, 1), 1.0),
        (STAIRCASE + [(1, 1), (2, 2), (0.5, 2.5)], (0, 0), 6.0),  # dominated points and duplicates add nothing
        ([(1, 1)], (2, 2), 0.0),
        ([(-1, 4), (3, -2)], (-2, -3), 1 * 7 + 4 * 1),  # negative rewards: [-2,-1] x [-3,4] and [-1,3] x [-3,-2]
    ],
)
def test_hypervolume_2d_by_hand(points, ref, expected):
    assert hypervolume(points, ref) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(2, 3, 4)], 24),
        ([(2, 2, 2), (3, 1, 1)], 8 + 3 - 2),  # overlap box (2, 1, 1)
        # |A| + |B| + |C| - |AB| - |AC| - |BC| + |ABC| with A=(1,2,3), B=(3,2,1), C=(2,2,2); the intersections are
        # the boxes at the element-wise minima (1,2,1), (1,2,2), (2,2,1) and (1,2,1).
        ([(1, 2, 3), (3, 2, 1), (2, 2, 2)], 6 + 6 + 8 - 2 - 4 - 4 + 2),
    ],
)
def test_hypervolume_3d_by_inclusion_exclusion(points, expected):
    assert hypervolume(points, (0, 0, 0)) == pytest.approx(expected)


def _unit_cells(points, ref, hi):
    # Integer coordinates: unit cell [c, c+1] is dominated iff its upper corner c+1 <= some point everywhere.
    m = len(ref)
    pts = torch.tensor(points)
    count = 0
    for cell in itertools.product(*[range(ref[d], hi) for d in range(m)]):
        count += int(((torch.tensor(cell) + 1) <= pts).all(-1).any())
    return count


@pytest.mark.parametrize(("m", "num_points", "hi"), [(2, 12, 8), (3, 10, 6), (3, 25, 6), (4, 8, 4)])
def test_hypervolume_matches_brute_force_on_integer_points(m, num_points, hi):
    gen = torch.Generator().manual_seed(m * 100 + num_points)
    for _ in range(3):
        points = torch.randint(-1, hi + 1, (num_points, m), generator=gen).tolist()
        ref = (0,) * m
        assert hypervolume(points, ref) == pytest.approx(_unit_cells(points, ref, hi))


def test_hypervolume_is_order_invariant_and_handles_empty():
    points = torch.rand(20, 3, generator=torch.Generator().manual_seed(0))
    ref = torch.tensor([0.1, 0.1, 0.1])
    assert hypervolume(points, ref) == pytest.approx(hypervolume(points.flip(0), ref))
    assert hypervolume(torch.zeros(0, 3), ref) == 0.0
    assert hypervolume([(5.0,), (3.0,)], (1.0,)) == 4.0


def test_python_floats_are_read_in_float64():
    # in float32 both rows of the front would be 0.1 (a tie, both kept) and the volume 1e-7 would lose a few percent
    assert pareto_front_mask([[1.0, 0.1], [1.0, 0.1 + 1e-9]]).tolist() == [False, True]
    assert hypervolume([[1.0, 0.1 + 1e-7]], [0.0, 0.1]) == pytest.approx(1e-7, rel=1e-6)


def test_hypervolume_errors():
    with pytest.raises(ValueError, match=r"`ref` must have shape \(m,\) = \(2,\), got \(3,\)"):
        hypervolume(STAIRCASE, (0, 0, 0))
    with pytest.raises(ValueError, match="`ref` contains nan"):
        hypervolume(STAIRCASE, (0, float("nan")))
    # an infinite reference point measures nothing useful: -inf makes every front's volume infinite
    for ref in ((float("-inf"), 0.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match=r"`ref` must be finite, got \[.*inf"):
            hypervolume(STAIRCASE, ref)
