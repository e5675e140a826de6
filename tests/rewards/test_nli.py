"""Seq2SeqNLIReward: first-decoder-step probabilities and premise-only truncation, on a tiny byte-level T5."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from clp_lightning.rewards import Seq2SeqNLIReward, nli
from clp_lightning.rewards.nli import fit_source

SOURCES = ["The meeting was moved to Friday because the room was booked.", "Cats sleep a lot."]
RESPONSES = ["The meeting is on Friday.", "Dogs never sleep."]


@pytest.fixture(scope="module")
def first_step_logits(t5_dir):
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval()
    tok = AutoTokenizer.from_pretrained(t5_dir)
    texts = [f"premise: {s} hypothesis: {r}" for s, r in zip(SOURCES, RESPONSES)]
    enc = tok(texts, padding=True, return_tensors="pt")
    start = torch.full((len(texts), 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        return model(**enc, decoder_input_ids=start).logits[:, 0]


def test_reward_is_entail_token_probability_at_first_step(t5_dir, first_step_logits):
    reward = Seq2SeqNLIReward(str(t5_dir), batch_size=1)
    one = AutoTokenizer.from_pretrained(t5_dir).convert_tokens_to_ids("1")
    assert reward.entail_id == one
    expected = first_step_logits.softmax(-1)[:, one]
    torch.testing.assert_close(reward(SOURCES, RESPONSES), expected, rtol=1e-5, atol=1e-7)


def test_renormalized_over_entail_and_not_entail(t5_dir, first_step_logits):
    reward = Seq2SeqNLIReward(str(t5_dir), renormalize=True)
    expected = first_step_logits[:, [reward.entail_id, reward.not_entail_id]].softmax(-1)[:, 0]
    out = reward(SOURCES, RESPONSES)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert ((out > 0) & (out < 1)).all()


def test_long_premise_is_cut_and_hypothesis_kept(t5_dir):
    tok = AutoTokenizer.from_pretrained(t5_dir)
    source, response = "0123456789" * 20, "the hypothesis stays"
    template = "premise: {source} hypothesis: {response}"
    text = fit_source(tok, template, source, response, max_length=64)
    assert len(tok(text)["input_ids"]) == 64  # byte tokens: the cut is exact
    assert text.endswith(" hypothesis: the hypothesis stays")
    kept = text[len("premise: ") : -len(" hypothesis: the hypothesis stays")]
    assert 0 < len(kept) < len(source) and source.startswith(kept)
    # Response first in the template: still only the premise is cut.
    text = fit_source(tok, "hyp: {response} prem: {source}", source, response, max_length=40)
    assert text.startswith("hyp: the hypothesis stays prem: 0123") and len(tok(text)["input_ids"]) == 40
    # The reward runs on such inputs with a bounded encoder length.
    reward = Seq2SeqNLIReward(str(t5_dir), max_length=64)
    assert reward([source], [response]).shape == (1,)


def test_short_inputs_are_not_touched(t5_dir):
    tok = AutoTokenizer.from_pretrained(t5_dir)
    assert fit_source(tok, "premise: {source} hypothesis: {response}", "ab", "cd", 512) == "premise: ab hypothesis: cd"


def test_bad_template_and_multi_token_label(t5_dir):
    with pytest.raises(ValueError, match="template"):
        Seq2SeqNLIReward(str(t5_dir), template="premise: {source}")
    with pytest.raises(ValueError, match="'10' must be a single token"):
        Seq2SeqNLIReward(str(t5_dir), entail_token="10")


@pytest.mark.parametrize("max_length", [-1, 0])
def test_a_max_length_below_one_is_refused_before_loading(monkeypatch, max_length):
    monkeypatch.setattr(nli, "load_scorer", lambda *a, **k: pytest.fail("loaded the model before checking max_length"))
    with pytest.raises(ValueError, match=f"max_length must be >= 1, got {max_length}"):
        Seq2SeqNLIReward("google/t5_xxl_true_nli_mixture", max_length=max_length)


def test_a_max_length_that_the_template_fills_is_refused(t5_dir):
    # the byte-level tokenizer spends 22 tokens on "premise:  hypothesis: " and one on </s>: with max_length=23 the
    # premise was emptied and the hypothesis truncated away, so every pair got the same score
    tok = AutoTokenizer.from_pretrained(t5_dir)
    overhead = len(tok("premise:  hypothesis: ")["input_ids"])
    with pytest.raises(ValueError, match=rf"max_length={overhead} leaves no room.*max_length >= {overhead + 1}"):
        Seq2SeqNLIReward(str(t5_dir), max_length=overhead)
    a, b = Seq2SeqNLIReward(str(t5_dir), max_length=overhead + 1)(["x", "y"], ["yes", "no"]).tolist()
    assert a != b  # one token of each hypothesis is read


@pytest.mark.parametrize(
    "template",
    [
        "premise: {source} hypothesis: {response} {extra}",
        "premise: {source} hypothesis: {response} {0}",
        "premise: {source} hypothesis: {response} {",
        "premise: {source!r} hypothesis: {response}",
    ],
)
def test_a_template_with_another_field_or_a_stray_brace_is_refused_before_loading(monkeypatch, template):
    # the first three passed the check and failed at the first score (KeyError, IndexError, ValueError), after
    # the model had loaded
    monkeypatch.setattr(nli, "load_scorer", lambda *a, **k: pytest.fail("loaded the model before checking template"))
    with pytest.raises(ValueError, match="template"):
        Seq2SeqNLIReward("google/t5_xxl_true_nli_mixture", template=template)


def test_escaped_braces_in_the_template_are_text(t5_dir):
    reward = Seq2SeqNLIReward(str(t5_dir), template="{{premise}}: {source} hypothesis: {response}", max_length=64)
    assert fit_source(reward.tokenizer, reward.template, "ab", "cd", 64) == "{premise}: ab hypothesis: cd"
    assert reward(["ab"], ["cd"]).shape == (1,)


def test_special_token_strings_in_the_texts_are_text(t5_dir):
    # "</s>" in a post was read as T5's end of sequence (and "<pad>" as padding): the premise seemed to end there
    reward = Seq2SeqNLIReward(str(t5_dir), max_length=64)
    tok = reward.tokenizer
    source, response = "the post ends </s> not here <pad> at all " * 3, "an </s> answer"
    text = fit_source(tok, reward.template, source, response, 64)
    ids = tok(text, split_special_tokens=True)["input_ids"]
    assert len(ids) == 64 and ids.count(tok.eos_token_id) == 1 and tok.pad_token_id not in ids
    assert text.endswith(" hypothesis: an </s> answer")  # the cut counted "</s>" as its 4 characters
    model = reward.model
    start = torch.full((1, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=start).logits[:, 0]
    torch.testing.assert_close(reward([source], [response]), logits.softmax(-1)[:, reward.entail_id])


def test_a_special_token_in_the_template_is_refused(t5_dir):
    with pytest.raises(ValueError, match=r"contains '</s>', a special token"):
        Seq2SeqNLIReward(str(t5_dir), template="premise: {source} </s> hypothesis: {response}")


def test_an_output_token_outside_the_vocabulary_is_refused_before_loading(tmp_path, minilm_tokenizer):
    # "☃" is not in the vocabulary and came back as [UNK]: the reward silently read P([UNK]) (and, renormalised
    # against another unknown string, scored 0.5 for every pair)
    minilm_tokenizer.save_pretrained(tmp_path)  # no model: the check must come before the model is read
    with pytest.raises(ValueError, match=r"output token '☃' is not in the tokenizer's vocabulary.*\[UNK\]"):
        Seq2SeqNLIReward(str(tmp_path), entail_token="☃")


def test_renormalizing_over_one_token_twice_is_refused(t5_dir):
    with pytest.raises(ValueError, match=r"entail_token '1' and not_entail_token '1' are the same token"):
        Seq2SeqNLIReward(str(t5_dir), not_entail_token="1", renormalize=True)
    assert Seq2SeqNLIReward(str(t5_dir), entail_token="0", not_entail_token="0").entail_id == 18  # not renormalised
