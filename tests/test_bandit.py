"""Exactness of logit-CLP on a toy bandit, trained end to end by the real ``CLPModule`` under a Lightning Trainer.

The bandit: one fixed prompt, responses of exactly one token (``max_new_tokens=1``), and ``m = 2`` rewards that are
a known table over the decoded response text. Then ``J(pi; w) = E_y[w . R(y)] - alpha KL(pi || pi_ref)`` has the
closed-form maximiser ``pi*_w(y) ∝ pi_ref(y) exp(w . R(y) / alpha)`` (design.md, section 1), whose logits
``logits_ref + w . R / alpha`` are linear in ``w``. Logit-CLP computes ``h . (sum_i w_i W_i)^T`` from a hidden state
``h`` that is fixed here (one prompt, only the ``m`` output-layer copies train), so ``W_i = W_ref + (R_i / alpha) v^T``
with ``v . h = 1`` represents ``pi*_w`` exactly for every ``w`` at once. Training on Dirichlet weightings must therefore
bring ``KL(pi_w || pi*_w)`` to the sampling-noise floor at every weighting of the evaluation grid.

Both distributions are compared exactly, over the whole vocabulary: ``pi_w`` from the policy's own log-probability
of every one-token response, ``pi_ref`` from the module's frozen reference.

Design choices that keep the comparison exact:

- No ``min_new_tokens``: it would mask EOS while sampling, so the sampled distribution would not be the policy's.
  EOS, padding and ``<unk>`` are ordinary arms; they all decode to ``""`` and share that text's reward.
- The reward is a function of the decoded text, as every real reward is. Bytes >= 0x80 decode alone to the same
  replacement character, so the table has one row per distinct text and the per-token reward is
  ``R(decode(token))``: the bandit's reward table is exactly what the training step sees.
- ``normalization="none"``, so ``w . R`` in the training objective is the raw table.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clp_lightning.conditioning.policy import ConditioningConfig, PolicyConfig
from clp_lightning.conditioning.weights import simplex_grid
from clp_lightning.config import GenerationSettings, OptimizerConfig, SamplerConfig
from clp_lightning.data.base import collate_prompts
from clp_lightning.module import CLPModule
from clp_lightning.rewards.base import Reward

PROMPT = "bandit: pick one byte ->"


class TextTableReward(Reward):
    """A known reward per response text: ``table[text]`` (texts outside the table are an error, not a silent 0)."""

    def __init__(self, name: str, table: dict[str, float]) -> None:
        super().__init__(name=name, batch_size=1024)
        self.table = dict(table)
        self.freeze()

    def score(self, sources: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        missing = sorted({r for r in responses if r not in self.table})
        if missing:
            raise KeyError(f"reward {self.name!r}: responses {missing[:5]} are not in the bandit's table")
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


class RepeatedPrompt(Dataset):
    """The one bandit prompt, ``length`` times (one epoch covers the whole run)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"prompt": PROMPT, "source": PROMPT, "reference": "", "id": str(index)}


def all_responses(module: CLPModule) -> tuple[Tensor, Tensor, list[str]]:
    """Every one-token response ``(V, 1)``, its mask ``(V, 1)`` and its decoded text, as the training step decodes it."""
    vocab = module.policy.model.get_output_embeddings().out_features
    ids = torch.arange(vocab).view(vocab, 1)
    mask = torch.ones_like(ids)
    return ids, mask, module.policy.decode(ids, mask)


def reward_tables(texts: list[str], num_objectives: int, seed: int) -> list[dict[str, float]]:
    """Independent uniform ``[0, 1)`` rewards per distinct text, one table per objective."""
    distinct = sorted(set(texts))
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(num_objectives, len(distinct), generator=gen)
    return [dict(zip(distinct, row.tolist())) for row in values]


@torch.no_grad()
def exact_log_probs(module: CLPModule, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``log pi_w(y)`` ``(G, V)`` at each weighting ``(G, m)`` and ``log pi_ref(y)`` ``(V,)`` over every response."""
    ids, mask, _ = all_responses(module)
    vocab = ids.shape[0]
    prompts = [PROMPT] * vocab
    enc = module.policy.encode(prompts)
    policy = torch.stack(
        [module.policy(**enc, response_ids=ids, response_mask=mask, weights=w.expand(vocab, -1)).log_probs[:, 0]
         for w in weights]
    )
    reference = module.reference_log_probs(prompts, ids, mask)[:, 0]
    return policy, reference


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def train_bandit(
    model: str = "tiny:gpt2",
    num_objectives: int = 2,
    grid_step: float = 0.1,
    steps: int = 150,
    prompts_per_step: int = 8,
    samples_per_prompt: int = 16,
    alpha: float = 0.25,
    lr: float = 0.02,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Train logit-CLP on the bandit; return the grid and the exact KLs of the policy and the reference to ``pi*_w``."""
    L.seed_everything(seed, verbose=False)
    policy = PolicyConfig(model_name_or_path=model, conditioning=ConditioningConfig(targets="logits",
                                                                                        train_shared=False))
    # Build once to read the decoded texts; the rewards need them before the module exists.
    probe = CLPModule(policy, [TextTableReward("probe", {})])
    texts = all_responses(probe)[2]
    tables = reward_tables(texts, num_objectives, seed)
    module = CLPModule(
        policy,
        [TextTableReward(f"r{i}", t) for i, t in enumerate(tables)],
        sampler=SamplerConfig(kind="dirichlet", concentration=1.0),
        samples_per_prompt=samples_per_prompt,
        kl_coef=alpha,
        normalization="none",
        baseline="rloo",
        generation=GenerationSettings(max_new_tokens=1, min_new_tokens=0, do_sample=True, top_k=0, top_p=1.0),
        optimizer=OptimizerConfig(lr=lr, schedule="linear"),
        weight_seed=seed,
    )
    rewards = torch.tensor([[t[x] for t in tables] for x in texts])  # (V, m)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    loader = DataLoader(RepeatedPrompt(steps * prompts_per_step), batch_size=prompts_per_step,
                        collate_fn=collate_prompts)
    trainer.fit(module, train_dataloaders=loader)

    grid = simplex_grid(num_objectives, grid_step)
    logp, ref_logp = exact_log_probs(module, grid)
    target = torch.log_softmax(ref_logp + grid @ rewards.T / alpha, dim=-1)  # (G, V) log pi*_w
    return {"grid": grid, "kl_policy": kl(logp, target), "kl_reference": kl(ref_logp.expand_as(target), target)}


