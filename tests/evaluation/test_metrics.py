"""GridRewardMeans, ParetoSteerabilityMetric and PromptRows: accumulation, reference point, per-prompt rows, standard
errors, and 2-process DDP reductions."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from clp_lightning.evaluation import (
    GridRewardMeans,
    ParetoSteerabilityMetric,
    PromptRows,
    mean_and_standard_error,
    pareto_steerability,
    prompt_digest,
    prompts_sha256,
)

STAIRCASE_WEIGHTS = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])


def test_grid_reward_means_accumulates_over_updates():
    metric = GridRewardMeans(num_points=3, num_objectives=2)
    metric.update(torch.tensor([0, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), kl=torch.tensor([0.5, 1.0]))
    metric.update(torch.tensor([1, 2, 2]), torch.tensor([[5.0, 6.0], [0.0, 1.0], [2.0, 3.0]]))
    metric.update(torch.tensor([0]), torch.tensor([[3.0, 0.0]]), kl=torch.tensor([1.5]))
    out = metric.compute()
    assert_close(out["rewards"], torch.tensor([[2.0, 1.0], [4.0, 5.0], [1.0, 2.0]]))
    assert out["counts"].tolist() == [2, 2, 2]
    assert_close(out["kl"][:2], torch.tensor([1.0, 1.0]))  # point 0: (0.5 + 1.5) / 2; point 1: one KL value
    assert math.isnan(out["kl"][2])  # no KL was given for point 2
    metric.reset()
    assert metric.count.sum() == 0 and metric.reward_sum.abs().sum() == 0


def test_grid_reward_means_names_empty_points_and_bad_input():
    metric = GridRewardMeans(num_points=4, num_objectives=2)
    metric.update(torch.tensor([0, 2]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"grid points \[1, 3\] received no samples"):
        metric.compute()
    with pytest.raises(ValueError, match=r"must be in \[0, 4\), got \[4, -1\]"):
        metric.update(torch.tensor([0, 4, -1]), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="integer tensor"):
        metric.update(torch.tensor([0.0]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"integer tensor, got torch.bool"):
        metric.update(torch.tensor([True, False]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"`rewards` must have shape \(B, m\) = \(1, 2\), got \(1, 3\)"):
        metric.update(torch.tensor([0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"`kl` must have shape \(B,\) = \(1,\), got \(2,\)"):
        metric.update(torch.tensor([0]), torch.zeros(1, 2), kl=torch.zeros(2))


def test_pareto_steerability_function():
    out = pareto_steerability(STAIRCASE_WEIGHTS, torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]), torch.zeros(2))
    assert out["hypervolume"].item() == pytest.approx(6.0)
    assert out["front_mask"].tolist() == [True, True, True]
    assert_close(out["spearman"], torch.tensor([1.0, 1.0]))
    assert out["violations"].tolist() == [0, 0]
    assert "hypervolume" not in pareto_steerability(STAIRCASE_WEIGHTS, torch.ones(3, 2))


def _staircase_metric(**kwargs) -> ParetoSteerabilityMetric:
    metric = ParetoSteerabilityMetric(STAIRCASE_WEIGHTS, **kwargs)
    metric.update(torch.tensor([0, 1, 2, 2]), torch.tensor([[1.0, 3.0], [2.0, 2.0], [2.0, 0.0], [4.0, 2.0]]))
    return metric  # means (1, 3), (2, 2), (3, 1)


def test_pareto_metric_with_explicit_reference_point():
    out = _staircase_metric(ref_point=[0.0, 0.0]).compute()
    assert out["hypervolume"].item() == pytest.approx(6.0)
    assert out["front_mask"].tolist() == [True, True, True]
    assert out["violations"].tolist() == [0, 0]
    assert_close(out["rewards"], torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]))


def test_reference_point_is_set_once_and_survives_reset_and_checkpoints():
    metric = _staircase_metric()
    with pytest.raises(RuntimeError, match="no hypervolume reference point"):
        metric.compute()
    # From the reference policy's per-sample rewards: mean (0.5, 0.5).
    metric.set_reference_point(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert metric.compute()["hypervolume"].item() == pytest.approx(0.5 * 2.5 + 1.5 + 0.5)
    with pytest.raises(RuntimeError, match=r"already set to \[0.5, 0.5\]"):
        metric.set_reference_point(torch.tensor([1.0, 1.0]))

    metric.reset()
    assert metric.ref_point.tolist() == [0.5, 0.5]
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]))
    assert metric.compute()["hypervolume"].item() == pytest.approx(3.25)

    restored = ParetoSteerabilityMetric(STAIRCASE_WEIGHTS)
    restored.load_state_dict(metric.state_dict())
    assert restored.has_reference_point and restored.ref_point.tolist() == [0.5, 0.5]

    metric.set_reference_point(torch.tensor([1.0, 1.0]), overwrite=True)
    metric.reset()
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]))
    assert metric.compute()["hypervolume"].item() == pytest.approx(1.0)


def test_reference_point_errors():
    metric = ParetoSteerabilityMetric(STAIRCASE_WEIGHTS)
    with pytest.raises(ValueError, match=r"shape \(m,\) or \(B, m\) with m=2, got \(3,\)"):
        metric.set_reference_point(torch.zeros(3))
    with pytest.raises(ValueError, match="must be finite"):
        metric.set_reference_point(torch.tensor([0.0, math.inf]))
    with pytest.raises(ValueError, match=r"`weights` must have shape \(P, m\)"):
        ParetoSteerabilityMetric(torch.zeros(3))
    # rows given as the point were averaged into one (here [1, 1]) without a word
    with pytest.raises(ValueError, match=r"`ref_point` must have shape \(m,\) = \(2,\), got \(2, 2\)"):
        ParetoSteerabilityMetric(STAIRCASE_WEIGHTS, ref_point=[[0.0, 0.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match="tol must be >= 0"):
        ParetoSteerabilityMetric(STAIRCASE_WEIGHTS, tol=-0.1)


# ---------------------------------------------------------------- DDP: 2 processes on gloo


def _ddp_data():
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([[1 - w, w] for w in (0.0, 0.25, 0.5, 0.75, 1.0)])
    index = torch.arange(5).repeat(6)[torch.randperm(30, generator=gen)]
    rewards = torch.randn(30, 2, generator=gen) + weights[index] * 2  # steerable on average
    kl = torch.rand(30, generator=gen)
    ref_rewards = torch.randn(8, 2, generator=gen) - 1
    return weights, index, rewards, kl, ref_rewards


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        weights, index, rewards, kl, ref_rewards = _ddp_data()
        expected = ParetoSteerabilityMetric(weights, sync_on_compute=False)
        expected.set_reference_point(ref_rewards)
        expected.update(index, rewards, kl)
        expected = expected.compute()

        # Uneven split on purpose (rank 0 gets 20 rows in two updates, rank 1 gets 10), and uneven reference rows.
        rows = slice(0, 20) if rank == 0 else slice(20, 30)
        metric = ParetoSteerabilityMetric(weights)
        metric.set_reference_point(ref_rewards[:3] if rank == 0 else ref_rewards[3:])
        for chunk in torch.arange(30)[rows].chunk(2):
            metric.update(index[chunk], rewards[chunk], kl[chunk])
        got = metric.compute()
        assert set(got) == set(expected)
        for key in expected:
            assert_close(got[key], expected[key], msg=lambda m, key=key: f"rank {rank}, {key}: {m}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_sync_equals_single_process():
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)


# ---------------------------------------------------------------- per-prompt rows and standard errors


def test_mean_and_standard_error_by_hand():
    rows = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [6.0, 10.0]])  # 4 prompts, 2 columns
    mean, se = mean_and_standard_error(rows, dim=0)
    # column 0: mean 3, deviations -2 -1 0 3, variance 14 / 3, SE sqrt(14/3) / 2; column 1: no spread
    assert_close(mean, torch.tensor([3.0, 10.0], dtype=torch.float64))
    assert_close(se, torch.tensor([(14 / 3) ** 0.5 / 2, 0.0], dtype=torch.float64))
    mean, se = mean_and_standard_error(rows[:1], dim=0)
    assert mean.tolist() == [1.0, 10.0] and se.isnan().all()  # one prompt: no standard error


def _prompt_data(num_prompts: int = 5, num_points: int = 3, m: int = 2):
    gen = torch.Generator().manual_seed(1)
    digests = [prompt_digest(f"post {i}", f"source {i}", "") for i in range(num_prompts)]
    return digests, torch.randn(num_prompts, num_points, m, generator=gen), torch.rand(num_prompts, num_points,
                                                                                       generator=gen)


def test_prompt_rows_come_out_in_digest_order_whatever_the_batches():
    digests, rewards, kl = _prompt_data()
    order = sorted(range(5), key=digests.__getitem__)
    one = PromptRows(3, 2)
    one.update(digests, rewards, kl)
    out = one.compute()
    assert out["digests"] == sorted(digests)
    assert_close(out["rewards"], rewards[order].transpose(0, 1))  # (G, P, m)
    assert_close(out["kl"], kl[order].T)
    # other batches, in another order, with a prompt repeated (as the distributed sampler pads): the same rows
    other = PromptRows(3, 2)
    for part in ([4, 0], [2], [3, 1, 4]):
        other.update([digests[i] for i in part], rewards[part], kl[part])
    again = other.compute()
    assert again["digests"] == out["digests"]
    assert_close(again["rewards"], out["rewards"])
    assert_close(again["kl"], out["kl"])
    assert prompts_sha256(again["digests"]) == prompts_sha256(out["digests"])
    no_kl = PromptRows(3, 2)
    no_kl.update(digests, rewards)
    assert no_kl.compute()["kl"].isnan().all()


def test_prompt_rows_check_their_inputs():
    metric = PromptRows(3, 2)
    with pytest.raises(ValueError, match=r"`rewards` must have shape \(n, G, m\) = \(1, 3, 2\), got \(1, 2, 2\)"):
        metric.update([prompt_digest("a")], torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="32 bytes"):
        metric.update([b"short"], torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="update"):
        metric.compute()


def _ddp_rows_worker(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        digests, rewards, kl = _prompt_data()
        expected = PromptRows(3, 2, sync_on_compute=False)
        expected.update(digests, rewards, kl)
        expected = expected.compute()
        # uneven shares, rank 1's padded with a repeat of prompt 0 (as DistributedSampler does)
        parts = [[0, 1], [2]] if rank == 0 else [[3, 4, 0]]
        metric = PromptRows(3, 2)
        for part in parts:
            metric.update([digests[i] for i in part], rewards[part], kl[part])
        got = metric.compute()
        assert got["digests"] == expected["digests"], f"rank {rank}"
        assert_close(got["rewards"], expected["rewards"])
        assert_close(got["kl"], expected["kl"])
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_prompt_rows_gather_in_one_order():
    mp.spawn(_ddp_rows_worker, args=(2, _free_port()), nprocs=2, join=True)
