"""Tests of the pure tensor code of the training step against hand-computed values."""

import math

import pytest
import torch
from torch.testing import assert_close

from clp_lightning.algorithms import (
    batch_mean_advantages,
    kl_loss,
    kl_penalized_rewards,
    kl_per_token,
    masked_mean,
    reinforce_loss,
    rloo_advantages,
    sample_alpha,
    scalarize,
    sequence_kl,
    sequence_log_probs,
    token_entropy,
    whiten,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- scalarisation and masks


def test_scalarize_is_row_wise_dot():
    rewards = t([1.0, 2.0], [3.0, 4.0], [-1.0, 5.0])
    weights = t([0.5, 0.5], [1.0, 0.0], [0.25, 0.75])
    assert_close(scalarize(rewards, weights), t(1.5, 3.0, -0.25 + 3.75))


@pytest.mark.parametrize(
    ("rewards", "weights", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(3, 3), r"`weights` must have shape .*\(3, 2\), got \(3, 3\)"),
        (torch.zeros(3, 2), torch.zeros(2, 2), r"got \(2, 2\)"),
        (torch.zeros(3), torch.zeros(3), r"`rewards` must have shape \(N, m\), got \(3,\)"),
    ],
)
def test_scalarize_rejects_bad_shapes(rewards, weights, match):
    with pytest.raises(ValueError, match=match):
        scalarize(rewards, weights)


def test_masked_mean_global_and_per_row():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert_close(masked_mean(x, mask), t(1.5)[0])
    assert_close(masked_mean(x, mask, dim=-1), t(1.5, 0.0))  # the empty row gives 0, not nan
    assert_close(masked_mean(x), t(3.5)[0])
    with pytest.raises(ValueError, match="`mask` must have shape"):
        masked_mean(x, mask[:, :2])


def test_sequence_log_probs_ignores_padding_even_if_minus_inf():
    token_logp = t([-1.0, -2.0, -math.inf], [-0.5, -0.5, -0.5])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert_close(sequence_log_probs(token_logp, mask), t(-3.0, -1.5))


# ---------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    # d = logp - ref = [1, -1]
    logp, ref = t([0.0, -1.0]), t([-1.0, 0.0])
    assert_close(kl_per_token(logp, ref, "k1"), t([1.0, -1.0]))
    assert_close(kl_per_token(logp, ref, "k2"), t([0.5, 0.5]))
    # k3 = exp(-d) + d - 1: exp(-1) + 1 - 1 and exp(1) - 1 - 1
    assert_close(kl_per_token(logp, ref, "k3"), t([math.exp(-1.0), math.e - 2.0]))
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_per_token(logp, ref, "k4")


def test_k3_is_exactly_zero_and_precise_near_zero():
    logp = t([-1.0, -1.0])
    assert_close(kl_per_token(logp, logp, "k3"), t([0.0, 0.0]))
    # k3 = d^2/2 - d^3/6 + ... for small d; in float32 the naive exp(-d) + d - 1 is off by ~10% at d = 1e-3.
    d = 1e-3
    k3 = kl_per_token(t([d], dtype=torch.float32), t([0.0], dtype=torch.float32), "k3")
    assert_close(k3, t([d * d / 2 - d**3 / 6], dtype=torch.float32), rtol=1e-3, atol=0)


