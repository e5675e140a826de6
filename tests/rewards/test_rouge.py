"""RougeReward: hand-computed scores, agreement with torchmetrics, and speed."""

from __future__ import annotations

import random
import time

import pytest
import torch
from torchmetrics.functional.text.rouge import rouge_score

from clp_lightning.rewards import RougeReward
from clp_lightning.rewards.rouge import lcs_length, rouge_tokenize


def test_hand_computed_values():
    # pred: 3 tokens, ref: 6 tokens; unigram hits 3, bigram hits 2 of (2, 5), LCS 3.
    pred, ref = ["The cat sat"], ["the cat sat on the mat"]
    r1 = RougeReward(rouge_key="rouge1")(["src"], pred, ref)
    torch.testing.assert_close(r1, torch.tensor([2 * 1.0 * 0.5 / 1.5]))
    r2 = RougeReward(rouge_key="rouge2")(["src"], pred, ref)
    torch.testing.assert_close(r2, torch.tensor([2 * 1.0 * 0.4 / 1.4]))
    recall = RougeReward(rouge_key="rougeL", measure="recall")(["src"], ["sat the cat"], ref)
    torch.testing.assert_close(recall, torch.tensor([2 / 6]))  # LCS "the cat" (or "the sat"), not 3
    precision = RougeReward(rouge_key="rouge1", measure="precision")(["src"], ["cat cat dog"], ref)
    torch.testing.assert_close(precision, torch.tensor([1 / 3]))  # clipped counts: "cat" matches once


def test_tokenisation_and_empty_text():
    assert rouge_tokenize("The CAT, sat!  (on) 2 mats.") == ["the", "cat", "sat", "on", "2", "mats"]
    out = RougeReward()(["s", "s"], ["", "!!"], ["a reference", "a reference"])
    assert out.tolist() == [0.0, 0.0]
    assert lcs_length([], ["a"]) == 0


def test_target_source_and_missing_references():
    reward = RougeReward(target="source", rouge_key="rouge1", measure="recall")
    out = reward(["alpha beta gamma delta", "alpha"], ["beta delta", "omega"])
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="needs references"):
        RougeReward(target="reference")(["s"], ["r"])
    with pytest.raises(ValueError, match="rougeLsum.*NLTK"):
        RougeReward(rouge_key="rougeLsum")
    with pytest.raises(ValueError, match="measure"):
        RougeReward(measure="f1")


def _random_text(rng: random.Random, n: int) -> str:
    words = ["the", "cat", "sat", "on", "mat", "dog", "a", "ran", "Fast", "home", "it's", "3", "x-ray"]
    return " ".join(rng.choice(words) for _ in range(n)) + rng.choice(["", ".", "!"])


@pytest.mark.parametrize("rouge_key", ["rouge1", "rouge2", "rougeL"])
def test_matches_torchmetrics_per_pair(rouge_key):
    rng = random.Random(0)
    preds = [_random_text(rng, rng.randint(0, 15)) for _ in range(30)]
    refs = [_random_text(rng, rng.randint(1, 25)) for _ in range(30)]
    for measure in ("fmeasure", "precision", "recall"):
        ours = RougeReward(rouge_key=rouge_key, measure=measure)(refs, preds, refs)
        theirs = torch.stack(
            [rouge_score(p, r, rouge_keys=rouge_key)[f"{rouge_key}_{measure}"] for p, r in zip(preds, refs)]
        )
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)


def test_64_long_pairs_score_fast():
    rng = random.Random(1)
    sources = [_random_text(rng, 500) for _ in range(64)]
    responses = [_random_text(rng, 60) for _ in range(64)]
    reward = RougeReward(target="source", rouge_key="rougeL")
    start = time.perf_counter()
    out = reward(sources, responses)
    assert time.perf_counter() - start < 0.5
    assert out.shape == (64,) and (out > 0).all()
