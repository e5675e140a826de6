"""Shared behaviour of the data modules: loading, errors, subsampling, shuffling, the batch contract."""

import importlib
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from clp_lightning.data import BATCH_KEYS, RedditTLDRDataModule, SyntheticTLDRDataModule, truncate_words
from clp_lightning.data.base import builder_for

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRL_FILES = {"train": str(FIXTURES / "tldr_trl_train.jsonl"), "validation": str(FIXTURES / "tldr_trl_validation.jsonl")}


def tldr(tmp_path, **kwargs):
    return RedditTLDRDataModule(**{"data_files": TRL_FILES, "cache_dir": str(tmp_path), **kwargs})


def train_ids(dm, epochs=1):
    loader = dm.train_dataloader()
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # as Lightning does at the start of every epoch
        out.append([i for batch in loader for i in batch["id"]])
    return out


def test_resumed_epoch_skips_the_batches_already_seen():
    dm = SyntheticTLDRDataModule(num_train=32, num_val=4, batch_size=4, seed=0)
    dm.setup("fit")
    full = train_ids(dm, epochs=2)
    # the loader's own state, as Lightning saves it after three batches of epoch 1 and gives it back on resume
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    assert state == {"epoch": 1, "samples_done": 12}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert [i for batch in resumed for i in batch["id"]] == full[1][12:]
    assert resumed.state_dict() == {"epoch": 1, "samples_done": 32}  # the skipped batches count as done
    resumed.sampler.set_epoch(2)  # the skip holds for the interrupted epoch only
    assert len([i for batch in resumed for i in batch["id"]]) == 32
    # a checkpoint of an earlier version kept the position in the data module's state
    dm.load_state_dict({"epoch": 1, "samples_done": 12})
    old = dm.train_dataloader()
    old.sampler.set_epoch(1)
    assert [i for batch in old for i in batch["id"]] == full[1][12:]


def test_drop_last_with_fewer_rows_than_a_batch_is_refused(monkeypatch):
    # Lightning only warned about a loader with no batch, and the fit "finished" at step 0 (an SFT run then saved
    # its untrained model as the warm start)
    dm = SyntheticTLDRDataModule(num_train=6, num_val=2, batch_size=4, seed=0, drop_last=True)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1  # 6 rows: one full batch
    monkeypatch.setattr("clp_lightning.data.base._layout", lambda: (0, 2))  # 3 rows per process
    with pytest.raises(ValueError, match=r"6 rows, 3 per process, fewer than batch_size=4 with drop_last"):
        dm.train_dataloader()
    dm.drop_last = False
    assert len(dm.train_dataloader()) == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_order_is_the_seeded_permutation_dealt_to_ranks(world, monkeypatch):
    # The order the quick start's numbers depend on: randperm(seed + epoch), padded to a multiple of the ranks,
    # rank r taking every world-th index; resuming skips the same prefix of the global order on every rank.
    dm = SyntheticTLDRDataModule(num_train=10, num_val=4, batch_size=1, seed=3)
    dm.setup("fit")
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    order += order[: (-10) % world]
    for rank in range(world):
        monkeypatch.setattr("clp_lightning.data.base._layout", lambda rank=rank: (rank, world))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        assert [int(i.rsplit("-", 1)[1]) for b in loader for i in b["id"]] == order[rank::world]
        loader.load_state_dict({"epoch": 1, "samples_done": 2 * world})
        assert [int(i.rsplit("-", 1)[1]) for b in loader for i in b["id"]] == order[2 * world:][rank::world]


@pytest.mark.parametrize("saved_world, world, done", [(2, 3, 4), (4, 3, 8), (1, 4, 9), (2, 8, 8), (3, 2, 9)])
def test_a_position_saved_by_another_number_of_processes_resumes_the_rest_of_the_epoch(saved_world, world, done,
                                                                                        monkeypatch):
    # 8 ranks' checkpoint resumed on 3 (or 1 on 4, ...): samples_done=4 is no multiple of 3, and the resume stopped with
    # a ValueError deep in the fit. Now every sample of the epoch not trained on is trained on once (the padding to
    # a whole round aside), each rank taking as many batches.
    dm = SyntheticTLDRDataModule(num_train=10, num_val=4, batch_size=1, seed=3)
    dm.setup("fit")
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert done % saved_world == 0
    taken = []
    for rank in range(world):
        monkeypatch.setattr("clp_lightning.data.base._layout", lambda rank=rank: (rank, world))
        loader = dm.train_dataloader()
        loader.load_state_dict({"epoch": 1, "samples_done": done})
        loader.sampler.set_epoch(1)
        taken.append([int(i.rsplit("-", 1)[1]) for b in loader for i in b["id"]])
    rest = order[done:]
    assert len({len(t) for t in taken}) == 1 and len(taken[0]) == -(-len(rest) // world)
    assert set(rest) <= {i for t in taken for i in t}
    assert sum(map(len, taken)) - len(rest) < world  # more: the padding to a whole round only


def test_a_malformed_saved_position_is_named():
    dm = SyntheticTLDRDataModule(num_train=10, num_val=4, batch_size=1, seed=3)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"saved position \(epoch 1, samples_done -2\) is not two integers >= 0"):
        dm.train_dataloader().load_state_dict({"epoch": 1, "samples_done": -2})


