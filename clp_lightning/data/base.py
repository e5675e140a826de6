"""Shared logic of the summarisation data modules: loading, validation, skip accounting, loaders.

Every data module yields batches in one vocabulary (``BATCH_KEYS``), as plain lists of strings:

- ``prompt``: the exact text the policy is conditioned on (before any weighting prefix);
- ``source``: the raw post / article, for factuality and relevance rewards;
- ``reference``: the human summary, stripped;
- ``id``: a stable example id (``"{split}-{row}"`` where the dataset, or the row, has none).

No tokenisation happens here: the policy owns its tokenizer and its prompt conditioning.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from clp_lightning.checks import is_integer
from clp_lightning.models import split_revision

log = logging.getLogger("clp_lightning.data")

BATCH_KEYS = ("prompt", "source", "reference", "id")
_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
_SKIP = "skip"  # per-row skip reason ("" = keep), removed once counted

# File extension -> `datasets` packaged builder; compressed files are named by their inner extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# local data files this process has checked, by (path, size, mtime): a changed file is checked again
_CHECKED_FILES: set[tuple[str, int | None, int | None]] = set()
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def collate_prompts(rows: Sequence[dict[str, str]]) -> dict[str, list[str]]:
    """Collate contract rows into a batch of plain lists (module level so that worker processes can pickle it)."""
    return {key: [row[key] for row in rows] for key in BATCH_KEYS}


def clean_text(value: Any, field: str) -> tuple[str, str]:
    """Return ``(stripped_text, skip_reason)``; the reason is ``""`` when the value is usable text."""
    if value is None:
        return "", f"missing {field}"
    if not isinstance(value, str):
        return "", f"non-string {field}"
    value = value.strip()
    return value, "" if value else f"empty {field}"


def truncate_words(text: str, max_chars: int | None, marker: str = "...") -> str:
    """Shorten ``text`` to at most ``max_chars`` characters, cutting at a word boundary and appending ``marker``.

    A single word longer than the budget is cut mid-word (there is no boundary to cut at).
    """
    if max_chars is None or len(text) <= max_chars:
        return text
    budget = max(max_chars - len(marker), 0)
    cut = text[:budget]
    partial = re.search(r"\s\S*\Z", cut)  # \Z: "$" also matches before a final newline
    if not text[budget].isspace() and partial:  # the cut falls inside a word: drop that word
        cut = cut[: partial.start()]
    return cut.rstrip() + marker


def skip_row(reason: str) -> dict[str, str]:
    """A placeholder row that carries only its skip reason (every column stays a string for Arrow)."""
    return {**dict.fromkeys(BATCH_KEYS, ""), _SKIP: reason}


def _as_list(files: str | Sequence[str]) -> list[str]:
    return [files] if isinstance(files, str) else list(files)


def builder_for(files: Sequence[str]) -> str:
    """The ``datasets`` builder (``json``, ``parquet``, ``csv``) for data files, inferred from their extensions."""
    builders = set()
    for file in files:
        suffixes = [s for s in Path(file).suffixes if s.lower() not in _COMPRESSION]
        ext = suffixes[-1].lower() if suffixes else ""
        if ext not in _BUILDERS:
            raise ValueError(f"Cannot infer the file format of {file!r}: expected one of {sorted(_BUILDERS)}")
        builders.add(_BUILDERS[ext])
    if len(builders) != 1:
        raise ValueError(f"Data files mix formats {sorted(builders)}: {list(files)}")
    return builders.pop()


def check_data_file(file: str, split: str) -> None:
    """Raise a ``ValueError`` naming ``file`` and ``split`` (and the line) if its rows could not be read.

    One cheap pass before ``datasets`` builds its cache. Otherwise an empty file raises a bare ``StopIteration``,
    a blank one ``Instruction "train" corresponds to no data!``, a non-UTF-8 one a ``UnicodeDecodeError``, a bad
    row a generic ``DatasetGenerationError``: none names the file or the row, and some bad rows load silently.

    Checked: the text is UTF-8; JSON holds one object per line (JSON Lines) or is one document (an array of
    objects, or one object); a CSV row has no more fields than the header; a Parquet footer is readable; there
    are rows. Values are not checked: a row with a missing or non-string field is skipped and counted by
    ``convert_row``, as the data module's policy is. Compressed and remote files, and other formats, are left to
    ``datasets`` (whose errors ``SummarizationDataModule`` re-raises with the split's files named).
    """
    path = Path(file)
    suffixes = [s.lower() for s in path.suffixes]
    if not path.is_file() or not suffixes or suffixes[-1] not in _BUILDERS:  # compressed, remote, other formats
        return
    where, fmt, rows = f"Data file {file!r} (split {split!r})", _BUILDERS[suffixes[-1]], 0
    if fmt == "parquet":
        try:  # reads the footer only
            rows = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as err:
            raise ValueError(f"{where} is not a readable Parquet file: {err}") from None
    elif fmt == "csv":
        reader, header = csv.reader(line for _, line in _utf8_lines(path, where)), None
        limit = csv.field_size_limit(2**31 - 1)  # 128 KiB per field is the csv module's limit, not pandas'
        try:
            for fields in reader:
                if not fields:  # a blank line, which pandas skips
                    continue
                if header is None:
                    header = fields
                elif len(fields) > len(header):  # fewer are padded with nulls: skipped later as missing values
                    raise ValueError(f"{where}, line {reader.line_num}: {len(fields)} fields, expected at most "
                                     f"{len(header)} (the header: {header})")
                else:
                    rows += 1
        except csv.Error as err:
            raise ValueError(f"{where}, line {reader.line_num}: not valid CSV ({err})") from None
        finally:
            csv.field_size_limit(limit)
    else:
        lines = _utf8_lines(path, where)
        for number, line in lines:
            text = line.strip()
            if not text:  # blank lines are not rows (datasets skips them too)
                continue
            if rows == 0 and text.startswith("["):  # one JSON array, as datasets reads it
                try:
                    rows = _json_document_rows(line + "".join(rest for _, rest in lines), number)
                except ValueError as err:
                    raise ValueError(f"{where}, {err}") from None
                break
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                message = f"{where}, line {number}, column {err.colno}: not valid JSON ({err.msg})"
                if rows > 0:
                    raise ValueError(f"{message}; expected one JSON object per line") from None
                try:  # the first row: the file may be one JSON object over many lines, which datasets reads too
                    rows = _json_document_rows(line + "".join(rest for _, rest in lines), number)
                    break
                except ValueError as doc_err:
                    raise ValueError(f"{message}; expected one JSON object per line, and as one JSON document "
                                     f"the file fails at {doc_err}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}, line {number}: {_clip(text)} is not a JSON object (one row per line)")
            rows += 1
    if rows == 0:
        raise ValueError(f"{where} has no rows")


def _utf8_lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of a UTF-8 text file (a leading BOM dropped), naming the first undecodable byte."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):  # b"\n" never occurs inside a multi-byte UTF-8 character
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where} is not UTF-8, the expected encoding: line {number}, byte offset {offset + err.start} "
                    f"({raw[err.start:err.end]!r}: {err.reason}); re-encode it, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            offset += len(raw)
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _json_document_rows(text: str, first_line: int) -> int:
    """Rows of one JSON document that starts on line ``first_line``: an array of objects, or one object.

    Raises ``ValueError`` with the line (in the file), to be prefixed with the file's name.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        line = err.lineno + first_line - 1
        raise ValueError(f"line {line}, column {err.colno}: not valid JSON ({err.msg})") from None
    if isinstance(document, dict):  # columns ({"prompt": [...], ...}) or one row: datasets reads both
        return len(document)
    for index, row in enumerate(document):  # a list: the document started with "["
        if not isinstance(row, dict):
            raise ValueError(f"line {first_line}: element {index} of the JSON array, {_clip(json.dumps(row))}, is "
                             f"not a JSON object (one row)")
    return len(document)


def data_file_columns(file: str) -> set[str] | None:
    """The columns ``datasets`` will find in a local data file, read from its header or rows without loading it;
    None for a file this cannot read (compressed, remote, another format). Call after :func:`check_data_file`.

    JSON: the keys of every row (JSON Lines or an array of objects; a column-oriented object's keys).
    """
    path = Path(file)
    suffixes = [s.lower() for s in path.suffixes]
    if not path.is_file() or not suffixes or suffixes[-1] not in _BUILDERS:
        return None
    fmt = _BUILDERS[suffixes[-1]]
    if fmt == "parquet":
        return set(pq.read_schema(path).names)
    lines = (line for _, line in _utf8_lines(path, repr(file)))
    if fmt == "csv":
        return set(next((fields for fields in csv.reader(lines) if fields), []))
    # JSON Lines are read a row at a time (a training file can be gigabytes); a file whose first line is not a
    # whole object is one JSON document (an array of rows, or an object over several lines), parsed whole.
    rows = (line for line in lines if line.strip())
    first = next(rows, None)
    if first is None:
        return set()
    if first.lstrip().startswith("{"):
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            keys = set(row)
            for line in rows:
                keys.update(json.loads(line))
            return keys
    document = json.loads("".join(line for _, line in _utf8_lines(path, repr(file))))
    if isinstance(document, dict):
        return set(document)
    return {key for row in document for key in row}


def _fill_ids(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """``dataset`` with a row whose ``id`` is null named ``"{split}-{row}"``, as a dataset without ids names every
    row; ``str(None)`` had given all such rows the one id ``"None"``. Float ids that are whole numbers are written
    as integers: a CSV integer column with an empty cell is read as floats, whose ids had read ``"1.0"``.

    Raises:
        ValueError: a name given to a row without an id is another row's id.
    """
    column = dataset.select_columns(["id"])
    ids = column.with_format("arrow")[:]["id"]
    plain = pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_integer(ids.type)
    if plain and not ids.null_count:  # the common case, seen without reading the ids into Python
        return dataset
    # decoded as convert_row sees them (a column of mixed JSON types is stored as JSON text)
    values = [None if v is None or v != v else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
              for v in column["id"]]
    rows = [i for i, v in enumerate(values) if v is None]
    named = {i: f"{split}-{i}" for i in rows}
    taken = set(values) & set(named.values())
    if taken:
        raise ValueError(f"Split {split!r}: rows {rows[:5]} have no id and would be named by their row number, but "
                         f"{sorted(taken)[:5]} are ids of other rows; give every row an id")
    if rows:
        log.warning("Split %r: %d rows have no id (rows %s); named %r + their row number", split, len(rows),
                    rows[:5], f"{split}-")
    return dataset.remove_columns("id").add_column("id", [named.get(i, v) for i, v in enumerate(values)])


def _clip(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


class SummarizationDataModule(L.LightningDataModule):
    """Base data module: loads splits with ``datasets.load_dataset``, validates them and converts each row once.

    Subclasses define the schema: ``_schema`` (the required columns and the options of ``convert_row``, given the
    columns found) and the static ``convert_row`` (one raw row -> the batch contract plus a skip reason).

    Args:
        path: Hugging Face hub id (``owner/name@revision`` pins a branch, tag or commit hash), or a local directory
            of data files (split names taken from the file names). Ignored when ``data_files`` is given.
        name: Dataset configuration name on the hub (e.g. ``"3.0.0"`` for CNN/DailyMail).
        data_files: Local files per split, e.g. ``{"train": "train.jsonl", "validation": "val.jsonl"}``; the
            format (json / jsonl / parquet / csv) is inferred from the extension. Overrides ``path``.
        train_split: Split used for training.
        val_split: Split used for validation.
        test_split: Split used by ``trainer.test``.
        predict_split: Split used by ``trainer.predict``; ``None`` means ``test_split``.
        max_train_samples: Keep only the first N training rows (after the optional shuffle below); ``None`` keeps
            all. Rows are capped before skipping, so a few skipped rows leave fewer than N.
        max_val_samples: Same cap for the validation split.
        max_test_samples: Same cap for the test and predict splits.
        shuffle_before_subsample: Draw the capped rows at random (seeded) instead of taking the first N.
        batch_size: Prompts per training step (per device).
        val_batch_size: Prompts per validation / test / predict batch; ``None`` means ``batch_size``.
        num_workers: DataLoader worker processes.
        drop_last: Drop the last incomplete training batch, so every step sees ``batch_size`` prompts.
        seed: Seed of the training shuffle and of the subsampling.
        cache_dir: Where ``datasets`` caches downloads and processed files; ``None`` uses its default.
    """

    def __init__(
        self,
        path: str | None = None,
        name: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        predict_split: str | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        shuffle_before_subsample: bool = False,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if path is None and data_files is None:
            raise ValueError("Give a dataset `path` (hub id or directory) or `data_files`")
        # Integers, checked here: a float passed `>= 1` and failed only after the splits were loaded (in select()
        # for a cap, in the DataLoader for a batch size), a negative seed in the subsampling's generator.
        for arg, value in [("batch_size", batch_size), ("val_batch_size", val_batch_size)]:
            if value is not None and not (is_integer(value) and value >= 1):
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        caps = [("max_train_samples", max_train_samples), ("max_val_samples", max_val_samples),
                ("max_test_samples", max_test_samples)]
        for arg, value in caps:
            if value is not None and not (is_integer(value) and value >= 1):  # a cap of 0 rows fails after loading
                raise ValueError(f"{arg} must be an integer >= 1 (or null for no limit), got {value!r}")
        for arg, value in [("num_workers", num_workers), ("seed", seed)]:
            if not (is_integer(value) and value >= 0):
                raise ValueError(f"{arg} must be an integer >= 0, got {value!r}")
        for arg, value in [("shuffle_before_subsample", shuffle_before_subsample), ("drop_last", drop_last)]:
            if not isinstance(value, bool):  # the string "false" is true
                raise ValueError(f"{arg} must be true or false, got {value!r}")
        self.path, self.name, self.data_files, self.cache_dir = path, name, data_files, cache_dir
        self.splits = {
            "train": train_split,
            "val": val_split,
            "test": test_split,
            "predict": predict_split or test_split,
        }
        self.max_samples = {
            "train": max_train_samples,
            "val": max_val_samples,
            "test": max_test_samples,
            "predict": max_test_samples,
        }
        self.shuffle_before_subsample = shuffle_before_subsample
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.seed = seed
        self.data: dict[str, datasets.Dataset] = {}  # by role: train / val / test / predict
        self.skipped: dict[str, dict[str, int]] = {}  # by split name, then reason -> count

    # ----------------------------------------------------------------------------------------- schema hooks
    def _schema(self, columns: list[str], split: str) -> tuple[list[str], dict[str, Any]]:
        """The columns this split must have and the keyword options of ``convert_row``, given its columns."""
        raise NotImplementedError

    @staticmethod
    def convert_row(row: dict[str, Any], **options: Any) -> dict[str, str]:
        """One raw row -> ``BATCH_KEYS`` plus ``"skip"`` (the reason to drop it, ``""`` to keep)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- loading
    def check_files(self, stage: str | None = None) -> None:
        """Check that every local file exists and reads (:func:`check_data_file`), without loading any data; with
        ``stage`` (``"fit"``, ``"validate"``, ...), also that the splits the stage reads are in ``data_files`` and
        that each local split has the columns its schema needs (:func:`data_file_columns`).

        ``clp`` calls this before it builds the model, so a bad file costs no model loading.

        Raises:
            FileNotFoundError: a local file or directory is missing.
            ValueError: a file does not read, a split is missing, or a split lacks a required column.
        """
        kwargs = self._load_kwargs()
        self._check_files(kwargs)
        if stage is None:
            return
        splits = list(dict.fromkeys(self.splits[role] for role in _STAGE_ROLES.get(stage, ())))
        if self.data_files is not None:
            for split in splits:
                if split not in self.data_files:
                    raise ValueError(f"Split {split!r} is not in data_files (has {sorted(self.data_files)})")
        local = self._local_files(kwargs)
        if self.data_files is None and local:  # a local directory, whose files datasets resolved to splits
            # a directory's splits are its files' names (`clp data cnndm-blanc --val-size 0` writes no validation
            # file): a missing one failed only in setup, after the model had loaded
            for split in splits:
                if split not in local:
                    raise ValueError(f"Split {split!r} has no files in the directory {self.path!r} (its splits, "
                                     f"from the file names: {sorted(local)})")
        for split in splits:
            found = [data_file_columns(f) for f in local.get(split, [])]
            if not found or any(columns is None for columns in found):
                continue  # a hub dataset, or files this check cannot read: the load checks them
            columns = sorted(set().union(*found))
            required, _ = self._schema(columns, split)
            for column in required:
                if column not in columns:
                    raise ValueError(f"Column {column!r} is missing from split {split!r}; found columns {columns}")

    def _load_kwargs(self) -> dict[str, Any]:
        """``load_dataset`` arguments, after checking that local files exist (datasets' own errors are vague)."""
        if self.data_files is not None:
            flat = [f for value in self.data_files.values() for f in _as_list(value)]
            for file in flat:
                if "://" in file:
                    continue
                if not any(c in file for c in "*?["):
                    if not Path(file).is_file():
                        raise FileNotFoundError(f"Data file not found: {file!r}")
                elif not glob.glob(file, recursive=True):  # datasets says only StopIteration(), after the model loads
                    raise FileNotFoundError(f"Data file pattern {file!r} matches no file")
            return {"path": builder_for(flat), "data_files": dict(self.data_files), "cache_dir": self.cache_dir}
        path = Path(self.path).expanduser()
        # a hub id is "owner/name"; a relative path whose first folder exists here (data/cnndm_blanc) is local too
        looks_local = (self.path.startswith((".", "/", "~")) or path.suffix.lower() in _BUILDERS
                       or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))
        if looks_local and not path.is_dir():  # otherwise datasets would look the name up on the hub
            raise FileNotFoundError(f"Dataset directory not found: {self.path!r} (use `data_files` for single files)")
        if path.is_dir():
            return {"path": str(path), "name": self.name, "cache_dir": self.cache_dir}
        repo, revision = split_revision(self.path)  # "owner/name@revision" pins the hub dataset's files
        pin = {} if revision is None else {"revision": revision}
        return {"path": repo, "name": self.name, "cache_dir": self.cache_dir, **pin}

    def _local_files(self, kwargs: dict[str, Any]) -> dict[str, list[str]]:
        """Local data files by split (globs expanded), as ``datasets`` will read them; ``{}`` for a hub dataset."""
        if self.data_files is not None:
            local = {}
            for split, names in self.data_files.items():  # a name that matches nothing (a URL) is kept as it is
                local[split] = [f for n in _as_list(names) for f in sorted(glob.glob(n, recursive=True)) or [n]]
            return local
        if not Path(kwargs["path"]).is_dir():
            return {}
        # datasets' own resolution of a directory (split names from file names); reads no data
        builder = self._wrap_errors(lambda: datasets.load_dataset_builder(**kwargs), None)
        return {str(split): list(files) for split, files in (builder.config.data_files or {}).items()}

    def _check_files(self, kwargs: dict[str, Any], splits: Sequence[str] | None = None) -> None:
        """``check_data_file`` on each local file of ``splits`` (all when ``None``), once per file version."""
        for split, files in self._local_files(kwargs).items():
            if splits is not None and split not in splits:
                continue
            for file in files:
                stat = Path(file).stat() if Path(file).is_file() else None
                key = (str(Path(file).resolve()), stat and stat.st_size, stat and stat.st_mtime_ns)
                # the CLI's early check, prepare_data and setup would otherwise each read the file again
                if key not in _CHECKED_FILES:
                    check_data_file(file, split)
                    _CHECKED_FILES.add(key)

    def _wrap_errors(self, load: Callable[[], Any], split: str | None) -> Any:
        """Call ``load()``, re-raising a local source's errors as a ``ValueError`` that names the files."""
        try:
            return load()
        except Exception as err:
            if self.data_files is None and not Path(self.path).expanduser().is_dir():
                raise  # hub errors (unknown split, network) are already specific
            source = self.path if self.data_files is None else (
                self.data_files if split is None else self.data_files[split]
            )
            what = "the data" if split is None else f"split {split!r}"
            hint = ""
            if self.data_files is None and self.name is not None and "BuilderConfig" in str(err):
                # CNNDailyMailDataModule's default name ("3.0.0") is a configuration of the hub dataset
                hint = (f"; name={self.name!r} is a configuration of a hub dataset, which a directory of data files "
                        "does not have: set name to null")
            # datasets wraps the parser's error in a generic DatasetGenerationError: report the parser's.
            raise ValueError(f"Could not read {what} from {source!r}: {err.__cause__ or err!r}{hint}") from err

    def _split_kwargs(self, kwargs: dict[str, Any], split: str) -> dict[str, Any]:
        """``load_dataset`` arguments that read one split of ``data_files``: its files only, so splits need not
        share one schema (``datasets`` casts every split to the first one's columns)."""
        if split not in self.data_files:
            raise ValueError(f"Split {split!r} is not in data_files (has {sorted(self.data_files)})")
        return {**kwargs, "data_files": {split: self.data_files[split]}}

    def _load_split(self, split: str) -> datasets.Dataset:
        """Load one split as a ``datasets.Dataset`` (overridden by in-memory data modules)."""
        kwargs = self._load_kwargs()
        if self.data_files is not None:
            kwargs = self._split_kwargs(kwargs, split)
        self._check_files(kwargs, [split])
        return self._wrap_errors(lambda: datasets.load_dataset(**kwargs, split=split), split)

    def prepare_data(self) -> None:
        # Runs on one process only: download / cache every split, assign no state (the memo of checked files is a
        # shortcut, which other ranks do without). Bad local files fail here, named, before datasets builds a cache.
        kwargs = self._load_kwargs()
        self._check_files(kwargs)
        if self.data_files is None:
            self._wrap_errors(lambda: datasets.load_dataset(**kwargs), None)
            return
        for split in self.data_files:  # as _load_split reads them, so that setup finds this cache
            split_kwargs = self._split_kwargs(kwargs, split)
            self._wrap_errors(lambda: datasets.load_dataset(**split_kwargs, split=split), split)  # noqa: B023

    def setup(self, stage: str | None = None) -> None:
        # Only what the stage needs: a fit never touches the test split.
        for role in _STAGE_ROLES.get(stage, ("train", "val", "test", "predict")):
            if role not in self.data:  # setup runs again for trainer.validate after fit, etc.
                self.data[role] = self._prepare(role)

    def _prepare(self, role: str) -> datasets.Dataset:
        """Load, validate, cap and convert one split to the batch contract, counting and logging skipped rows."""
        split = self.splits[role]
        dataset = self._load_split(split)
        if len(dataset) == 0:
            raise ValueError(f"Split {split!r} is empty")
        columns = list(dataset.column_names)
        required, options = self._schema(columns, split)
        for column in required:
            if column not in columns:
                raise ValueError(f"Column {column!r} is missing from split {split!r}; found columns {columns}")
        # ids are added before capping so that they stay the original row numbers
        if "id" not in columns:
            dataset = dataset.add_column("id", [f"{split}-{i}" for i in range(len(dataset))])
        else:
            dataset = _fill_ids(dataset, split)
        dataset = self._subsample(dataset, self.max_samples[role])
        dataset = dataset.map(
            self.convert_row,
            fn_kwargs=options,
            remove_columns=dataset.column_names,
            desc=f"Formatting {split}",
            new_fingerprint=self._format_fingerprint(dataset, options),
        )
        reasons = list(dataset[_SKIP])
        counts = dict(Counter(r for r in reasons if r))
        self.skipped[split] = counts
        if counts:
            detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
            log.warning("Split %r: skipped %d of %d rows (%s)", split, sum(counts.values()), len(reasons), detail)
            dataset = dataset.select([i for i, reason in enumerate(reasons) if not reason])
        if len(dataset) == 0:
            raise ValueError(f"Split {split!r} has no usable rows (skipped: {counts})")
        log.info("Split %r: %d examples for %s", split, len(dataset), role)
        return dataset.remove_columns(_SKIP)

    def _format_fingerprint(self, dataset: datasets.Dataset, options: dict[str, Any]) -> str:
        """The cache key of ``dataset`` formatted by ``convert_row`` with ``options``.

        ``datasets``' own key hashes ``convert_row``'s code but the functions it calls (``truncate_words``,
        ``format_tldr_prompt``, ...) by their names only, so after an edit to one of them the rows formatted by the
        old code would be read back from the cache. The source files of the data module's classes go in too, beside
        ``convert_row`` itself (a class defined in a notebook has no source file).
        """
        sources = []
        for cls in type(self).__mro__:
            file = getattr(sys.modules.get(cls.__module__), "__file__", None)
            if issubclass(cls, SummarizationDataModule) and file and Path(file).is_file():
                sources.append(Path(file).read_bytes())
        return Hasher.hash([dataset._fingerprint, type(self).__qualname__, self.convert_row, options, sources])

    def _subsample(self, dataset: datasets.Dataset, n: int | None) -> datasets.Dataset:
        if n is None or n >= len(dataset):
            return dataset
        if self.shuffle_before_subsample:
            indices = np.random.default_rng(self.seed).permutation(len(dataset))[:n]
            return dataset.select(sorted(indices.tolist()))
        return dataset.select(range(n))

    # ----------------------------------------------------------------------------------------- loaders
    def _split(self, role: str) -> datasets.Dataset:
        if role not in self.data:
            raise RuntimeError(f"No {role!r} data: call setup() for the matching stage first")
        return self.data[role]

    def _loader(self, role: str, **kwargs: Any) -> DataLoader:
        return DataLoader(self._split(role), num_workers=self.num_workers, collate_fn=collate_prompts, **kwargs)

    def train_dataloader(self) -> DataLoader:
        # The order of each epoch is a function of (seed, epoch), sharded over ranks; the loader's state (saved by
        # Lightning in checkpoints) says how far into its epoch it is, and a resumed run skips what was trained on.
        split = self._split("train")
        sampler = ResumableDistributedSampler(split, *_layout(), seed=self.seed)
        if self.drop_last and len(sampler) < self.batch_size:  # Lightning only warns, and the fit ends at step 0
            raise ValueError(f"the training split has {len(split)} rows, {len(sampler)} per process, fewer than "
                             f"batch_size={self.batch_size} with drop_last: no batch would train; lower batch_size or "
                             "set drop_last to false")
        loader = ResumableDataLoader(split, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last,
                                     num_workers=self.num_workers, collate_fn=collate_prompts)
        if self._resume is not None:  # a checkpoint written before the loader kept its own state
            loader.load_state_dict(self._resume)
            self._resume = None
        return loader

    _resume: dict[str, int] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read the epoch position that checkpoints of earlier versions stored here (now the loader's state)."""
        self._resume = dict(state_dict) if state_dict else None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", batch_size=self.val_batch_size)


def _layout() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableDistributedSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (a seeded permutation per epoch, ``seed + epoch``, padded and sharded over
    ranks) that can start part-way into an epoch.

    Being a ``DistributedSampler``, Lightning uses it as it is under DDP instead of wrapping it. Its length is a full
    epoch's; a resumed epoch ends early, when its shorter iterator is exhausted.
    """

    def __init__(self, dataset: Any, rank: int = 0, num_replicas: int = 1, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip_epoch, self._skip = -1, 0
        self.skipped = 0  # samples (over all ranks) skipped at the start of the current iteration
        # data epoch minus the epoch number the trainer passes to set_epoch (see resume)
        self._offset, self._align = 0, False

    def resume(self, epoch: int, samples_done: int) -> None:
        """Skip the first ``samples_done`` indices (over all ranks) of ``epoch``, trained on before the stop.

        The saved epoch is the data's, whatever number the trainer passes next: restarting from a checkpoint written
        when a fit ended at ``max_steps``, Lightning continues the saved epoch (its ``current_epoch`` and batch
        indices are right) but calls ``set_epoch`` with the next epoch's number. The first ``set_epoch`` after a
        resume therefore fixes the offset between the trainer's count and the data epoch, which later epochs keep.
        An epoch saved complete resumes empty, and the trainer goes on to the next. A position saved by another number
        of processes that this one does not divide (8 ranks resumed on 3) deals the rest of the epoch's order anew,
        padded to a whole round: the same samples are trained on, by other ranks. (A fit that ended at
        ``max_steps`` and is continued with a larger ``max_epochs`` but no ``max_steps`` is another matter: Lightning
        2.6 counts the stopped epoch as finished and starts the next, so the rest of that epoch is not trained on.)
        """
        if not (is_integer(samples_done) and samples_done >= 0 and is_integer(epoch) and epoch >= 0):
            raise ValueError(f"the data loader's saved position (epoch {epoch!r}, samples_done {samples_done!r}) "
                             "is not two integers >= 0")
        self._skip_epoch, self._skip = epoch, samples_done
        self.epoch, self._align = epoch, True

    def set_epoch(self, epoch: int) -> None:
        if self._align:
            self._offset, self._align = self._skip_epoch - epoch, False
        super().set_epoch(epoch + self._offset)

    def __iter__(self) -> Iterator[int]:
        # the global order is dealt round-robin (rank r takes every W-th index), so skipping the first k*W indices
        # of the epoch is skipping the first k of each rank's share
        self.skipped = self._skip if self.epoch == self._skip_epoch else 0
        self._skip_epoch = -1 if self.skipped else self._skip_epoch
        if self.skipped % self.num_replicas == 0:
            return itertools.islice(super().__iter__(), self.skipped // self.num_replicas, None)
        # saved by another number of processes: the rest of the epoch's global order, dealt round-robin again and
        # padded (with its first indices, as torch pads an epoch) so that every rank takes as many batches
        rest = self.epoch_order()[self.skipped :]
        pad = -len(rest) % self.num_replicas
        rest += (rest * (pad // max(len(rest), 1) + 1))[:pad]
        return iter(rest[self.rank :: self.num_replicas])

    def epoch_order(self) -> list[int]:
        """The epoch's global order, which the ranks deal round-robin: torch's seeded permutation (``seed + epoch``)
        without its padding (positions past the rows are taken again from the start by each layout's own padding)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableDistributedSampler` that keeps its place in the epoch.

    It implements Lightning's stateful-dataloader protocol (``state_dict`` / ``load_state_dict``): Lightning saves
    the state in the fit loop's part of every checkpoint and gives it back before a resumed epoch starts. The
    position counts the batches this loader has yielded in the main process (worker prefetching does not count);
    Lightning fetches a sized loader's batch only when it trains on it, so at a checkpoint that is the batches
    trained on.
    """

    sampler: ResumableDistributedSampler

    def __iter__(self) -> Iterator[Any]:
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        done = self.sampler.skipped + getattr(self, "_yielded", 0) * self.batch_size * self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "samples_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume(state_dict["epoch"], state_dict["samples_done"])