def test_sequence_kl_is_masked_sum():
    logp = t([0.0, -1.0, -2.0], [-1.0, -1.0, -1.0])
    ref = t([-1.0, 0.0, 0.0], [-2.0, -2.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(sequence_kl(logp, ref, mask), t(1.0 - 1.0, 3.0))
    assert_close(sequence_kl(logp, ref, mask, "k2"), t(0.5 + 0.5, 1.5))


def test_kl_penalized_rewards_float_and_per_sequence_alpha():
    scalar, kl = t(1.0, 2.0), t(0.5, 1.0).requires_grad_()
    assert_close(kl_penalized_rewards(scalar, kl, 0.1), t(0.95, 1.9))
    assert_close(kl_penalized_rewards(scalar, kl, t(0.1, 1.0)), t(0.95, 1.0))
    # The penalty is part of the reward: no gradient flows back into the KL.
    assert not kl_penalized_rewards(scalar, kl, 0.1).requires_grad


def test_kl_penalized_rewards_errors():
    with pytest.raises(ValueError, match="`alpha` must be >= 0, got -0.1"):
        kl_penalized_rewards(t(1.0), t(0.0), -0.1)
    with pytest.raises(ValueError, match=r"`alpha` must have shape \(N,\) = \(2,\), got \(3,\)"):
        kl_penalized_rewards(t(1.0, 2.0), t(0.0, 0.0), t(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="`seq_kl` must have shape"):
        kl_penalized_rewards(t(1.0, 2.0), t(0.0), 0.1)


# ---------------------------------------------------------------- advantages


def test_rloo_by_hand():
    rewards = t(1.0, 2.0, 3.0, 10.0, 20.0, 30.0)
    expected = t(1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 25.0, 20 - 20.0, 30 - 15.0)
    assert_close(rloo_advantages(rewards, k=3), expected)
    assert_close(rloo_advantages(t(1.0, 3.0), k=2), t(-2.0, 2.0))


def test_rloo_errors_name_k_and_n():
    with pytest.raises(ValueError, match="k=1"):
        rloo_advantages(t(1.0, 2.0), k=1)
    with pytest.raises(ValueError, match="N=5 .* k=2"):
        rloo_advantages(torch.zeros(5), k=2)


def test_batch_mean_advantages():
    assert_close(batch_mean_advantages(t(1.0, 2.0, 3.0, 6.0)), t(-2.0, -1.0, 0.0, 3.0))


def test_whiten_by_hand():
    x = t(0.0, 4.0)  # mean 2, population variance 4
    assert_close(whiten(x, eps=0.0), t(-1.0, 1.0))
    assert_close(whiten(x, shift_mean=False, eps=0.0), t(1.0, 3.0))
    # Statistics come from the masked entries only; the masked-out entry is still transformed.
    assert_close(whiten(t(0.0, 4.0, 100.0), mask=torch.tensor([1, 1, 0]), eps=0.0), t(-1.0, 1.0, 49.0))
    assert_close(whiten(t(5.0)), t(0.0))


# ---------------------------------------------------------------- loss


def test_reinforce_loss_value_and_gradient_is_minus_a_over_n():
    seq_logp = t(-1.0, -2.0, -3.0, -4.0).requires_grad_()
    advantages = t(1.0, -1.0, 2.0, 0.0).requires_grad_()
    loss = reinforce_loss(seq_logp, advantages)
    assert_close(loss, t(1.25)[0])  # -(-1 + 2 - 6 + 0) / 4
    loss.backward()
    assert_close(seq_logp.grad, -advantages.detach() / 4)
    assert advantages.grad is None  # advantages are weights, not a gradient path


def test_reinforce_loss_with_kl_in_loss():
    seq_logp = t(-1.0, -2.0, -3.0, -4.0).requires_grad_()
    kl = t(1.0, 2.0, 3.0, 4.0).requires_grad_()
    loss = reinforce_loss(seq_logp, t(1.0, -1.0, 2.0, 0.0), kl_loss=kl, alpha=0.5)
    assert_close(loss, t(1.25 + 0.5 * 2.5)[0])
    loss.backward()
    assert_close(kl.grad, t(0.125, 0.125, 0.125, 0.125))
    per_seq_alpha = t(0.0, 0.0, 0.0, 1.0)
    assert_close(reinforce_loss(seq_logp, t(0.0, 0.0, 0.0, 0.0), kl, per_seq_alpha), t(1.0)[0])


def test_reinforce_loss_shape_errors():
    with pytest.raises(ValueError, match="`advantages` must have shape"):
        reinforce_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="`kl_loss` must have shape"):
        reinforce_loss(torch.zeros(3), torch.zeros(3), kl_loss=torch.zeros(2), alpha=0.1)


# ---------------------------------------------------------------- which KL estimator has the right gradient
# Exact expectations over all outcomes: E_{y ~ pi}[grad f(y)] = sum_y pi(y) grad f(y), with pi(y) held constant
# because sampling is not differentiated.


def _expected_grad(params, per_sample, probs):
    (grad,) = torch.autograd.grad((probs.detach() * per_sample).sum(), params, retain_graph=True)
    return grad


def test_kl_in_loss_gradients_on_a_bandit():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref_logp_all = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)
    logp_all = torch.log_softmax(theta, -1)
    probs = logp_all.exp()
    # One "sequence" per outcome y, T = 1.
    logp, ref, mask = logp_all[:, None], ref_logp_all[:, None], torch.ones(5, 1)

    forward_kl = (probs * (logp_all - ref_logp_all)).sum()
    reverse_kl = (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum()
    (grad_forward,) = torch.autograd.grad(forward_kl, theta, retain_graph=True)
    (grad_reverse,) = torch.autograd.grad(reverse_kl, theta, retain_graph=True)

    assert_close(_expected_grad(theta, kl_loss(logp, ref, mask, "k2"), probs), grad_forward)
    assert_close(_expected_grad(theta, kl_loss(logp, ref, mask, "k3"), probs), grad_reverse)
    assert_close(_expected_grad(theta, kl_loss(logp, ref, mask, "k1"), probs), torch.zeros(5, dtype=torch.float64))
    assert grad_forward.abs().sum() > 1e-3 and not torch.allclose(grad_forward, grad_reverse)


def test_sequence_kl_gradients_on_two_token_sequences():
    torch.manual_seed(1)
    vocab = 3
    theta = torch.randn(1 + vocab, vocab, dtype=torch.float64, requires_grad=True)  # row 0: first token; 1+a: after a
    ref_logits = torch.randn(1 + vocab, vocab, dtype=torch.float64)

    def token_logps(logits):  # (V*V, 2) log-probs of every sequence (a, b)
        lp = torch.log_softmax(logits, -1)
        a, b = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab)).T
        return torch.stack([lp[0, a], lp[1 + a, b]], dim=-1)

    logp, ref = token_logps(theta), token_logps(ref_logits)
    mask = torch.ones_like(logp)
    seq_logp = sequence_log_probs(logp, mask)
    probs = seq_logp.exp()
    assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    seq_kl_exact = (probs * (seq_logp - sequence_log_probs(ref, mask))).sum()
    (grad_kl,) = torch.autograd.grad(seq_kl_exact, theta, retain_graph=True)

    # KL in the reward (the default): REINFORCE with reward -KL(y) is exact.
    reward = kl_penalized_rewards(torch.zeros(vocab**2, dtype=torch.float64), sequence_kl(logp, ref, mask), 1.0)
    assert_close(_expected_grad(theta, -reward * seq_logp, probs), grad_kl)
    # KL in the loss: the sequence-level k2 is exact; per-token k2 misses the effect of token 1 on token 2's KL.
    assert_close(_expected_grad(theta, kl_loss(logp, ref, mask, "seq_k2"), probs), grad_kl)
    assert not torch.allclose(_expected_grad(theta, kl_loss(logp, ref, mask, "k2"), probs), grad_kl)