@pytest.mark.parametrize(
    ("text", "max_chars", "marker", "expected"),
    [
        ("short text", 20, "...", "short text"),
        ("alpha beta gamma delta", 15, "...", "alpha beta..."),  # "gamma" would be cut mid-word
        ("alpha beta gamma delta", 13, "", "alpha beta"),  # cut falls right after "beta": keep it
        ("alpha beta gamma delta", 16, "", "alpha beta gamma"),
        ("supercalifragilistic", 8, "...", "super..."),  # one long word: no boundary, hard cut
        ("one two\nthree four", 11, "...", "one two..."),  # the cut ends on a newline: keep the word before it
        ("First line.\nNext line", 12, "", "First line."),  # (a post's paragraphs)
    ],
)
def test_truncate_words(text, max_chars, marker, expected):
    assert truncate_words(text, max_chars, marker) == expected
    assert len(truncate_words(text, max_chars, marker)) <= max_chars


def test_builder_inferred_from_extension():
    assert builder_for(["a.jsonl", "b.json"]) == "json"
    assert builder_for(["a.parquet"]) == "parquet"
    assert builder_for(["a.csv.gz"]) == "csv"
    with pytest.raises(ValueError, match=r"a\.txt"):
        builder_for(["a.txt"])
    with pytest.raises(ValueError, match="mix formats"):
        builder_for(["a.csv", "b.json"])


def test_batches_follow_the_contract(tmp_path):
    dm = tldr(tmp_path, batch_size=4, val_batch_size=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(BATCH_KEYS)
    assert all(isinstance(batch[k], list) and len(batch[k]) == 4 for k in BATCH_KEYS)
    assert all(isinstance(v, str) and v for k in BATCH_KEYS for v in batch[k])
    assert [len(b["prompt"]) for b in dm.val_dataloader()] == [5, 1]


def test_workers_can_collate(tmp_path):
    dm = tldr(tmp_path, batch_size=3, num_workers=1)
    dm.setup("fit")
    assert sorted(i for b in dm.train_dataloader() for i in b["id"]) == [f"train-{i}" for i in range(6)]


def test_setup_loads_only_what_the_stage_needs(tmp_path):
    dm = tldr(tmp_path)  # the fixture has no test split: fit and validate must not ask for it
    dm.setup("fit")
    assert set(dm.data) == {"train", "val"}
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"'test' is not in data_files"):
        dm.setup("test")


def test_max_train_samples_takes_the_first_rows(tmp_path):
    dm = tldr(tmp_path, max_train_samples=4, max_val_samples=2)
    dm.setup("fit")
    assert sorted(dm.data["train"]["id"]) == ["train-0", "train-1", "train-2", "train-3"]
    assert len(dm.data["val"]) == 2


@pytest.mark.parametrize("arg", ["max_train_samples", "max_val_samples", "max_test_samples"])
@pytest.mark.parametrize("value", [0, -1])
def test_a_cap_below_one_row_is_refused_at_construction(tmp_path, arg, value):
    # not after the loading, as "Column 'skip' doesn't exist"
    with pytest.raises(ValueError, match=rf"{arg} must be an integer >= 1 \(or null for no limit\), got {value}"):
        tldr(tmp_path, **{arg: value})


@pytest.mark.parametrize(
    ("arg", "value", "expected"),
    [
        ("max_train_samples", 2.5, r"an integer >= 1 \(or null for no limit\)"),
        ("batch_size", 2.5, "an integer >= 1"),
        ("val_batch_size", True, "an integer >= 1"),
        ("num_workers", -1, "an integer >= 0"),
        ("seed", -1, "an integer >= 0"),
    ],
)
def test_a_non_integer_size_or_a_negative_seed_is_refused_at_construction(tmp_path, arg, value, expected):
    # each used to construct fine and fail only once the splits were loaded (select(), DataLoader, the generator)
    with pytest.raises(ValueError, match=rf"{arg} must be {expected}, got {value!r}"):
        tldr(tmp_path, shuffle_before_subsample=True, **{arg: value})


