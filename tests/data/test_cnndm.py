"""CNN/DailyMail: Parquet loading, templates, highlights, truncation, the empty-article row."""

import logging
from pathlib import Path

import datasets
import pytest

from clp_lightning.data import CNNDailyMailDataModule

FIXTURES = Path(__file__).parents[1] / "fixtures"
FILES = {s: str(FIXTURES / f"cnndm_{s}.parquet") for s in ("train", "validation")}


def load(tmp_path, **kwargs):
    dm = CNNDailyMailDataModule(data_files=FILES, cache_dir=str(tmp_path), **kwargs)
    dm.setup("fit")
    return dm


def raw(split):
    return datasets.Dataset.from_parquet(FILES[split])


def test_loads_with_default_template_and_joined_highlights(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clp_lightning.data"):
        dm = load(tmp_path)
    original = raw("train")
    train = dm.data["train"]
    assert train["id"] == original["id"][:3]  # the dataset's own ids; the empty article is gone
    assert train["prompt"][0] == original["article"][0] + "\n\nTL;DR:"
    assert train["source"][0] == original["article"][0]
    assert train["reference"][0] == " ".join(original["highlights"][0].split("\n"))
    assert all("\n" not in r for r in train["reference"])
    assert dm.skipped == {"train": {"empty article": 1}, "validation": {}}
    assert "empty article: 1" in caplog.text


def test_highlights_can_keep_newlines_and_template_is_configurable(tmp_path):
    dm = load(tmp_path, join_highlights=False, prompt_template="summarize: {article}")
    first = dm.data["val"][0]
    assert first["reference"].count("\n") == 2
    assert first["prompt"] == "summarize: " + first["source"]


def test_article_truncation(tmp_path):
    dm = load(tmp_path, max_article_chars=120, truncation_marker="")
    for ex, article in zip(dm.data["val"], raw("validation")["article"]):
        assert len(ex["source"]) <= 120 and article.startswith(ex["source"])
        assert article[len(ex["source"])].isspace()
        assert ex["prompt"] == ex["source"] + "\n\nTL;DR:"


def test_bad_template_fails_at_construction():
    with pytest.raises(ValueError, match="article"):
        CNNDailyMailDataModule(prompt_template="summarize: {text}")
    with pytest.raises(ValueError, match="article"):
        CNNDailyMailDataModule(prompt_template="summarize:")


@pytest.mark.parametrize("template", ["summarize: {{article}}", "{{article}}\n\nTL;DR:"])
def test_an_escaped_article_field_is_refused(template):
    # "{{article}}" formats to the literal text "{article}": every prompt would have been the same, with no article
    with pytest.raises(ValueError, match="has no {article} field"):
        CNNDailyMailDataModule(prompt_template=template)


def test_an_article_field_with_a_conversion_is_accepted(tmp_path):
    dm = load(tmp_path, prompt_template="summarize: {article!s}")
    assert dm.data["val"][0]["prompt"] == "summarize: " + dm.data["val"][0]["source"]


def test_a_non_integer_article_limit_is_refused_at_construction():
    # 120.0 passed the marker check and failed after loading, as a TypeError from a slice inside datasets' map
    with pytest.raises(ValueError, match=r"max_article_chars must be an integer .*, got 120.0"):
        CNNDailyMailDataModule(max_article_chars=120.0)


def test_the_hub_configuration_name_on_a_local_directory_says_to_set_it_to_null(tmp_path):
    """The default name "3.0.0" on a directory of files (what `clp data cnndm-blanc` writes) failed with datasets'
    "BuilderConfig '3.0.0' not found" and no word on what to change."""
    import shutil

    directory = tmp_path / "cnndm"
    directory.mkdir()
    for split, file in FILES.items():
        shutil.copy(file, directory / f"{split}.parquet")
    with pytest.raises(ValueError, match="name='3.0.0' is a configuration of a hub dataset.*set name to null"):
        CNNDailyMailDataModule(path=str(directory), cache_dir=str(tmp_path / "cache")).check_files("fit")
    dm = CNNDailyMailDataModule(path=str(directory), name=None, cache_dir=str(tmp_path / "cache"))
    dm.check_files("fit")
    dm.setup("fit")
    assert len(dm.data["train"]) == 3


@pytest.mark.parametrize(("arg", "value", "expected"), [
    ("join_highlights", "false", "true or false"),  # the string "false" is true: the highlights were joined
    ("prompt_template", None, "a string"),  # an AttributeError from None.format
    ("truncation_marker", 3, "a string"),
])
def test_options_of_the_wrong_type_are_refused_at_construction(arg, value, expected):
    with pytest.raises(ValueError, match=rf"{arg} must be {expected}, got {value!r}"):
        CNNDailyMailDataModule(**{arg: value}, max_article_chars=100)