# ---------------------------------------------------------------- alpha sampling and entropy


def test_sample_alpha_ranges_and_reproducibility():
    draw = sample_alpha(10_000, 0.01, 1.0, torch.Generator().manual_seed(0), log_uniform=True)
    assert draw.shape == (10_000,) and draw.dtype == torch.float32
    assert draw.min() >= 0.01 and draw.max() <= 1.0
    # Log-uniform on [0.01, 1]: half the mass below the geometric midpoint 0.1.
    assert abs((draw < 0.1).double().mean().item() - 0.5) < 0.03
    uniform = sample_alpha(10_000, 0.0, 2.0, torch.Generator().manual_seed(0))
    assert uniform.min() >= 0.0 and uniform.max() <= 2.0 and abs(uniform.mean().item() - 1.0) < 0.03
    again = sample_alpha(10_000, 0.01, 1.0, torch.Generator().manual_seed(0), log_uniform=True)
    assert torch.equal(draw, again)
    assert torch.equal(sample_alpha(3, 0.5, 0.5), torch.full((3,), 0.5))


def test_sample_alpha_is_float32_under_a_half_precision_default_dtype():
    # Lightning's "bf16-true" sets the default dtype to bfloat16 around training_step: alphas came out bfloat16
    expected = sample_alpha(64, 0.01, 0.5, torch.Generator().manual_seed(0), log_uniform=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        draws = [sample_alpha(64, 0.01, 0.5, torch.Generator().manual_seed(0), log_uniform=u) for u in (True, False)]
    finally:
        torch.set_default_dtype(previous)
    assert all(d.dtype == torch.float32 for d in draws)
    assert torch.equal(draws[0], expected)


@pytest.mark.parametrize(
    ("low", "high", "log_uniform", "match"),
    [
        (0.5, 0.1, False, "low=0.5, high=0.1"),
        (-0.1, 1.0, False, "low=-0.1"),
        (0.0, 1.0, True, "log-uniform alpha needs low > 0, got low=0.0"),
    ],
)
def test_sample_alpha_errors(low, high, log_uniform, match):
    with pytest.raises(ValueError, match=match):
        sample_alpha(4, low, high, log_uniform=log_uniform)


def test_token_entropy_by_hand():
    inf = math.inf
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -inf, -inf]],  # uniform over 4 -> log 4; over 2 -> log 2
            [[0.0, -inf, -inf, -inf], [5.0, 1.0, 2.0, 3.0]],  # one-hot -> 0; second token is padding
        ]
    )
    mask = torch.tensor([[1, 1], [1, 0]])
    assert_close(token_entropy(logits, mask), torch.tensor([[math.log(4), math.log(2)], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(N, T\)"):
        token_entropy(logits, mask[:, :1])