def test_subsample_shuffle_is_seeded(tmp_path):
    picks = [tldr(tmp_path, max_train_samples=3, shuffle_before_subsample=True, seed=s) for s in (1, 1, 2)]
    for dm in picks:
        dm.setup("fit")
    a, b, c = (sorted(dm.data["train"]["id"]) for dm in picks)
    assert a == b and a != c


def test_train_order_is_deterministic_under_a_seed():
    def dm(seed):
        d = SyntheticTLDRDataModule(num_train=32, num_val=4, batch_size=4, seed=seed)
        d.setup("fit")
        return d

    first, again = train_ids(dm(0), epochs=2), train_ids(dm(0), epochs=2)
    assert first == again
    assert first[0] != first[1]  # a fresh order each epoch
    assert sorted(first[0]) == sorted(first[1])
    assert train_ids(dm(1)) != first[:1]


def test_local_directory(tmp_path):
    data = tmp_path / "tldr"
    data.mkdir()
    shutil.copy(TRL_FILES["train"], data / "train.jsonl")
    shutil.copy(TRL_FILES["validation"], data / "validation.jsonl")
    dm = RedditTLDRDataModule(path=str(data), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.data["train"]) == 6 and len(dm.data["val"]) == 6


def test_a_hub_dataset_pinned_to_a_revision_is_read_at_that_revision(tmp_path, monkeypatch):
    # "owner/name@revision" reached the hub as a repository id with "@" in it; now its files are read at the
    # revision, in prepare_data and in setup. The hub is replaced by the fixture files, read by the real loader.
    import datasets

    from clp_lightning.data import base

    real_load, calls = datasets.load_dataset, []

    def hub(path, name=None, cache_dir=None, revision=None, split=None):
        calls.append((path, revision, split))
        files = {"train": TRL_FILES["train"], "validation": TRL_FILES["validation"]}
        return real_load("json", data_files=files, cache_dir=str(tmp_path / "cache"), split=split)

    monkeypatch.setattr(base.datasets, "load_dataset", hub)
    dm = RedditTLDRDataModule(path="trl-lib/tldr@" + "f" * 40, cache_dir=str(tmp_path / "hub"))
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.data["train"]) == 6 and len(dm.data["val"]) == 6
    assert calls and {(path, revision) for path, revision, _ in calls} == {("trl-lib/tldr", "f" * 40)}
    calls.clear()
    RedditTLDRDataModule(path="trl-lib/tldr", cache_dir=str(tmp_path / "hub")).prepare_data()
    assert calls == [("trl-lib/tldr", None, None)]  # unpinned: no revision argument, as before


def test_prepare_data_reads_splits_of_different_schemas_as_setup_does(tmp_path):
    # trl train, CarperAI validation: setup loads one split per call, so prepare_data (which trainer.fit runs
    # first) must too; loading both at once, datasets casts validation to train's columns and fails
    files = {"train": TRL_FILES["train"], "validation": str(FIXTURES / "tldr_carper_valid.jsonl")}
    dm = tldr(tmp_path, data_files=files)
    dm.prepare_data()
    caches = sorted(p.name for p in (tmp_path / "json").iterdir())
    dm.setup("fit")
    assert len(dm.data["train"]) == 6 and len(dm.data["val"]) == 6
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == caches  # setup reuses what prepare_data built


EDITED_MODULE = """
from clp_lightning.data import CNNDailyMailDataModule


def label(prompt):
    return {label!r} + prompt


class EditedModule(CNNDailyMailDataModule):
    @staticmethod
    def convert_row(row, **options):
        out = CNNDailyMailDataModule.convert_row(row, **options)
        return {{**out, "prompt": label(out["prompt"])}}
"""


