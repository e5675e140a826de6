"""Exactness of logit-CLP on a toy bandit, trained end to end by the real ``CLPModule`` under a Lightning Trainer.

The bandit: one fixed prompt, responses of exactly one token (``max_new_tokens=1``) over the tiny models' 259-token
byte vocabulary, and ``m`` known rewards of the response text. ``J(pi; w) = E_y[w . R(y)] - alpha KL(pi || pi_ref)``
then has the closed-form maximiser ``pi*_w(y) ∝ pi_ref(y) exp(w . R(y) / alpha)`` (design.md, section 1), whose
logits ``logits_ref + w . R / alpha`` are linear in ``w``. Logit-CLP computes the logits as ``h . (sum_i w_i W_i)^T``
from a hidden state ``h`` that is fixed here (one prompt; only the ``m`` output-layer copies train), so
``W_i = W_ref + (R_i / alpha) v^T`` with ``v . h = 1`` represents ``pi*_w`` exactly for every ``w`` at once, and
training on Dirichlet weightings must reach it at every weighting of the grid.

It converges to ``pi*_w`` itself, not to a noisy neighbourhood of it: at ``pi = pi*_w`` every sample's KL-penalised
reward ``w . R(y) - alpha log(pi(y) / pi_ref(y))`` equals ``alpha log Z_w``, so the leave-one-out advantages, and
with them the gradient noise, vanish there. The tolerances therefore bound the optimisation error of a short run.

Both distributions are compared exactly over the whole vocabulary: ``pi_w`` from the policy's own log-probability of
every one-token response, ``pi_ref`` from the module's frozen reference, ``R`` from the module's own rewards.

Choices that keep the comparison exact:

- No ``min_new_tokens``: it would mask EOS while sampling, so responses would not be drawn from the policy's
  distribution. EOS, padding and ``<unk>`` are ordinary arms; all three decode to ``""`` and share that text's reward.
- The reward is a function of the decoded text, as every real reward is. Bytes >= 0x80 each decode alone to the same
  replacement character and share its reward, so the per-token reward is ``R(decode(token))``, exactly what the
  training step sees.
- ``normalization="none"``, so ``w . R`` in the training objective is the raw reward.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from reward_helpers import HashedTextReward
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.conditioning.weights import simplex_grid
from clp_lightning.config import GenerationSettings, OptimizerConfig, SamplerConfig
from clp_lightning.data.base import collate_prompts
from clp_lightning.module import CLPModule

PROMPT = "bandit: pick one byte ->"

# The frozen reference and the rewards are meant to stay in eval mode while the policy trains.
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")


class RepeatedPrompt(Dataset):
    """The one bandit prompt, ``length`` times (one epoch covers the whole run)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"prompt": PROMPT, "source": PROMPT, "reference": "", "id": str(index)}


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def exact_kls(module: CLPModule, grid: Tensor, alpha: float) -> dict[str, Tensor]:
    """Exact ``KL(pi_w || pi*_w)`` and ``KL(pi_ref || pi*_w)`` ``(G,)`` at every weighting of ``grid`` ``(G, m)``."""
    vocab = module.policy.model.get_output_embeddings().out_features
    ids = torch.arange(vocab).view(vocab, 1)  # every one-token response
    mask = torch.ones_like(ids)
    prompts = [PROMPT] * vocab
    texts = module.policy.decode(ids, mask)  # as the training step decodes them
    rewards = module.score(prompts, texts, [""] * vocab)  # (V, m)
    enc = module.policy.encode(prompts)
    logp = torch.stack([
        module.policy(**enc, response_ids=ids, response_mask=mask, weights=w.expand(vocab, -1)).log_probs[:, 0]
        for w in grid
    ])  # (G, V)
    ref_logp = module.policy.reference_log_probs(prompts, ids, mask)[:, 0]  # (V,)
    target = torch.log_softmax(ref_logp + grid @ rewards.T / alpha, dim=-1)  # (G, V): log pi*_w
    return {"policy": kl(logp, target), "reference": kl(ref_logp.expand_as(target), target)}


