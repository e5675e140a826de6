"""RewardNormalizer: exact running statistics, checkpoint round trip, modes and cross-rank synchronisation."""

from __future__ import annotations

import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clp_lightning.rewards import RewardNormalizer


def _batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 100.0, 0.01])
    return [torch.randn(n, 3, generator=g) * scales + torch.tensor([5.0, -3.0, 0.0]) for n in (7, 1, 12, 4)]


def test_running_stats_equal_stats_of_all_batches():
    norm = RewardNormalizer(3)
    batches = _batches()
    for b in batches:
        norm(b)
    seen = torch.cat(batches).double()
    assert norm.count.item() == len(seen)
    torch.testing.assert_close(norm.mean, seen.mean(0))
    torch.testing.assert_close(norm.var, seen.var(0, unbiased=False))


def test_first_batch_is_standardised_and_includes_itself():
    b = _batches()[0]
    out = RewardNormalizer(3)(b)
    assert out.dtype == b.dtype
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_state_dict_round_trip_reproduces_outputs_exactly():
    batches = _batches()
    norm = RewardNormalizer(3)
    for b in batches[:2]:
        norm(b)
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    assert set(norm.state_dict()) == {"count", "mean", "var"}
    restored = RewardNormalizer(3)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for b in batches[2:]:
        torch.testing.assert_close(restored(b), norm(b), rtol=0, atol=0)
    torch.testing.assert_close(restored.var, norm.var, rtol=0, atol=0)


def test_update_false_freezes_stats_and_fresh_normalizer_is_identity():
    b = _batches()[0]
    fresh = RewardNormalizer(3)
    torch.testing.assert_close(fresh(b, update=False), b)
    assert fresh.count.item() == 0
    norm = RewardNormalizer(3)
    norm(b)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm(b * 10, update=False)
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_batch_and_none_modes():
    b = _batches()[2]
    torch.testing.assert_close(RewardNormalizer(3, mode="none")(b), b)
    batch = RewardNormalizer(3, mode="batch")
    expected = (b - b.mean(0)) / (b.std(0, unbiased=False) + 1e-8)
    torch.testing.assert_close(batch(b), expected, atol=1e-5, rtol=1e-5)
    assert batch.count.item() == 0  # batch mode keeps no history
    constant = RewardNormalizer(2)(torch.full((4, 2), 3.0))
    assert torch.equal(constant, torch.zeros(4, 2))  # eps, not a division by zero


def test_momentum_is_an_exponential_moving_average():
    norm = RewardNormalizer(1, momentum=0.5)
    norm(torch.tensor([[0.0], [2.0]]))  # first batch initialises: mean 1, var 1
    norm(torch.tensor([[5.0], [5.0]]))  # batch mean 5, var 0
    assert norm.mean.item() == pytest.approx(3.0)
    assert norm.var.item() == pytest.approx(0.5 * 1 + 0.5 * 0 + 0.25 * 16)  # mixture of the two