def test_formatted_rows_are_not_read_back_after_the_formatting_code_changes(tmp_path, monkeypatch):
    # datasets keys its cache of the formatted rows on convert_row's code but on the helpers it calls by name only:
    # an edit to a helper (here `label`; truncate_words or the TL;DR template in the package) must not be ignored
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module_file = tmp_path / "edited_module.py"
    files = {"train": str(FIXTURES / "cnndm_train.parquet"), "validation": str(FIXTURES / "cnndm_validation.parquet")}
    prompts = []
    for label in ("OLD: ", "NEWER: "):
        module_file.write_text(EDITED_MODULE.format(label=label))
        sys.modules.pop("edited_module", None)
        module = importlib.import_module("edited_module")
        dm = module.EditedModule(data_files=files, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        prompts.append(dm.data["train"][0]["prompt"])
    sys.modules.pop("edited_module", None)
    assert prompts[0].startswith("OLD: (CNN)") and prompts[1] == "NEWER: " + prompts[0].removeprefix("OLD: ")


NOTEBOOK_CELL = """
from clp_lightning.data import CNNDailyMailDataModule


class NotebookModule(CNNDailyMailDataModule):
    @staticmethod
    def convert_row(row, **options):
        out = CNNDailyMailDataModule.convert_row(row, **options)
        return {{**out, "prompt": {label!r} + out["prompt"]}}
"""


def test_formatted_rows_are_not_read_back_after_convert_row_changes_in_a_module_without_a_file(tmp_path,
                                                                                               monkeypatch):
    # a data module defined in a notebook (its __main__ has no source file to hash): the cache key must still
    # follow convert_row's own code, as datasets' key did
    files = {"train": str(FIXTURES / "cnndm_train.parquet"), "validation": str(FIXTURES / "cnndm_validation.parquet")}
    prompts = []
    for label in ("OLD: ", "NEWER: "):
        cell = types.ModuleType("__main__")
        monkeypatch.setitem(sys.modules, "__main__", cell)
        exec(NOTEBOOK_CELL.format(label=label), cell.__dict__)
        dm = cell.NotebookModule(data_files=files, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        prompts.append(dm.data["train"][0]["prompt"])
    assert prompts[0].startswith("OLD: (CNN)") and prompts[1] == "NEWER: " + prompts[0].removeprefix("OLD: ")


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tldr(tmp_path, data_files={"train": missing, "validation": missing}).setup("fit")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        RedditTLDRDataModule(path=str(tmp_path / "no_such_dir")).prepare_data()


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{this is not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl"):
        tldr(tmp_path, data_files={"train": str(bad), "validation": str(bad)}).setup("fit")


def test_empty_split_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl' \(split 'validation'\) has no rows"):
        tldr(tmp_path, data_files={"train": TRL_FILES["train"], "validation": str(empty)}).setup("fit")
    # a source with no rows in a split (a hub dataset's, say); the synthetic module refuses num_val=0 when made
    import datasets

    dm = SyntheticTLDRDataModule(num_val=1)
    dm._load_split = lambda split: datasets.Dataset.from_dict({"post": []}) if split == "validation" else (
        SyntheticTLDRDataModule._load_split(dm, split))
    with pytest.raises(ValueError, match=r"'validation' is empty"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "text, columns",
    [
        ('{"post": "a", "id": 1}\n\n{"post": "b", "summary": "s"}\n', {"post", "id", "summary"}),  # JSON Lines
        ('[{"post": "a"}, {"id": 2}]', {"post", "id"}),  # an array on one line
        ('[\n  {"post": "a"},\n  {"summary": "s"}\n]\n', {"post", "summary"}),  # an array over lines
        ('{\n  "post": ["a", "b"],\n  "id": [1, 2]\n}\n', {"post", "id"}),  # columns over lines
    ],
)
def test_the_columns_of_a_json_file(tmp_path, monkeypatch, text, columns):
    from clp_lightning.data import base

    path = tmp_path / "rows.json"
    path.write_text(text)
    base.check_data_file(str(path), "train")
    parsed, loads = [], base.json.loads
    monkeypatch.setattr(base.json, "loads", lambda s, *a, **k: parsed.append(s) or loads(s, *a, **k))
    assert base.data_file_columns(str(path)) == columns
    if text.startswith("{") and "{\n" not in text:  # JSON Lines: one row at a time, never the whole file
        assert parsed and all(s.count("\n") <= 1 for s in parsed)


def test_missing_column_names_column_split_and_found(tmp_path):
    files = {"train": str(FIXTURES / "tldr_missing_column.jsonl")}
    dm = tldr(tmp_path, data_files=files, schema="trl")
    with pytest.raises(ValueError, match=r"'completion' is missing from split 'train'; found columns \['prompt'\]"):
        dm.setup("fit")


def test_cli_sees_the_base_arguments():
    parser = ArgumentParser()
    parser.add_class_arguments(RedditTLDRDataModule, "data")
    args = ["--data.batch_size=3", "--data.max_post_chars=500", "--data.val_split=valid"]
    cfg = parser.parse_args([*args, '--data.data_files={"train": "t.jsonl", "valid": ["a.jsonl", "b.jsonl"]}'])
    assert (cfg.data.batch_size, cfg.data.max_post_chars, cfg.data.val_split) == (3, 500, "valid")
    assert cfg.data.data_files == {"train": "t.jsonl", "valid": ["a.jsonl", "b.jsonl"]}


def test_trainer_consumes_the_batches(tmp_path):
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch)
            return (self.weight - len(batch["prompt"])) ** 2

        def validation_step(self, batch, batch_idx):
            self.seen.append(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm, probe = SyntheticTLDRDataModule(num_train=8, num_val=3, batch_size=4), Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=dm)
    assert [len(b["prompt"]) for b in probe.seen] == [3, 4, 4, 3]  # sanity check, 2 train steps, 1 val
    assert all(set(b) == set(BATCH_KEYS) for b in probe.seen)


def test_a_file_pattern_that_matches_nothing_is_named_before_loading(tmp_path):
    # check_files passed it (the CLI's check before the model loads) and setup failed with datasets' bare
    # StopIteration()
    pattern = str(tmp_path / "shards" / "train-*.jsonl")
    dm = tldr(tmp_path, data_files={"train": pattern, "validation": TRL_FILES["validation"]})
    with pytest.raises(FileNotFoundError, match=r"pattern '.*train-\*\.jsonl' matches no file"):
        dm.check_files("fit")
    (tmp_path / "shards").mkdir()
    shutil.copy(TRL_FILES["train"], tmp_path / "shards" / "train-00.jsonl")
    dm.check_files("fit")
    dm.setup("fit")
    assert len(dm.data["train"]) == 6


RAW_ROW = {"subreddit": "cats", "title": "t", "post": "My cat hides.", "summary": "cat hides"}


def raw_files(tmp_path, ids, suffix="jsonl"):
    data = tmp_path / f"ids.{suffix}"
    if suffix == "csv":
        data.write_text("id,subreddit,title,post,summary\n" + "".join(f"{i},c,t,p,s\n" for i in ids))
    else:
        data.write_text("".join(json.dumps({**RAW_ROW, **({} if i == "absent" else {"id": i})}) + "\n" for i in ids))
    return {"train": str(data), "validation": str(data)}


def test_rows_without_an_id_are_named_by_their_row_number(tmp_path, caplog):
    # str(None) gave every such row the one id "None": distinct rows that could not be told apart
    with caplog.at_level(logging.WARNING, logger="clp_lightning.data"):
        dm = RedditTLDRDataModule(data_files=raw_files(tmp_path, ["a", None, None, "absent", "b"]),
                                  cache_dir=str(tmp_path))
        dm.setup("fit")
    assert dm.data["train"]["id"] == ["a", "train-1", "train-2", "train-3", "b"]
    assert dm.data["val"]["id"] == ["a", "validation-1", "validation-2", "validation-3", "b"]
    assert "Split 'train': 3 rows have no id (rows [1, 2, 3])" in caplog.text
    everyone = RedditTLDRDataModule(data_files=raw_files(tmp_path, [None, None]), cache_dir=str(tmp_path))
    everyone.setup("fit")
    assert everyone.data["train"]["id"] == ["train-0", "train-1"]


def test_a_csv_integer_id_column_with_an_empty_cell_keeps_integer_ids(tmp_path):
    # pandas reads such a column as floats: the ids had read "1.0", "None", "3.0"
    dm = RedditTLDRDataModule(data_files=raw_files(tmp_path, [1, "", 3], "csv"), cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.data["train"]["id"] == ["1", "train-1", "3"]


def test_a_row_number_name_that_is_another_rows_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"rows \[0\] have no id .* \['train-0'\] are ids of other rows"):
        RedditTLDRDataModule(data_files=raw_files(tmp_path, [None, "train-0"]), cache_dir=str(tmp_path)).setup("fit")


def test_ids_of_mixed_json_types_are_read_as_decoded(tmp_path):
    # datasets stores a column of mixed JSON types as JSON text: the stored "a" reads '"a"'
    dm = RedditTLDRDataModule(data_files=raw_files(tmp_path, ["a", 7, None]), cache_dir=str(tmp_path))
    dm.setup("fit")
    assert dm.data["train"]["id"] == ["a", "7", "train-2"]


@pytest.mark.parametrize("arg", ["shuffle_before_subsample", "drop_last"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_a_flag_that_is_not_a_bool_is_refused(arg, value):
    # the string "false" is true: drop_last="false" dropped the last batch, shuffle_before_subsample="false" shuffled
    with pytest.raises(ValueError, match=rf"{arg} must be true or false, got {value!r}"):
        SyntheticTLDRDataModule(**{arg: value})
