"""Reddit TL;DR: schema detection, the exact prompt format, truncation, skip accounting."""

import json
import logging
from pathlib import Path

import pytest

from clp_lightning.data import RedditTLDRDataModule, format_tldr_prompt

FIXTURES = Path(__file__).parents[1] / "fixtures"


def load(tmp_path, train, val, val_split="validation", **kwargs):
    files = {"train": str(FIXTURES / train), val_split: str(FIXTURES / val)}
    dm = RedditTLDRDataModule(data_files=files, val_split=val_split, cache_dir=str(tmp_path), **kwargs)
    dm.setup("fit")
    return dm


def rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_format_tldr_prompt():
    expected = "SUBREDDIT: r/cats\n\nTITLE: Help\n\nPOST: My cat.\n\nTL;DR:"
    assert format_tldr_prompt("cats", "Help", "My cat.") == expected


def test_trl_schema_keeps_the_prompt_exactly_and_strips_the_reference(tmp_path):
    dm = load(tmp_path, "tldr_trl_train.jsonl", "tldr_trl_validation.jsonl")
    raw = rows("tldr_trl_validation.jsonl")
    val = dm.data["val"]
    assert val["prompt"] == [r["prompt"] for r in raw]  # already in the standard format: unchanged
    assert val["reference"] == [r["completion"][1:] for r in raw]  # " " + summary -> summary
    assert val["id"] == [f"validation-{i}" for i in range(len(raw))]
    first = val[0]
    assert first["prompt"].endswith("\n\nTL;DR:")
    assert f"\n\nPOST: {first['source']}\n\nTL;DR:" in first["prompt"]
    assert dm.skipped == {"train": {}, "validation": {}}


