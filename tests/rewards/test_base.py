"""The shared reward contract: validation, micro-batching, freezing, device and dtype."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BartConfig,
    BartForSequenceClassification,
    RobertaConfig,
    RobertaModel,
)

from clp_lightning.models import build_tiny_model
from clp_lightning.rewards import (
    EmbeddingSimilarityReward,
    LengthReward,
    Seq2SeqNLIReward,
    SequenceClassifierReward,
    base,
)
from clp_lightning.rewards.base import load_scorer, parse_dtype, position_limit

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


@pytest.mark.parametrize("output, found", [(lambda b: torch.zeros(b, 1), "(2, 1)"), (lambda b: [0.0] * b, "list")])
def test_a_score_of_the_wrong_shape_names_the_reward(output, found):
    # a custom reward returning (b, 1) logits failed later, in the stack of objectives, without its name
    class Custom(base.Reward):
        def score(self, sources, responses, references):
            return output(len(responses))

    with pytest.raises(ValueError, match=rf"reward 'custom': score\(\) returned {re.escape(found)}, expected a tensor "
                                         r"of shape \(2,\)"):
        Custom(name="custom", batch_size=2)(["a", "b", "c"], ["x", "y", "z"])


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


def test_position_limit_counts_the_usable_rows_of_the_position_table(classifier_dir):
    small = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    assert position_limit(AutoModel.from_pretrained(classifier_dir)) == 128  # BERT: every row
    roberta = RobertaModel(RobertaConfig(**small, max_position_embeddings=34, pad_token_id=1))
    assert position_limit(roberta) == 32  # positions start after the padding index, as roberta-large-mnli's 514 -> 512
    bart = BartForSequenceClassification(
        BartConfig(d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=40)
    )
    assert position_limit(bart) == 40  # the table has 2 extra rows (BART's offset)
    assert position_limit(build_tiny_model("t5", seed=0)) is None  # relative positions: no table bounds the length


@pytest.mark.parametrize("batch_size", [2.5, 8.0, "4", True])
def test_a_batch_size_that_is_not_an_integer_is_refused_at_construction(classifier_dir, batch_size):
    # 2.5 used to load the model and fail in range() at the first call; "4" failed with a bare TypeError
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {batch_size!r}"):
        SequenceClassifierReward(str(classifier_dir), max_length=32, batch_size=batch_size)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: Seq2SeqNLIReward(str(d["t5"]), entail_token="10"), "'10' must be a single token"),
        (lambda d: Seq2SeqNLIReward(str(d["t5"]), max_length=20), "max_length=20 leaves no room for text"),
        (lambda d: SequenceClassifierReward(str(d["bert"]), max_length=4), "max_length=4 leaves no room for text"),
        (lambda d: EmbeddingSimilarityReward(str(d["bert"]), max_length=2), "max_length=2 leaves no room for text"),
        # a label the model does not have: its config says so (the real configs' classifier is a 1.7 GB DeBERTa)
        (lambda d: SequenceClassifierReward(str(d["bert"]), max_length=32, label="toxic"),
         "label 'toxic' is not a label of"),
    ],
    ids=["nli-entail-token", "nli-max-length", "classifier-max-length", "embedding-max-length", "classifier-label"],
)
def test_settings_the_tokenizer_refuses_fail_before_the_model_loads(classifier_dir, t5_dir, monkeypatch, make, match):
    # These checks need only the tokenizer, but ran after the model had loaded: minutes, for an 11B-parameter NLI model
    real = base.load_pretrained

    def tokenizer_only(auto_cls, *args, **kwargs):
        if auto_cls not in (AutoTokenizer, AutoConfig):
            pytest.fail(f"loaded the model with {auto_cls.__name__} before checking the tokenizer")
        return real(auto_cls, *args, **kwargs)

    monkeypatch.setattr(base, "load_pretrained", tokenizer_only)
    with pytest.raises(ValueError, match=match):
        make({"t5": t5_dir, "bert": classifier_dir})
