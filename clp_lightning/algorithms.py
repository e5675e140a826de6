"""Pure tensor code of the CLP training step: scalarisation, KL, advantages and losses.

No Lightning and no models here: every function takes and returns tensors, so the step in ``module.py`` reads as
rollout -> score -> advantages -> loss and each piece is unit-tested against hand-computed values.

Notation (shapes in docstrings):
    P: prompts in a batch; each prompt has its own weighting ``w`` (and optionally ``alpha``).
    k: samples (responses) per prompt.
    N: ``P * k`` sequences. Row ``n = p * k + j`` is sample ``j`` of prompt ``p``: the ``k`` samples of a prompt are
        consecutive rows, and per-prompt quantities are repeated ``k`` times to give per-sequence ones.
    T: response tokens, right-padded; ``mask`` (N, T) is nonzero on real tokens.
    V: vocabulary size.
    m: objectives.

One step, with ``R~`` the normalised rewards (the normaliser lives in ``rewards/``)::

    s   = scalarize(R~, w)                                   # (N,)
    kl  = sequence_kl(logp, ref_logp, mask)                  # (N,)   k1, the sampled log-ratio
    r   = kl_penalized_rewards(s, kl, alpha)                 # (N,)
    A   = rloo_advantages(r, k)                              # (N,)
    L   = reinforce_loss(sequence_log_probs(logp, mask), A)  # ()

KL in the reward vs. in the loss. Let ``y ~ pi`` be sampled on-policy and ``d_t = log pi(y_t|.) - log ref(y_t|.)``.
The exact policy gradient of the sequence KL is ``E[ (sum_t d_t) * grad log pi(y) ]``: the KL is a (negative)
reward, which is what :func:`kl_penalized_rewards` does, and it gets the RLOO baseline for free. Putting a KL
estimate *with its gradient* into the loss instead gives, per token, in expectation over ``y_t``:

    - ``k1 = d``: ``E[grad d] = E[grad log pi] = 0``. No signal at all; k1 is a value estimator only.
    - ``k2 = d^2 / 2``: ``E[d * grad log pi] = grad KL(pi || ref)`` at that prefix. The right direction.
    - ``k3 = exp(-d) + d - 1``: ``E[(1 - ref/pi) grad log pi] = grad KL(ref || pi)``, the *reverse* KL (GRPO's
      choice). Unbiased as a value, but its gradient minimises the other divergence.

Summing per-token k2 still drops one term of the sequence gradient: how an early token changes the KL of the
tokens after it. ``"seq_k2"`` (``(sum_t d_t)^2 / 2`` per sequence) has gradient ``(sum_t d_t) grad log pi(y)``,
exactly the REINFORCE gradient of ``KL(pi(.|x) || ref(.|x))`` over whole sequences, without a baseline. See
:func:`kl_loss`; ``tests/test_algorithms.py`` checks all four claims by exact enumeration.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KLLossEstimator = Literal["k1", "k2", "k3", "seq_k2"]


def _check_shape(name: str, x: Tensor, shape: tuple[int, ...], dims: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {dims} = {tuple(shape)}, got {tuple(x.shape)}")


def _check_ndim(name: str, x: Tensor, ndim: int, dims: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must have shape {dims}, got {tuple(x.shape)}")


def _check_alpha(alpha: float | Tensor, n: int) -> None:
    if isinstance(alpha, Tensor):
        if alpha.ndim != 0:
            _check_shape("alpha", alpha, (n,), "(N,)")
    elif alpha < 0:
        raise ValueError(f"`alpha` must be >= 0, got {alpha}")


def scalarize(rewards: Tensor, weights: Tensor) -> Tensor:
    """Combine ``m`` rewards into one per sequence with that sequence's weighting: ``s_n = w_n . R_n``.

    Args:
        rewards: (N, m) rewards, normally already normalised per objective.
        weights: (N, m) weighting of each sequence (its prompt's ``w`` repeated ``k`` times).

    Returns:
        (N,) scalarised rewards.

    Raises:
        ValueError: ``rewards`` is not 2-D or ``weights`` has a different shape.
    """
    _check_ndim("rewards", rewards, 2, "(N, m)")
    _check_shape("weights", weights, tuple(rewards.shape), "(N, m) like `rewards`")
    return (rewards * weights.to(rewards.dtype)).sum(-1)


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is nonzero.

    Args:
        x: (...) values.
        mask: (...) same shape as ``x``; nonzero marks entries to average. ``None`` averages everything.
        dim: reduce only this dimension; ``None`` reduces all.

    Returns:
        () when ``dim`` is None, else ``x`` with ``dim`` removed. An empty selection gives 0, not nan, so that a
        fully padded row contributes nothing instead of poisoning a batch mean.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    _check_shape("mask", mask, tuple(x.shape), "like `x`")
    mask = mask.bool()
    selected = torch.where(mask, x, 0.0)
    if dim is None:
        return selected.sum() / mask.sum().clamp_min(1)
    return selected.sum(dim) / mask.sum(dim).clamp_min(1)


def sequence_log_probs(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Log-probability of each response: the sum of its token log-probabilities over real tokens.

    Args:
        token_logp: (N, T) ``log pi(y_t | x, y_<t, w)`` of the sampled tokens.
        mask: (N, T) nonzero on real tokens. Padding is selected away (not multiplied), so ``-inf`` there is fine.

    Returns:
        (N,) ``log pi(y | x, w)``.
    """
    _check_ndim("token_logp", token_logp, 2, "(N, T)")
    _check_shape("mask", mask, tuple(token_logp.shape), "(N, T) like `token_logp`")
    return torch.where(mask.bool(), token_logp, 0.0).sum(-1)


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from the sampled tokens' log-probabilities (Schulman's k1, k2, k3).

    With ``d = logp - ref_logp``: ``k1 = d`` (unbiased, can be negative), ``k2 = d^2 / 2`` (biased, >= 0, low
    variance), ``k3 = exp(-d) + d - 1`` (unbiased, >= 0, low variance). For which one to differentiate, see the
    module docstring and :func:`kl_loss`.

    Args:
        logp: (N, T) policy log-probabilities of the sampled tokens.
        ref_logp: (N, T) reference log-probabilities of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (N, T) per-token estimates (padding positions are not masked here).

    Raises:
        ValueError: unknown estimator or mismatched shapes.
    """
    _check_shape("ref_logp", ref_logp, tuple(logp.shape), "like `logp`")
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        # expm1 keeps precision when pi and ref are close, which is the usual case.
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-sequence KL estimate: the masked sum over tokens of :func:`kl_per_token`.

    Args:
        logp: (N, T) policy log-probabilities of the sampled tokens.
        ref_logp: (N, T) reference log-probabilities of the same tokens.
        mask: (N, T) nonzero on real tokens.
        estimator: ``"k1"`` (default; ``sum_t k1`` is the sampled sequence log-ratio ``log pi(y)/ref(y)``, the
            penalty in the reward), ``"k2"`` or ``"k3"``.

    Returns:
        (N,) estimates of ``KL(pi(.|x, w) || ref(.|x))``.
    """
    _check_ndim("logp", logp, 2, "(N, T)")
    return sequence_log_probs(kl_per_token(logp, ref_logp, estimator), mask)


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: KLLossEstimator = "k2") -> Tensor:
    """Per-sequence KL term to put *in the loss* (KL-in-loss variant), chosen for its gradient, not its value.

    Under on-policy sampling (see the module docstring):

    - ``"k2"`` (default): ``sum_t d_t^2 / 2``. Gradient ``sum_t d_t grad log pi(y_t|.)``: the exact gradient of
      each position's KL at its sampled prefix, but it ignores how earlier tokens change later positions' KL.
    - ``"seq_k2"``: ``(sum_t d_t)^2 / 2``. Gradient ``(sum_t d_t) grad log pi(y)``: the unbiased REINFORCE gradient
      of the sequence ``KL(pi || ref)``, higher variance (no baseline).
    - ``"k3"``: gradient of the reverse ``KL(ref || pi)``; ``"k1"``: zero gradient in expectation. Both kept for
      comparison with other codebases, not recommended.

    Args:
        logp: (N, T) policy log-probabilities of the sampled tokens, with grad.
        ref_logp: (N, T) reference log-probabilities (treated as constants).
        mask: (N, T) nonzero on real tokens.
        estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"seq_k2"``.

    Returns:
        (N,) per-sequence terms; :func:`reinforce_loss` averages ``alpha *`` them into the loss.
    """
    ref_logp = ref_logp.detach()
    if estimator == "seq_k2":
        return 0.5 * sequence_kl(logp, ref_logp, mask, "k1").square()
    return sequence_kl(logp, ref_logp, mask, estimator)