def test_carper_schema_is_detected_and_normalised(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clp_lightning.data"):
        dm = load(tmp_path, "tldr_carper_train.jsonl", "tldr_carper_valid.jsonl", val_split="valid")
    trl = load(tmp_path, "tldr_trl_train.jsonl", "tldr_trl_validation.jsonl")
    # Single newlines between the markers become the standard double newlines; same examples, same prompts.
    assert dm.data["val"]["prompt"] == trl.data["val"]["prompt"]
    assert dm.data["val"]["reference"] == trl.data["val"]["reference"]
    # The marker-less row is counted and logged, not dropped silently.
    assert dm.skipped == {"train": {"unparsed prompt": 1}, "valid": {}}
    assert len(dm.data["train"]) == 6
    assert "'train'" in caplog.text and "unparsed prompt: 1" in caplog.text


def test_raw_schema_is_detected(tmp_path):
    dm = load(tmp_path, "tldr_raw.jsonl", "tldr_raw.jsonl")
    raw = rows("tldr_raw.jsonl")
    assert dm.data["train"]["prompt"][0] == format_tldr_prompt(raw[0]["subreddit"], raw[0]["title"], raw[0]["post"])
    assert dm.data["train"]["source"] == [r["post"] for r in raw]


def test_a_raw_subreddit_written_with_r_slash_is_not_prefixed_twice(tmp_path):
    raw = rows("tldr_raw.jsonl")
    prefixed = [{**r, "subreddit": f"r/{r['subreddit']}"} for r in raw]
    file = tmp_path / "raw_prefixed.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in prefixed))
    dm = RedditTLDRDataModule(data_files={"train": str(file), "validation": str(file)}, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.data["train"]["prompt"][0].startswith(f"SUBREDDIT: r/{raw[0]['subreddit']}\n\nTITLE: ")
    assert dm.data["train"]["prompt"][0] == format_tldr_prompt(raw[0]["subreddit"], raw[0]["title"], raw[0]["post"])


def test_undetectable_schema_lists_the_columns(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot detect the TL;DR schema of split 'train' from columns \['prompt'\]"):
        load(tmp_path, "tldr_missing_column.jsonl", "tldr_trl_validation.jsonl")


def test_forced_schema_reports_the_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"'label' is missing from split 'train'"):
        load(tmp_path, "tldr_trl_train.jsonl", "tldr_trl_validation.jsonl", schema="carper")


def test_long_post_is_truncated_at_a_word_boundary_and_keeps_the_cue(tmp_path):
    limit = 400
    dm = load(tmp_path, "tldr_trl_train.jsonl", "tldr_trl_validation.jsonl", max_post_chars=limit)
    original = {f"train-{i}": r for i, r in enumerate(rows("tldr_trl_train.jsonl"))}
    truncated = 0
    for ex in dm.data["train"]:
        post = original[ex["id"]]["prompt"].split("POST: ", 1)[1].removesuffix("\n\nTL;DR:")
        assert ex["prompt"].endswith(f"POST: {ex['source']}\n\nTL;DR:")
        assert len(ex["source"]) <= limit
        if ex["source"] != post:
            truncated += 1
            kept = ex["source"].removesuffix("...")
            assert ex["source"].endswith("...") and post.startswith(kept)
            assert post[len(kept)].isspace()  # cut at a word boundary
    assert truncated == 1  # only the over-long AskReddit post


def test_skipped_rows_are_counted_by_reason(tmp_path, caplog):
    data = tmp_path / "raw.jsonl"
    good = {"subreddit": "cats", "title": "t", "post": "My cat hides.", "summary": " cat hides "}
    bad = [{**good, "post": "   "}, {**good, "summary": ""}, {**good, "summary": None}, {**good, "post": None},
           {**good, "title": 7}, {**good, "subreddit": ["cats"]}]  # had been written as an empty title, subreddit
    empty = [{**good, "title": None}, {**good, "subreddit": ""}]  # kept, written empty
    data.write_text("\n".join(json.dumps(r) for r in [good, *bad, *empty, good]))
    with caplog.at_level(logging.WARNING, logger="clp_lightning.data"):
        dm = RedditTLDRDataModule(data_files={"train": str(data), "validation": str(data)}, cache_dir=str(tmp_path))
        dm.setup("fit")
    expected = {"empty post": 1, "empty reference": 1, "missing reference": 1, "missing post": 1,
                "non-string title": 1, "non-string subreddit": 1}
    assert dm.skipped["train"] == expected
    assert dm.data["train"]["id"] == ["train-0", "train-7", "train-8", "train-9"]  # ids stay the original row numbers
    assert dm.data["train"]["reference"] == ["cat hides"] * 4
    assert dm.data["train"]["prompt"][1:3] == [format_tldr_prompt("cats", "", "My cat hides."),
                                               format_tldr_prompt("", "t", "My cat hides.")]
    assert "skipped 6 of 10 rows" in caplog.text and "missing post: 1" in caplog.text


def test_a_non_integer_post_limit_is_refused_at_construction():
    # 400.0 passed the marker check and failed after loading, as a TypeError from a slice inside datasets' map
    with pytest.raises(ValueError, match=r"max_post_chars must be an integer \(or null for whole posts\), got 400.0"):
        RedditTLDRDataModule(max_post_chars=400.0)


@pytest.mark.parametrize("path", ["CarperAI/openai_summarize_tldr", "carperai/openai_summarize_tldr@main"])
def test_a_carper_split_that_does_not_exist_is_refused_at_construction(path):
    # the default val_split "validation" failed only in setup, after the download and the model's loading
    with pytest.raises(ValueError, match=r"val_split='validation': .* has no split 'validation'; its splits are "
                                         r"\['train', 'valid', 'test'\]"):
        RedditTLDRDataModule(path=path)
    with pytest.raises(ValueError, match=r"test_split='valid\+tset\[:10\]': .* has no split 'tset'"):
        RedditTLDRDataModule(path=path, val_split="valid", test_split="valid+tset[:10]")
    dm = RedditTLDRDataModule(path=path, val_split="valid[:100]", train_split="train+test")  # nothing is loaded
    assert dm.splits["val"] == "valid[:100]"


def test_a_local_directory_is_not_held_to_the_hub_datasets_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "CarperAI" / "openai_summarize_tldr").mkdir(parents=True)
    assert RedditTLDRDataModule(path="CarperAI/openai_summarize_tldr").splits["val"] == "validation"


def test_a_marker_that_is_not_a_string_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"truncation_marker must be a string, got None"):
        RedditTLDRDataModule(truncation_marker=None)
