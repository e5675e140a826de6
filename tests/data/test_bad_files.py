"""Bad data files stop in prepare_data / setup with the file (and line) named, before datasets builds a cache.

A row whose fields are missing or of the wrong type is not an error: it is skipped and counted (``skipped``).
"""

import csv
import gzip
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from clp_lightning.data import CNNDailyMailDataModule, RedditTLDRDataModule
from clp_lightning.data.base import check_data_file

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRL_TRAIN, TRL_VAL = FIXTURES / "tldr_trl_train.jsonl", FIXTURES / "tldr_trl_validation.jsonl"
GOOD = TRL_TRAIN.read_text().splitlines()  # six rows of the trl schema


def tldr(tmp_path, train):
    return RedditTLDRDataModule(data_files={"train": str(train), "validation": str(TRL_VAL)},
                                cache_dir=str(tmp_path / "cache"))


def raises(call, file, *fragments):
    """``call()`` raises a plain ValueError (not a UnicodeDecodeError, its subclass) naming ``file`` and more."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert type(info.value) is ValueError, f"{type(info.value).__name__}: {message}"
    assert str(file) in message and all(f in message for f in fragments), message
    return message


def no_cache_built(tmp_path):
    return not list((tmp_path / "cache").rglob("*.arrow"))


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "whitespace"])
def test_file_without_rows_is_named(tmp_path, content):
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    dm = tldr(tmp_path, train)
    raises(dm.prepare_data, train, "(split 'train') has no rows")
    raises(lambda: dm.setup("fit"), train, "(split 'train') has no rows")  # without prepare_data too
    assert no_cache_built(tmp_path)


def test_latin1_file_names_line_and_byte(tmp_path):
    train = tmp_path / "train.jsonl"
    head = "\n".join(GOOD[:2]).encode() + b"\n"
    bad = json.dumps({"prompt": "x", "completion": "café"}, ensure_ascii=False).encode("latin-1")
    train.write_bytes(head + bad + b"\n" + "\n".join(GOOD[2:]).encode())
    offset = len(head) + bad.index(b"\xe9")
    raises(tldr(tmp_path, train).prepare_data, train, "is not UTF-8", "line 3,", f"byte offset {offset} ")
    assert no_cache_built(tmp_path)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [('{"prompt": "a", "completion": ', "line 3, column 30: not valid JSON"), ("[1, 2]", "line 3: '[1, 2]' is not")],
    ids=["truncated", "not-an-object"],
)
def test_bad_json_line_among_good_ones_is_named(tmp_path, line, fragment):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([*GOOD[:2], line, *GOOD[2:]]) + "\n")
    dm = tldr(tmp_path, train)
    raises(dm.prepare_data, train, fragment)
    raises(lambda: dm.setup("fit"), train, fragment)
    assert no_cache_built(tmp_path)


def test_json_array_file_is_checked_too(tmp_path):
    rows = [json.loads(line) for line in GOOD]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(rows, indent=1))  # one JSON document over many lines, which datasets reads
    tldr(tmp_path, train).setup("fit")
    train.write_text(json.dumps([*rows[:2], "not a row"]))
    raises(tldr(tmp_path, train).prepare_data, train, "element 2 of the JSON array")
    train.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows[:3]) + ",\n{\"prompt\": ]")
    raises(tldr(tmp_path, train).prepare_data, train, "line 5, column 12: not valid JSON")


def test_row_with_wrong_type_is_skipped_and_counted(tmp_path, caplog):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([*GOOD[:2], json.dumps({"prompt": 3, "completion": " x"}), *GOOD[2:]]) + "\n")
    dm = tldr(tmp_path, train)
    with caplog.at_level(logging.WARNING, logger="clp_lightning.data"):
        dm.prepare_data()
        dm.setup("fit")
    assert dm.skipped["train"] == {"non-string prompt": 1}
    assert len(dm.data["train"]) == 6 and "train-2" not in dm.data["train"]["id"]
    assert "Split 'train': skipped 1 of 7 rows (non-string prompt: 1)" in caplog.text


def write_cnndm_csv(path, extra_row):
    rows = pd.read_parquet(FIXTURES / "cnndm_validation.parquet")
    rows.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    with path.open("a") as f:
        f.write(extra_row)


def test_csv_row_with_too_many_fields_is_named(tmp_path):
    files = {split: tmp_path / f"{split}.csv" for split in ("train", "validation")}
    write_cnndm_csv(files["validation"], "")
    write_cnndm_csv(files["train"], '"an article","highlights","id-9","one field too many"\n')
    lines = files["train"].read_text().count("\n")  # the bad row is the last line
    dm = CNNDailyMailDataModule(data_files={k: str(v) for k, v in files.items()}, cache_dir=str(tmp_path / "cache"))
    raises(dm.prepare_data, files["train"], f"line {lines}: 4 fields, expected at most 3")
    assert no_cache_built(tmp_path)


def test_truncated_parquet_is_named(tmp_path):
    train = tmp_path / "train.parquet"
    data = (FIXTURES / "cnndm_train.parquet").read_bytes()
    train.write_bytes(data[: len(data) // 2])
    files = {"train": str(train), "validation": str(FIXTURES / "cnndm_validation.parquet")}
    dm = CNNDailyMailDataModule(data_files=files, cache_dir=str(tmp_path / "cache"))
    raises(dm.prepare_data, train, "is not a readable Parquet file")


def test_compressed_file_is_left_to_datasets_but_named(tmp_path):
    train = tmp_path / "train.jsonl.gz"
    train.write_bytes(gzip.compress(TRL_TRAIN.read_bytes())[:100])  # truncated stream
    dm = tldr(tmp_path, train)
    check_data_file(str(train), "train")  # not decompressed here
    raises(dm.prepare_data, train, "Could not read split 'train'")
    raises(lambda: dm.setup("fit"), train, "Could not read split 'train'")


def test_bad_file_in_a_directory_is_named(tmp_path):
    data = tmp_path / "tldr"
    data.mkdir()
    shutil.copy(TRL_TRAIN, data / "train.jsonl")
    (data / "validation.jsonl").write_text("\n")
    dm = RedditTLDRDataModule(path=str(data), cache_dir=str(tmp_path / "cache"))
    raises(dm.prepare_data, data / "validation.jsonl", "(split 'validation') has no rows")


def test_one_empty_file_among_a_splits_files_is_named(tmp_path):
    empty = tmp_path / "part-2.jsonl"
    empty.write_text("")
    dm = RedditTLDRDataModule(data_files={"train": [str(TRL_TRAIN), str(empty)], "validation": str(TRL_VAL)},
                              cache_dir=str(tmp_path / "cache"))
    raises(lambda: dm.setup("fit"), empty, "has no rows")