def kl_penalized_rewards(scalar_rewards: Tensor, seq_kl: Tensor, alpha: float | Tensor) -> Tensor:
    """Fold the KL penalty into the reward: ``r = s - alpha * KL``.

    The KL is detached: as part of the reward it is weighted by ``grad log pi(y)`` through the advantage, which is
    the exact sequence-level gradient (module docstring); differentiating it again would add k1's zero-mean noise.

    Args:
        scalar_rewards: (N,) scalarised rewards.
        seq_kl: (N,) per-sequence KL estimates (usually ``sequence_kl(..., "k1")``).
        alpha: KL strength, a float >= 0, or a (N,) tensor when ``alpha`` is sampled per prompt.

    Returns:
        (N,) penalised rewards.
    """
    _check_ndim("scalar_rewards", scalar_rewards, 1, "(N,)")
    _check_shape("seq_kl", seq_kl, tuple(scalar_rewards.shape), "(N,) like `scalar_rewards`")
    _check_alpha(alpha, scalar_rewards.shape[0])
    return scalar_rewards - alpha * seq_kl.detach()


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out advantages: each sample's reward minus the mean of the other ``k - 1`` of its prompt.

    Equivalently ``A_j = k / (k - 1) * (r_j - mean_j r)`` within the prompt's group, so the baseline never uses the
    sample's own reward and the gradient stays unbiased.

    Args:
        rewards: (N,) per-sequence rewards, rows grouped as P consecutive groups of ``k``.
        k: samples per prompt, at least 2.

    Returns:
        (N,) advantages.

    Raises:
        ValueError: ``k < 2`` or ``N`` is not a multiple of ``k``.
    """
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got k={k}")
    _check_ndim("rewards", rewards, 1, "(N,)")
    n = rewards.shape[0]
    if n % k:
        raise ValueError(f"N={n} rewards cannot be split into groups of k={k} samples per prompt")
    grouped = rewards.view(n // k, k)  # (P, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(n)


def batch_mean_advantages(rewards: Tensor) -> Tensor:
    """Advantages with the batch mean as baseline: ``A_n = r_n - mean(r)``.

    Args:
        rewards: (N,) per-sequence rewards.

    Returns:
        (N,) advantages (slightly biased: each baseline includes the sample's own reward with weight 1/N).
    """
    _check_ndim("rewards", rewards, 1, "(N,)")
    return rewards - rewards.mean()


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise to unit variance (and zero mean), with statistics taken over the masked entries.

    Args:
        x: (...) values, e.g. (N,) advantages.
        mask: (...) like ``x``, nonzero on entries that count for the mean and variance; ``None`` uses all.
        shift_mean: subtract the mean; if False the mean is kept and only the scale changes.
        eps: added to the variance.

    Returns:
        (...) whitened ``x``; every entry is transformed, masked-out ones included. The variance is the population
        variance (divide by the count), so a single entry whitens to 0 instead of nan.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def reinforce_loss(
    seq_logp: Tensor,
    advantages: Tensor,
    kl_loss: Tensor | None = None,
    alpha: float | Tensor = 0.0,
) -> Tensor:
    """REINFORCE loss ``-mean(A * log pi(y|x, w))``, plus ``mean(alpha * kl_loss)`` for the KL-in-loss variant.

    Args:
        seq_logp: (N,) ``log pi(y | x, w)`` with grad, from :func:`sequence_log_probs`.
        advantages: (N,) advantages; detached here, they are weights, not a path for gradients.
        kl_loss: (N,) per-sequence KL terms with grad from :func:`kl_loss` (use ``"k2"`` or ``"seq_k2"``), or
            None when the KL penalty is already in the reward.
        alpha: KL strength for ``kl_loss``: a float >= 0 or a (N,) tensor.

    Returns:
        () scalar loss. Its gradient w.r.t. ``seq_logp`` is ``-A / N``.
    """
    _check_ndim("seq_logp", seq_logp, 1, "(N,)")
    _check_shape("advantages", advantages, tuple(seq_logp.shape), "(N,) like `seq_logp`")
    loss = -(advantages.detach() * seq_logp).mean()
    if kl_loss is not None:
        _check_shape("kl_loss", kl_loss, tuple(seq_logp.shape), "(N,) like `seq_logp`")
        _check_alpha(alpha, seq_logp.shape[0])
        loss = loss + (alpha * kl_loss).mean()
    return loss


def sample_alpha(
    n: int,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
    log_uniform: bool = False,
) -> Tensor:
    """Draw a KL strength per prompt for alpha-conditioning.

    Args:
        n: number of draws (usually P; repeat ``k`` times for per-sequence values).
        low: smallest alpha, >= 0 (> 0 when ``log_uniform``).
        high: largest alpha, >= ``low``.
        generator: random generator, for reproducible draws; samples are made on its device.
        log_uniform: draw ``log alpha`` uniformly, so each decade of alpha is equally likely (KL strengths span
            orders of magnitude); otherwise alpha itself is uniform.

    Returns:
        (n,) float32 alphas in ``[low, high]``.

    Raises:
        ValueError: ``n < 0``, ``low > high``, ``low < 0``, or ``low == 0`` with ``log_uniform``.
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    if low < 0 or low > high:
        raise ValueError(f"need 0 <= low <= high for the alpha range, got low={low}, high={high}")
    if log_uniform and low <= 0:
        raise ValueError(f"log-uniform alpha needs low > 0, got low={low}")
    device = generator.device if generator is not None else None
    # float32 whatever the default dtype: Lightning's "bf16-true" makes it bfloat16 inside training_step, which
    # rounded every alpha to 3 significant digits
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    if log_uniform:
        lo, hi = math.log(low), math.log(high)
        return torch.exp(lo + (hi - lo) * u).clamp(low, high)  # clamp: exp(log(x)) may round past the bounds
    return low + (high - low) * u


def token_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy of the policy's next-token distribution at each response position.

    Args:
        logits: (N, T, V) policy logits at the response positions.
        mask: (N, T) nonzero on real tokens.

    Returns:
        (N, T) entropies in nats, 0 on padding. Computed in float32 at least; ``-inf`` logits (banned tokens)
        contribute 0, not nan.
    """
    _check_ndim("logits", logits, 3, "(N, T, V)")
    _check_shape("mask", mask, tuple(logits.shape[:2]), "(N, T)")
    logp = torch.log_softmax(logits.float(), dim=-1)
    plogp = torch.where(logp > -math.inf, logp.exp() * logp, 0.0)  # (N, T, V)
    return -plogp.sum(-1) * (mask != 0)
