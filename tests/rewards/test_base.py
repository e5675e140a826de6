"""The shared reward contract: validation, micro-batching, freezing, device and dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from clp_lightning.rewards import LengthReward, SequenceClassifierReward
from clp_lightning.rewards.base import load_scorer, parse_dtype

SOURCES = ["the cat sat on the mat all day", "a dog barked at the mailman", "rain fell", "it was sunny", "x"]
RESPONSES = ["cat on mat", "dog barked", "it rained", "sunny day today", "y z"]


def test_length_mismatch_names_the_lengths():
    reward = LengthReward()
    with pytest.raises(ValueError, match="got 2, 1 and None"):
        reward(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="got 1, 1 and 3"):
        reward(["a"], ["b"], ["r1", "r2", "r3"])
    with pytest.raises(TypeError, match="responses must be a sequence of strings"):
        reward(["a"], "b")


def test_empty_batch_and_output_contract():
    reward = LengthReward(batch_size=2)
    assert reward([], []).shape == (0,)
    out = reward(("a b", "c", "d e f"), ("one two", "three", "four five six"))  # tuples are sequences too
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == [-2.0, -1.0, -3.0]


def test_output_stays_float32_after_dtype_cast():
    reward = LengthReward().to(torch.float64)
    assert reward(["a"], ["b c"]).dtype == torch.float32


def test_neural_reward_is_frozen_and_ignores_train(classifier_dir):
    reward = SequenceClassifierReward(str(classifier_dir), pair=True, label=2, max_length=32)
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()  # what Lightning's model.train() does to every child
    assert not reward.training and not any(m.training for m in reward.modules())
    # The test model has dropout 0.5: in train mode these two calls would differ.
    first, second = reward(SOURCES, RESPONSES), reward(SOURCES, RESPONSES)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not first.requires_grad


def test_micro_batching_matches_one_batch(classifier_dir):
    one = SequenceClassifierReward(str(classifier_dir), label=2, max_length=32, batch_size=64)
    many = SequenceClassifierReward(str(classifier_dir), label=2, max_length=32, batch_size=2)
    torch.testing.assert_close(many(SOURCES, RESPONSES), one(SOURCES, RESPONSES), rtol=1e-5, atol=1e-6)


def test_unknown_model_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        SequenceClassifierReward(missing)
    # The dtype is checked before any loading: the bad dtype is reported, not the missing model.
    with pytest.raises(ValueError, match="float64x"):
        load_scorer(AutoModel, missing, torch_dtype="float64x")


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="batch_size"):
        LengthReward(batch_size=0)
    with pytest.raises(ValueError, match="name"):
        LengthReward(name="")
    with pytest.raises(ValueError, match="float64x"):
        parse_dtype("float64x")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None) is None
