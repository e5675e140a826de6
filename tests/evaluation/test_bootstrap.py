"""Bootstrap intervals of a report's hypervolume and of the paired difference of two reports, on hand-checked cases."""

import copy

import pytest

from clp_lightning.evaluation import bootstrap_ci, hypervolume, paired_bootstrap


def report(per_prompt: list[list[list[float]]], grid=None, ref_point=None, sha="p" * 64) -> dict:
    """A report as far as the bootstrap reads it: per_prompt (G, P, m)."""
    m = len(per_prompt[0][0])
    grid = grid or [[1.0 / m] * m for _ in per_prompt]
    return {"objectives": [f"r{i}" for i in range(m)], "grid": grid, "ref_point": ref_point or [0.0] * m,
            "prompts_sha256": sha, "per_prompt_rewards": per_prompt}


def test_one_objective_two_prompts_by_hand():
    # m = 1, ref 0: the hypervolume of a front is its best mean. Two prompts with rewards 1 and 3: a resample is
    # {1, 1} (1/4), {1, 3} (1/2) or {3, 3} (1/4), so the hypervolume is 1, 2 or 3 and the 95% interval is [1, 3].
    out = bootstrap_ci(report([[[1.0], [3.0]]]), num_resamples=4000, seed=1)
    assert out["hypervolume"] == 2.0 and out["ci"] == [1.0, 3.0]
    # the resampled hypervolume has variance 1/4 + 1/4 = 1/2: its std is sqrt(1/2), not the variance 1/2
    assert out["num_prompts"] == 2 and out["level"] == 0.95
    assert out["standard_error"] == pytest.approx(0.5**0.5, abs=0.03)
    # the level sets the tails: a 60% interval (tails 0.2 and 0.8) still reaches 1 and 3, each a quarter of the mass,
    # while a 30% one (tails 0.35 and 0.65) lies inside the middle half, all of it 2
    assert bootstrap_ci(report([[[1.0], [3.0]]]), num_resamples=4000, level=0.6, seed=1)["ci"] == [1.0, 3.0]
    assert bootstrap_ci(report([[[1.0], [3.0]]]), num_resamples=4000, level=0.3, seed=1)["ci"] == [2.0, 2.0]


def test_prompts_that_agree_give_a_point_interval():
    rows = [[[0.0, 2.0]] * 5, [[2.0, 0.0]] * 5]  # two grid points, five identical prompts
    out = bootstrap_ci(report(rows, ref_point=[-1.0, -1.0]), num_resamples=200)
    assert out["hypervolume"] == hypervolume([[0.0, 2.0], [2.0, 0.0]], [-1.0, -1.0]) == 5.0  # 3 + 3 - 1 overlap
    assert out["ci"] == [5.0, 5.0]


def test_identical_reports_differ_by_exactly_zero():
    rows = [[[0.1 * p, 1.0 - 0.05 * p] for p in range(7)], [[0.5 + 0.02 * p, 0.3 * p] for p in range(7)]]
    a = report(rows)
    out = paired_bootstrap(a, copy.deepcopy(a), num_resamples=300)
    assert out["difference"] == 0.0 and out["ci"] == [0.0, 0.0] and out["fraction_a_better"] == 0.0


def test_pairing_cancels_what_the_prompts_share():
    # b is a moved up by 0.5 on every prompt: each resample's difference is exactly the same, while each report's
    # own interval is wide (its prompts differ a lot)
    a_rows = [[[1.0], [3.0], [2.0], [6.0]]]
    b_rows = [[[r[0] + 0.5] for r in a_rows[0]]]
    out = paired_bootstrap(report(b_rows), report(a_rows), num_resamples=500)
    assert out["difference"] == pytest.approx(0.5) and out["ci"] == pytest.approx([0.5, 0.5])
    assert out["fraction_a_better"] == 1.0
    low, high = bootstrap_ci(report(a_rows), num_resamples=500)["ci"]
    assert high - low > 1.0


def test_a_dominating_front_has_an_interval_above_zero():
    # two objectives, noisy prompts; b = a + 0.2 everywhere: better in both objectives at every grid point
    rows = [[[0.1 + 0.3 * ((p * 7) % 5) / 5, 1.0 + 0.2 * ((p * 3) % 4)] for p in range(12)],
            [[0.8 + 0.1 * ((p * 5) % 3), 0.2 + 0.4 * ((p * 2) % 5) / 5] for p in range(12)]]
    shifted = [[[x + 0.2 for x in row] for row in point] for point in rows]
    out = paired_bootstrap(report(shifted), report(rows), num_resamples=500)
    assert out["difference"] > 0 and out["ci"][0] > 0 and out["hypervolume_a"] > out["hypervolume_b"]
    reverse = paired_bootstrap(report(rows), report(shifted), num_resamples=500)
    assert reverse["difference"] == pytest.approx(-out["difference"]) and reverse["ci"][1] < 0


@pytest.mark.parametrize("key, value", [("prompts_sha256", "q" * 64), ("grid", [[0.0, 1.0], [1.0, 0.0]]),
                                        ("ref_point", [-1.0, 0.0]), ("objectives", ["x", "y"])])
def test_reports_that_do_not_pair_are_refused(key, value):
    a = report([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 1.0], [0.0, 1.0]]])
    b = {**copy.deepcopy(a), key: value}
    with pytest.raises(ValueError, match=f"their {key} differ"):
        paired_bootstrap(a, b)


def test_reports_without_per_prompt_rows_are_refused():
    a = report([[[1.0], [3.0]]])
    old = {k: v for k, v in a.items() if k != "per_prompt_rewards"}
    with pytest.raises(ValueError, match="no per_prompt_rewards"):
        bootstrap_ci(old)
    with pytest.raises(ValueError, match="'prompts_sha256' is missing from report b"):
        paired_bootstrap(a, {k: v for k, v in old.items() if k != "prompts_sha256"})
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci(a, level=1.0)
