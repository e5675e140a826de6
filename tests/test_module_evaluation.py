"""CLPModule.evaluate_weightings / evaluate_reference: several samples per prompt, their row order, and alpha."""

import pytest
import torch

from clp_lightning.conditioning.config import ConditioningConfig, PolicyConfig
from clp_lightning.config import GenerationSettings
from clp_lightning.module import CLPModule
from clp_lightning.rewards import LengthReward, Reward

BATCH = {"prompt": ["SUBREDDIT: r/a\n\nPOST: one post\n\nTL;DR:",
                    "SUBREDDIT: r/b\n\nPOST: another, longer post\n\nTL;DR:"],
         "source": ["one post", "another, longer post"], "reference": ["post", "longer post"], "id": ["0", "1"]}
GRID = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
GREEDY = GenerationSettings(do_sample=False, max_new_tokens=4)


class WhichPrompt(Reward):
    """``11 p`` for a response scored against prompt ``p``'s source and reference (``10 p + p``): a row scored
    against another prompt's source, or a source and a reference of two prompts, reads as another number."""

    def __init__(self) -> None:
        super().__init__(name="which_prompt")
        self.freeze()

    def score(self, sources, responses, references):
        return torch.tensor([10.0 * BATCH["source"].index(s) + BATCH["reference"].index(r)
                             for s, r in zip(sources, references)])


def make_module(conditioning: ConditioningConfig, rewards: list[Reward] | None = None, **kwargs) -> CLPModule:
    torch.manual_seed(0)
    rewards = rewards or [LengthReward(name="brevity", unit="chars", scale=10.0),
                          LengthReward(name="words", unit="words")]
    policy = PolicyConfig("tiny:t5", conditioning, max_prompt_length=48)
    return CLPModule(policy, rewards, samples_per_prompt=2, **kwargs).eval()


@pytest.mark.parametrize("decoding", ["policy", "logit_mixture"])
def test_samples_of_a_prompt_are_consecutive_rows(decoding):
    """Row ``(g * P + p) * k + s``: with greedy decoding every sample repeats the one response of (g, p)."""
    module = make_module(ConditioningConfig(mode="mixing", options={"targets": "logits"}),
                         [WhichPrompt(), LengthReward(name="words", unit="words")], decoding=decoding)
    # the initial tiny model answers every prompt at every weighting with the same text (and a log-ratio of 0),
    # which any row order repeats: noise on its weights, a different one per logit copy, makes the rows differ
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in module.policy.parameters():
            param.add_(3.0 * torch.randn(param.shape, generator=generator))
    one = module.evaluate_weightings(BATCH, GRID, GREEDY)
    assert one["texts"][0] != one["texts"][1] and len(set(one["kl"].tolist())) == 6, one
    three = module.evaluate_weightings(BATCH, GRID, GREEDY, num_samples=3)
    # each row scored against its own prompt's source and reference
    assert three["rewards"][:, 0].tolist() == [11.0 * p for _ in range(3) for p in range(2) for _ in range(3)]
    assert len(three["texts"]) == 3 * 2 * 3 and three["rewards"].shape == (18, 2) and three["kl"].shape == (18,)
    assert three["texts"] == [t for t in one["texts"] for _ in range(3)]
    assert torch.equal(three["rewards"], one["rewards"].repeat_interleave(3, 0))
    assert torch.allclose(three["kl"], one["kl"].repeat_interleave(3, 0), atol=1e-5)
    assert three["point"].tolist() == [g for g in range(3) for _ in range(2 * 3)]
    assert torch.equal(three["weights"], GRID[three["point"]])
    reference = module.evaluate_reference(BATCH, GREEDY, num_samples=2)
    assert reference["rewards"].shape == (4, 2) and reference["texts"][0] == reference["texts"][1]


def test_sampled_rows_differ_and_score_against_their_own_prompt():
    module = make_module(ConditioningConfig(mode="mixing", options={"targets": "logits"}))
    torch.manual_seed(0)
    out = module.evaluate_weightings(BATCH, GRID, GenerationSettings(max_new_tokens=6), num_samples=4)
    assert len(set(out["texts"])) > 3  # sampled: the rows are not all one response
    # the length reward reads only the response: row r's reward is that of its own text
    expected = module.score(["x"] * len(out["texts"]), out["texts"], ["x"] * len(out["texts"]))
    assert torch.equal(out["rewards"], expected)


def test_alpha_is_checked_against_alpha_range():
    module = make_module(ConditioningConfig(prompt=True, condition_on_alpha=True), alpha_range=(0.01, 0.5))
    assert module.evaluation_alpha() == 0.01 and module.evaluation_alpha(0.2) == 0.2
    seen = []
    encode = module.policy.encode

    def record(prompts, weights=None, alpha=None):  # the reference's prompts are encoded without alpha: skipped
        if alpha is not None:
            seen.append(alpha)
        return encode(prompts, weights, alpha)

    module.policy.encode = record
    module.evaluate_weightings(BATCH, GRID[:1], GREEDY, alpha=0.3)
    assert seen[-1].tolist() == pytest.approx([0.3, 0.3])
    module.evaluate_weightings(BATCH, GRID[:1], GREEDY)
    assert seen[-1].tolist() == pytest.approx([0.01, 0.01])  # the default: alpha_range's low end
    with pytest.raises(ValueError, match=r"alpha=0.9 is outside alpha_range \[0.01, 0.5\]"):
        module.evaluate_weightings(BATCH, GRID[:1], GREEDY, alpha=0.9)
    plain = make_module(ConditioningConfig(prompt=True))
    with pytest.raises(ValueError, match="alpha=0.1 given, but the policy is not conditioned on alpha"):
        plain.evaluate_weightings(BATCH, GRID[:1], GREEDY, alpha=0.1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        plain.evaluate_weightings(BATCH, GRID[:1], GREEDY, num_samples=0)


def test_alpha_rows_are_float32_under_bf16_true():
    """predict_step runs under "bf16-true", whose default dtype is bfloat16: alpha 0.3 reached the policy as 0.30078."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    module = make_module(ConditioningConfig(prompt=True, condition_on_alpha=True), alpha_range=(0.01, 0.5))
    seen = []

    class Seen(Exception):
        pass

    def record(prompts, weights=None, alpha=None):
        seen.append(alpha)
        raise Seen  # the alpha is all this test needs

    module.policy.encode = record
    with HalfPrecision("bf16-true").forward_context(), pytest.raises(Seen):
        module.evaluate_weightings(BATCH, GRID[:1], GREEDY, alpha=0.3)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], torch.full((2,), 0.3))
