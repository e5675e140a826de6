"""Synthetic TL;DR data: determinism, the length spread, references grounded in their posts."""

import re
from collections import Counter

import pytest

from clp_lightning.data import TLDR_TEMPLATE, SyntheticTLDRDataModule, generate_examples


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def test_same_seed_same_data_different_seed_different():
    assert generate_examples(50, seed=3) == generate_examples(50, seed=3)
    assert generate_examples(50, seed=3) != generate_examples(50, seed=4)
    assert generate_examples(50, seed=3, split="train") != generate_examples(50, seed=3, split="test")


def test_examples_are_short_ascii_posts_in_the_raw_schema():
    examples = generate_examples(500, seed=0)
    assert all(set(e) == {"subreddit", "title", "post", "summary", "id"} for e in examples)
    assert all(e["post"].isascii() and e["title"].isascii() and e["summary"].isascii() for e in examples)
    lengths = [len(e["post"].split()) for e in examples]
    assert 25 <= min(lengths) and max(lengths) <= 70
    assert len({e["subreddit"] for e in examples}) == 10


def test_references_spread_in_length_and_come_from_the_post():
    examples = generate_examples(500, seed=0)
    lengths = Counter(len(e["summary"].split()) for e in examples)
    assert min(lengths) == 2 and max(lengths) >= 14
    assert len(lengths) >= 10
    short, long_ = sum(n for k, n in lengths.items() if k <= 3), sum(n for k, n in lengths.items() if k >= 12)
    assert short > 50 and long_ > 50  # both ends of the trade-off are well represented
    for e in examples:
        assert set(words(e["summary"])) <= set(words(e["post"])), e


def test_data_module_uses_the_tldr_format():
    dm = SyntheticTLDRDataModule(num_train=10, num_val=3, num_test=2, batch_size=4, seed=7)
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 4
    example = generate_examples(3, seed=7, split="validation")[0]
    first = dm.data["val"][0]
    assert first["prompt"] == TLDR_TEMPLATE.format(**example)
    assert (first["source"], first["reference"], first["id"]) == (example["post"], example["summary"], example["id"])
    assert len(dm.data["test"]) == 2
    assert dm.skipped == {"train": {}, "validation": {}, "test": {}}


def test_check_files_ignores_a_synthetic_folder_in_the_cwd(tmp_path, monkeypatch):
    # the data module's path is the placeholder "synthetic": a folder of that name must not be read as the data
    (tmp_path / "synthetic").mkdir()
    monkeypatch.chdir(tmp_path)
    SyntheticTLDRDataModule(num_train=4, num_val=2).check_files("fit")


def test_roles_sharing_a_split_must_share_its_size():
    # val_split=test_split: both roles read one list of examples, so two sizes for it would silently keep the last
    with pytest.raises(ValueError, match=r"test_split 'test'.*num_test=2 against 3"):
        SyntheticTLDRDataModule(num_val=3, num_test=2, val_split="test")
    dm = SyntheticTLDRDataModule(num_train=4, num_val=3, num_test=3, val_split="test", batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.data["val"]) == len(dm.data["test"]) == 3
    assert dm.data["val"][0]["id"] == dm.data["test"][0]["id"]


@pytest.mark.parametrize("arg, value", [("num_train", 0), ("num_val", -1), ("num_test", 2.5), ("num_train", "8")])
def test_a_size_that_is_not_an_integer_above_zero_is_refused_at_construction(arg, value):
    # 0 failed in setup as "Split 'train' is empty" and 2.5 as a TypeError from range(), after the model had loaded
    with pytest.raises(ValueError, match=rf"{arg} must be an integer >= 1, got {value!r}"):
        SyntheticTLDRDataModule(**{arg: value})


def test_a_predict_split_of_its_own_has_num_test_examples():
    dm = SyntheticTLDRDataModule(num_train=4, num_val=2, num_test=3, predict_split="extra")
    dm.setup("predict")
    assert len(dm.data["predict"]) == 3
    assert dm.data["predict"]["id"][0] == "synthetic-extra-0"
    shared = SyntheticTLDRDataModule(num_train=4, num_val=2, num_test=3, predict_split="train")
    shared.setup("predict")
    assert len(shared.data["predict"]) == 4  # the train split's examples, as trained on