def test_stats_stay_float64_when_the_parent_is_cast():
    norm = RewardNormalizer(2)
    norm(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    mean = norm.mean.clone()
    parent = torch.nn.Sequential(norm).to(torch.bfloat16)
    assert parent[0].mean.dtype == torch.float64 and torch.equal(parent[0].mean, mean)
    out = parent[0](torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_sync_fn_makes_ranks_see_the_global_batch():
    # Two ranks holding the same batch: the global statistics are those of the batch repeated twice.
    b = _batches()[0]
    synced = RewardNormalizer(3, sync_fn=lambda stats: stats * 2)
    synced(b)
    assert synced.count.item() == 2 * len(b)
    torch.testing.assert_close(synced.var, torch.cat([b, b]).double().var(0, unbiased=False))


@pytest.mark.parametrize("mode", ["running", "batch"])
def test_variance_is_exact_for_a_large_mean_and_a_small_spread(mode):
    # A length- or count-like reward far from 0 with spread 1: E[r^2] - E[r]^2 lost every digit (variance 0, so the
    # column was divided by eps and blew up to ~1e8); the deviations from the mean keep them.
    g = torch.Generator().manual_seed(0)
    batches = [1e8 + torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0]) for n in (16, 5)]
    norm = RewardNormalizer(2, mode=mode)
    outs = [norm(b) for b in batches]
    seen = torch.cat(batches) if mode == "running" else batches[-1]
    if mode == "running":
        torch.testing.assert_close(norm.var, seen.var(0, unbiased=False), rtol=1e-6, atol=0)
    expected = (batches[-1] - seen.mean(0)) / seen.std(0, unbiased=False)
    torch.testing.assert_close(outs[-1], expected, rtol=0, atol=1e-6)
    # under a sync over ranks too: two ranks holding the same float32 batch near 1e4
    b = (1e4 + torch.randn(64, 1, generator=g)).float()
    synced = RewardNormalizer(1, mode=mode, sync_fn=lambda stats: stats * 2)
    _, mean, var = synced.batch_stats(b)
    reference = torch.cat([b, b]).double()
    torch.testing.assert_close(mean, reference.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(var, reference.var(0, unbiased=False), rtol=1e-9, atol=0)


def test_a_checkpoint_of_the_running_stats_loads_unchanged():
    # the state is still (count, mean, var) in float64: a checkpoint written before the two-pass variance resumes with
    # the same statistics and the same outputs
    state = {"count": torch.tensor(12.0, dtype=torch.float64), "mean": torch.tensor([5.0, -3.0], dtype=torch.float64),
             "var": torch.tensor([4.0, 0.25], dtype=torch.float64)}
    norm = RewardNormalizer(2)
    norm.load_state_dict(state)
    r = torch.tensor([[7.0, -2.5]])
    torch.testing.assert_close(norm(r, update=False), torch.tensor([[1.0, 1.0]]))
    for key, value in state.items():
        assert norm.state_dict()[key].dtype == torch.float64 and torch.equal(norm.state_dict()[key], value)


def test_bad_shapes_and_arguments():
    with pytest.raises(ValueError, match=r"\(N, 3\).*\(4, 2\)"):
        RewardNormalizer(3)(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="mode"):
        RewardNormalizer(3, mode="ema")
    with pytest.raises(ValueError, match="momentum"):
        RewardNormalizer(3, momentum=0.0)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_an_eps_that_is_not_finite_and_positive_is_refused(eps):
    # eps=-1 turned a batch of two rewards into -inf/+inf, eps=nan made every output NaN, eps=0 divided constant
    # rewards by zero (NaN), eps=inf made every output 0
    with pytest.raises(ValueError, match=f"eps must be finite and > 0, got {eps}"):
        RewardNormalizer(2, eps=eps)


def test_a_non_finite_reward_is_refused_and_leaves_the_stats_untouched():
    norm = RewardNormalizer(3)
    norm(_batches()[0])
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    bad = _batches()[2].clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] are NaN or infinite"):
        norm(bad)  # used to turn mean[1] and var[1] into NaN for the rest of the run (and into the checkpoint)
    for key, value in norm.state_dict().items():
        torch.testing.assert_close(value, before[key])
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        RewardNormalizer(3, mode="batch")(bad)
    with pytest.raises(ValueError, match="NaN or infinite"):  # a NaN on another rank reaches this one through the sum
        RewardNormalizer(3, sync_fn=lambda stats: stats + float("nan"))(_batches()[0])


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        norm = RewardNormalizer(3)
        for b in _batches(seed=rank):  # each rank sees different data
            norm(b)
        torch.save(torch.cat([norm.count.view(1), norm.mean, norm.var]), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_all_ranks_hold_identical_global_stats(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: re-importing torch and transformers in each child would dominate the test's time.
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    everything = torch.cat(_batches(seed=0) + _batches(seed=1)).double()
    for rank in range(2):
        stats = torch.load(tmp_path / f"{rank}.pt")
        count, mean, var = stats[0], stats[1:4], stats[4:]
        assert count.item() == len(everything)
        torch.testing.assert_close(mean, everything.mean(0))
        torch.testing.assert_close(var, everything.var(0, unbiased=False))