def train_bandit(
    model: str = "tiny:gpt2",
    num_objectives: int = 2,
    grid_step: float = 0.1,
    steps: int = 200,
    prompts_per_step: int = 8,
    samples_per_prompt: int = 16,
    alpha: float = 0.25,
    lr: float = 0.02,
    seed: int = 0,
    kl_loss_estimator: str | None = None,
) -> dict[str, Tensor]:
    """Train logit-CLP on the bandit with ``CLPModule`` and a Trainer; return the grid and the exact KLs to pi*_w."""
    policy = PolicyConfig(
        model_name_or_path=model,
        conditioning=ConditioningConfig(mode="mixing", options={"targets": "logits"}, train_shared=False),
        max_prompt_length=32,  # the prompts are a few tokens; the default 512 would leave tiny GPT-2 no response room
    )
    module = CLPModule(
        policy,
        [HashedTextReward(f"r{i}", seed) for i in range(num_objectives)],
        sampler=SamplerConfig(kind="dirichlet", concentration=1.0),
        samples_per_prompt=samples_per_prompt,
        kl_coef=alpha,
        normalization="none",
        baseline="rloo",
        generation=GenerationSettings(max_new_tokens=1, min_new_tokens=0, do_sample=True, top_k=0, top_p=1.0),
        # Linear decay to 0: Adam's steps stay the size of lr until the gradient is exactly 0, so decaying lr is
        # what lets the short run settle on the optimum.
        optimizer=OptimizerConfig(lr=lr, schedule="linear"),
        weight_seed=seed,
        kl_in_loss=kl_loss_estimator is not None,
        kl_loss_estimator=kl_loss_estimator or "k2",
    )
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    loader = DataLoader(RepeatedPrompt(steps * prompts_per_step), batch_size=prompts_per_step,
                        collate_fn=collate_prompts)
    with torch.random.fork_rng(devices=[]):  # rollouts sample from torch's global generator
        torch.manual_seed(seed)
        trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps
    grid = simplex_grid(num_objectives, grid_step)
    return {"grid": grid, **exact_kls(module, grid, alpha)}


def check_exact(out: dict[str, Tensor], tolerance: float, max_ratio: float) -> None:
    report = "\n".join(f"w={[round(x, 2) for x in w.tolist()]}: KL(pi_w||pi*)={p:.2e}, KL(pi_ref||pi*)={r:.3f}"
                       for w, p, r in zip(out["grid"], out["policy"], out["reference"]))
    # Without training the policy is pi_ref: the check is only meaningful if pi*_w is far from it.
    assert (out["reference"] > 10 * tolerance).all(), f"pi*_w is too close to pi_ref to test anything:\n{report}"
    assert (out["policy"] < tolerance).all(), f"trained policy is not pi*_w at every weighting:\n{report}"
    assert (out["policy"] < max_ratio * out["reference"]).all(), f"training closed too little of the gap:\n{report}"


def test_logit_clp_matches_closed_form_optimum_on_bandit():
    # gpt2, m = 2, grid step 0.1, 200 steps of 8 prompts x 16 samples; ~15 s on one CPU thread. Seeds 0..3 reach a
    # max KL over the grid of 2e-4..3e-3 nats (seed 0: 4e-4) against KL(pi_ref || pi*_w) >= 0.2; an undertrained
    # run (100 steps of 4 x 16) stays at a max of 4e-2.
    out = train_bandit()
    check_exact(out, tolerance=1e-2, max_ratio=0.05)
    assert out["policy"].mean() < 5e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, num_objectives, grid_step, lr",
    [
        ("tiny:gpt2", 3, 0.25, 0.02),  # the 15-point lattice of m = 3
        # T5 scales the decoder output by d_model^-0.5 (= 1/4 here) before the tied output layer: 4x the lr.
        ("tiny:t5", 2, 0.1, 0.08),
    ],
)
def test_logit_clp_matches_closed_form_optimum_on_bandit_long(model, num_objectives, grid_step, lr):
    # 300 steps, ~20 s each. Measured max KL over the grid, seeds 0 and 1: gpt2 (m = 3) 4e-4 and 5e-5, t5 1.1e-3 and
    # 0.9e-3 (ratio to KL(pi_ref || pi*_w) <= 4e-3).
    out = train_bandit(model, num_objectives, grid_step, steps=300, lr=lr)
    check_exact(out, tolerance=3e-3, max_ratio=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("kl_loss_estimator", ["k2", "seq_k2"])
def test_kl_in_loss_reaches_the_same_optimum_on_bandit(kl_loss_estimator):
    """Every KL the module allows: the reward penalty (k1, the test above) and both KL-in-loss estimators.

    With one token per response ``k2`` and ``seq_k2`` have the same gradient, the exact ``grad KL``; but the
    advantages no longer carry the KL, so the gradient noise does not vanish at ``pi*_w``. Measured (seed 0, 300
    steps): max KL over the grid 4.9e-3 for both, against KL(pi_ref || pi*_w) >= 0.198.
    """
    out = train_bandit(kl_loss_estimator=kl_loss_estimator, steps=300)
    check_exact(out, tolerance=1e-2, max_ratio=0.05)


def test_only_unbiased_kl_forms_are_accepted():
    logits = ConditioningConfig(mode="mixing", options={"targets": "logits"})
    with pytest.raises(ValueError, match="kl_loss_estimator must be 'k2' or 'seq_k2'"):
        CLPModule(PolicyConfig("tiny:gpt2", logits), [HashedTextReward("r0", 0)],
                  kl_loss_estimator="k3")


def test_a_kl_loss_estimator_without_kl_in_loss_is_refused():
    # it would be ignored: without kl_in_loss the KL is the k1 penalty on the reward
    logits = ConditioningConfig(mode="mixing", options={"targets": "logits"})
    with pytest.raises(ValueError, match=r"kl_loss_estimator='seq_k2' has no effect without kl_in_loss: true"):
        CLPModule(PolicyConfig("tiny:gpt2", logits), [HashedTextReward("r0", 0)], kl_loss_estimator="seq_k2")
