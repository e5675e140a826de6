"""SequenceClassifierReward against logits computed directly from the same tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from clp_lightning.models import build_byte_tokenizer
from clp_lightning.rewards import SequenceClassifierReward

SOURCES = ["the quick brown fox jumps over the lazy dog " * 6, "a short premise", "rain in spain"]
RESPONSES = ["a fox jumps", "short", "it rains mainly on the plain"]


@pytest.fixture(scope="module")
def direct(classifier_dir):
    """Logits of the classifier computed without the reward class, with its dropout off."""
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(classifier_dir)

    def logits(sources, responses, max_length=64):
        enc = tok(sources, responses, truncation="only_first", max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**enc).logits

    return logits


@pytest.fixture(scope="module")
def reward(classifier_dir):
    return SequenceClassifierReward(str(classifier_dir), output="probability", label=2, max_length=64)


def test_probability_is_softmax_of_logits(reward, direct):
    expected = direct(SOURCES, RESPONSES).softmax(-1)[:, 2]
    torch.testing.assert_close(reward(SOURCES, RESPONSES), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "select"),
    [
        (dict(output="logit", label=1), lambda z: z[:, 1]),
        (dict(output="logit_diff", label="entailment", minus_label="contradiction"), lambda z: z[:, 2] - z[:, 0]),
    ],
)
def test_logit_outputs(classifier_dir, direct, kwargs, select):
    reward = SequenceClassifierReward(str(classifier_dir), max_length=64, **kwargs)
    torch.testing.assert_close(reward(SOURCES, RESPONSES), select(direct(SOURCES, RESPONSES)), rtol=1e-5, atol=1e-6)


def test_label_names_resolve_case_insensitively(classifier_dir):
    assert SequenceClassifierReward(str(classifier_dir), label="ENTAILMENT", max_length=64).label == 2
    assert SequenceClassifierReward(str(classifier_dir), label="1", max_length=64).label == 1
    with pytest.raises(ValueError, match="'faithful'.*contradiction.*neutral.*entailment"):
        SequenceClassifierReward(str(classifier_dir), label="faithful", max_length=64)
    with pytest.raises(ValueError, match="out of range"):
        SequenceClassifierReward(str(classifier_dir), label=3, max_length=64)
    with pytest.raises(ValueError, match="minus_label"):
        SequenceClassifierReward(str(classifier_dir), output="logit_diff", label=2)
    with pytest.raises(ValueError, match="output"):
        SequenceClassifierReward(str(classifier_dir), output="softmax")


@pytest.mark.parametrize(("label", "minus_label"), [(2, 2), ("entailment", 2), (0, "CONTRADICTION")])
def test_logit_diff_of_a_class_with_itself_is_refused(classifier_dir, label, minus_label):
    # the two names of one class were accepted, and every response then scored 0
    with pytest.raises(ValueError, match=rf"label={label!r} and minus_label={minus_label!r} .*same class"):
        SequenceClassifierReward(str(classifier_dir), output="logit_diff", label=label, minus_label=minus_label,
                                 max_length=64)


def test_pair_truncation_cuts_the_source_and_keeps_the_response(classifier_dir, minilm_tokenizer):
    reward = SequenceClassifierReward(str(classifier_dir), max_length=20)
    response = "the response must survive whole"
    source = "an extremely long source post about many things " * 10
    enc = reward.encode([source, "tiny"], [response, response])
    assert enc["input_ids"].shape[1] == 20
    response_ids = minilm_tokenizer(response, add_special_tokens=False)["input_ids"]
    long_row = enc["input_ids"][0].tolist()
    assert long_row[-len(response_ids) - 1 : -1] == response_ids  # [.. source .. SEP] response [SEP]
    assert long_row[1] == minilm_tokenizer.convert_tokens_to_ids("an")  # the source's start is kept, its end cut


def test_response_longer_than_max_length_falls_back_per_pair(classifier_dir, minilm_tokenizer):
    reward = SequenceClassifierReward(str(classifier_dir), max_length=16)
    long_response = "word " * 40
    enc = reward.encode(["a source", "another source text here"], [long_response, "kept whole"])
    assert enc["input_ids"].shape[1] == 16
    kept = minilm_tokenizer("kept whole", add_special_tokens=False)["input_ids"]
    row = [t for t in enc["input_ids"][1].tolist() if t != minilm_tokenizer.pad_token_id]
    assert row[-len(kept) - 1 : -1] == kept  # the other pair still used only_first truncation
    assert reward(["a source", "x"], [long_response, "y"]).shape == (2,)


def test_single_text_mode_and_source_chars(classifier_dir, minilm_tokenizer):
    single = SequenceClassifierReward(str(classifier_dir), pair=False, max_length=64)
    enc = single.encode(["ignored source"], ["only this"])
    assert minilm_tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True) == "only this"
    cut = SequenceClassifierReward(str(classifier_dir), source_max_chars=5, max_length=64)
    enc = cut.encode(["abcde fghij"], ["resp"])
    assert minilm_tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True) == "abcde resp"


@pytest.mark.parametrize("source_max_chars", [0, -5])
def test_source_max_chars_below_one_is_refused(classifier_dir, source_max_chars):
    # 0 would score every response against an empty source, -5 would silently cut the last 5 characters instead
    with pytest.raises(ValueError, match="source_max_chars must be >= 1"):
        SequenceClassifierReward(str(classifier_dir), source_max_chars=source_max_chars, max_length=64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pair=False, source_max_chars=3000), r"source_max_chars=3000 has no effect with pair=False"),
        (dict(pair=False, pair_order="response_source"), r"pair_order='response_source' has no effect with pair=False"),
        (dict(output="logit", minus_label=0), r"minus_label=0 has no effect with output='logit'"),
        (dict(output="probability", minus_label="contradiction"), r"minus_label='contradiction' has no effect"),
    ],
)
def test_a_setting_that_has_no_effect_is_refused_before_the_model_loads(classifier_dir, monkeypatch, kwargs, match):
    # the source is never read with pair=False, and minus_label is only subtracted by logit_diff: a config that set
    # them trained on another reward than the one it spelled out, silently
    from clp_lightning.rewards import classifier as classifier_module

    monkeypatch.setattr(classifier_module, "load_scorer", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=match):
        SequenceClassifierReward(str(classifier_dir), max_length=64, **kwargs)


def test_torch_dtype_loads_weights_in_that_dtype(classifier_dir):
    reward = SequenceClassifierReward(str(classifier_dir), torch_dtype="float64", max_length=32)
    assert next(reward.model.parameters()).dtype == torch.float64
    assert reward(["a"], ["b"]).dtype == torch.float32


def test_response_first_order_still_cuts_only_the_source(classifier_dir, minilm_tokenizer):
    reward = SequenceClassifierReward(str(classifier_dir), pair_order="response_source", max_length=20)
    response = "the summary comes first"
    enc = reward.encode(["an extremely long source article about many things " * 10], [response])
    ids = enc["input_ids"][0].tolist()
    response_ids = minilm_tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(ids) == 20 and ids[1 : 1 + len(response_ids)] == response_ids  # [CLS] response [SEP] source [SEP]
    assert ids[2 + len(response_ids)] == minilm_tokenizer.convert_tokens_to_ids("an")
    with pytest.raises(ValueError, match="pair_order"):
        SequenceClassifierReward(str(classifier_dir), pair_order="summary_first")


def test_single_logit_head(tmp_path, classifier_dir):
    """A preference reward model (one logit): ``logit`` is the raw score, ``probability`` its sigmoid."""
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=1, id2label={0: "LABEL_0"},
                                                               label2id={"LABEL_0": 0}, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(classifier_dir).save_pretrained(tmp_path)
    logit = SequenceClassifierReward(str(tmp_path), output="logit", label=0, max_length=32)(["q"], ["a"])
    prob = SequenceClassifierReward(str(tmp_path), output="probability", label=0, max_length=32)(["q"], ["a"])
    torch.testing.assert_close(prob, torch.sigmoid(logit))


def test_max_length_longer_than_the_position_table_is_refused_at_construction(classifier_dir):
    # The tiny classifier has 128 positions: max_length=512 would score short texts, then crash on the first long one.
    with pytest.raises(ValueError, match="max_length=512 is longer than the 128 positions.*max_length <= 128"):
        SequenceClassifierReward(str(classifier_dir), max_length=512)
    at_limit = SequenceClassifierReward(str(classifier_dir), max_length=128)
    assert at_limit(["word " * 300], ["a summary"]).shape == (1,)


def decoder_reward_model(path, tokenizer, pad_token_id: int | None = None) -> str:
    """A one-logit GPT-2 reward model whose config has no pad_token_id (as many decoder-based ones ship), or the given
    one."""
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=1,
                        bos_token_id=1, eos_token_id=1, pad_token_id=pad_token_id)
    assert config.pad_token_id == pad_token_id
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("tokenizer_has_pad", [True, False])
def test_decoder_reward_model_without_pad_token_scores_a_batch_like_single_texts(tmp_path, tokenizer_has_pad):
    tokenizer = build_byte_tokenizer("causal")
    tokenizer.padding_side = "right"
    if not tokenizer_has_pad:
        tokenizer.pad_token = None
    reward = SequenceClassifierReward(decoder_reward_model(tmp_path, tokenizer), pair=False, output="logit", label=0,
                                      max_length=64)
    responses = ["a much longer response of several words", "short"]
    single = torch.cat([reward(["post"], [r]) for r in responses])
    torch.testing.assert_close(reward(["post"] * 2, responses), single)  # used to fail on a batch of two


def test_a_left_padding_tokenizer_scores_a_batch_like_single_texts(tmp_path):
    tokenizer = build_byte_tokenizer("causal")
    assert tokenizer.padding_side == "left"  # as decoder tokenizers are saved for generation
    reward = SequenceClassifierReward(decoder_reward_model(tmp_path, tokenizer), pair=False, output="logit", label=0,
                                      max_length=64)
    responses = ["a much longer response of several words", "short"]
    single = torch.cat([reward(["post"], [r]) for r in responses])
    # GPT-2's absolute positions: left padding used to shift the short text's positions and change its score
    torch.testing.assert_close(reward(["post"] * 2, responses), single)


def test_a_config_pad_id_other_than_the_tokenizers_scores_a_batch_like_single_texts(tmp_path):
    # Llama-style: the config says pad_token_id=0, the tokenizer has no padding token and is padded with eos (1).
    tokenizer = build_byte_tokenizer("causal")
    tokenizer.pad_token = None
    reward = SequenceClassifierReward(decoder_reward_model(tmp_path, tokenizer, pad_token_id=0), pair=False,
                                      output="logit", label=0, max_length=64)
    assert reward.model.config.pad_token_id == reward.tokenizer.pad_token_id == 1
    responses = ["a much longer response of several words", "short"]
    single = torch.cat([reward(["post"], [r]) for r in responses])
    # the short text used to be read at its last padding position, a logit that depends on the batch
    torch.testing.assert_close(reward(["post"] * 2, responses), single)


@pytest.mark.parametrize(("pair", "max_length", "minimum"), [(True, 2, 5), (True, 4, 5), (False, 2, 3)])
def test_a_max_length_without_room_for_text_is_refused_at_construction(classifier_dir, pair, max_length, minimum):
    # BERT adds [CLS] [SEP] [SEP] to a pair: with max_length=2 the tokenizer could not truncate and returned whole
    # pairs longer than max_length; with 3 or 4 a text (or both) were cut to nothing and every input scored the same
    with pytest.raises(ValueError, match=rf"max_length={max_length} leaves no room.*max_length >= {minimum}"):
        SequenceClassifierReward(str(classifier_dir), pair=pair, max_length=max_length)


def test_the_smallest_max_length_keeps_a_token_of_each_text_and_stays_within_it(classifier_dir, minilm_tokenizer):
    reward = SequenceClassifierReward(str(classifier_dir), pair=True, max_length=5)
    enc = reward.encode(["a long source text here", "other"], ["resp one", "x y z"])
    assert enc["input_ids"].shape[1] == 5
    # a width of 5 alone also held for a pair cut to [CLS] [SEP] x y [SEP]: the source's first token must be there
    rows = [minilm_tokenizer.convert_ids_to_tokens(row) for row in enc["input_ids"].tolist()]
    assert rows == [["[CLS]", "a", "[SEP]", "res", "[SEP]"], ["[CLS]", "other", "[SEP]", "x", "[SEP]"]]


@pytest.mark.parametrize("pair_order", ["source_response", "response_source"])
def test_a_response_that_fills_max_length_with_the_special_tokens_is_kept_whole(classifier_dir, minilm_tokenizer,
                                                                               pair_order):
    # 13 words + [CLS] [SEP] [SEP] = 16: the response fits once the source is cut to nothing, which tokenizers refuses
    # to do with only_first; the fallback used to cut both texts longest-first and lost 5 words of the response
    reward = SequenceClassifierReward(str(classifier_dir), pair_order=pair_order, max_length=16)
    response = " ".join(["word"] * 13)
    enc = reward.encode(["one two three four five"], [response])
    response_ids = minilm_tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = enc["input_ids"][0].tolist()
    assert len(ids) == 16 and ids.count(minilm_tokenizer.convert_tokens_to_ids("word")) == len(response_ids) == 13


@pytest.mark.parametrize("max_length", [64, 8])  # 8: the per-pair fallback (the response alone is too long)
def test_special_token_strings_in_the_texts_are_text(classifier_dir, minilm_tokenizer, max_length):
    # "[SEP]" in a post or a response was read as a segment separator (and "</s>" as an eos, which makes a BART
    # classifier refuse a batch whose rows differ in their number of eos tokens)
    reward = SequenceClassifierReward(str(classifier_dir), max_length=max_length)
    enc = reward.encode(["a post [SEP] with a [CLS] marker", "plain"], ["one [SEP] two three four five six", "x"])
    for ids in enc["input_ids"].tolist():
        assert ids.count(minilm_tokenizer.sep_token_id) == 2 and ids.count(minilm_tokenizer.cls_token_id) == 1
