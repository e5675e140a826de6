"""Shared logic of the summarisation data modules: loading, validation, skip accounting, loaders.

Every data module yields batches in one vocabulary (``BATCH_KEYS``), as plain lists of strings:

- ``prompt``: the exact text the policy is conditioned on (before any weighting prefix);
- ``source``: the raw post / article, for factuality and relevance rewards;
- ``reference``: the human summary, stripped;
- ``id``: a stable example id (``"{split}-{row}"`` where the dataset has none).

No tokenisation happens here: the policy owns its tokenizer and its prompt conditioning.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger("clp_lightning.data")

BATCH_KEYS = ("prompt", "source", "reference", "id")
_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
_SKIP = "skip"  # per-row skip reason ("" = keep), removed once counted

# File extension -> `datasets` packaged builder; compressed files are named by their inner extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
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
    partial = re.search(r"\s\S*$", cut)
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


class SummarizationDataModule(L.LightningDataModule):
    """Base data module: loads splits with ``datasets.load_dataset``, validates them and converts each row once.

    Subclasses define the schema: ``_schema`` (the required columns and the options of ``convert_row``, given the
    columns found) and the static ``convert_row`` (one raw row -> the batch contract plus a skip reason).

    Args:
        path: Hugging Face hub id, or a local directory of data files (split names taken from the file names).
            Ignored when ``data_files`` is given.
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
        for arg, value in [("batch_size", batch_size), ("val_batch_size", val_batch_size)]:
            if value is not None and value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
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
    def _load_kwargs(self) -> dict[str, Any]:
        """``load_dataset`` arguments, after checking that local files exist (datasets' own errors are vague)."""
        if self.data_files is not None:
            flat = [f for value in self.data_files.values() for f in _as_list(value)]
            for file in flat:
                if not any(c in file for c in "*?[") and "://" not in file and not Path(file).is_file():
                    raise FileNotFoundError(f"Data file not found: {file!r}")
            return {"path": builder_for(flat), "data_files": dict(self.data_files), "cache_dir": self.cache_dir}
        path = Path(self.path).expanduser()
        looks_local = self.path.startswith((".", "/", "~")) or path.suffix.lower() in _BUILDERS
        if looks_local and not path.is_dir():  # otherwise datasets would look the name up on the hub
            raise FileNotFoundError(f"Dataset directory not found: {self.path!r} (use `data_files` for single files)")
        return {"path": str(path) if path.is_dir() else self.path, "name": self.name, "cache_dir": self.cache_dir}

    def _load_split(self, split: str) -> datasets.Dataset:
        """Load one split as a ``datasets.Dataset`` (overridden by in-memory data modules)."""
        kwargs = self._load_kwargs()
        if self.data_files is not None:
            if split not in self.data_files:
                raise ValueError(f"Split {split!r} is not in data_files (has {sorted(self.data_files)})")
            files = _as_list(self.data_files[split])
            if all(Path(f).is_file() and Path(f).stat().st_size == 0 for f in files):
                raise ValueError(f"Split {split!r} is empty: {files} has no rows")  # datasets raises StopIteration
            # One split per call: reads only this split's files, and splits need not share one schema.
            kwargs["data_files"] = {split: self.data_files[split]}
        try:
            return datasets.load_dataset(**kwargs, split=split)
        except Exception as err:
            if self.data_files is None and not Path(kwargs["path"]).is_dir():
                raise  # hub errors (unknown split, network) are already specific
            source = self.data_files[split] if self.data_files is not None else self.path
            # datasets wraps the parser's error in a generic DatasetGenerationError: report the parser's.
            raise ValueError(f"Could not read split {split!r} from {source!r}: {err.__cause__ or err!r}") from err

    def prepare_data(self) -> None:
        # Runs on one process only: download / cache every split, assign no state.
        datasets.load_dataset(**self._load_kwargs())

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
        if "id" not in columns:  # added before capping so that ids stay the original row numbers
            dataset = dataset.add_column("id", [f"{split}-{i}" for i in range(len(dataset))])
        dataset = self._subsample(dataset, self.max_samples[role])
        dataset = dataset.map(
            self.convert_row,
            fn_kwargs=options,
            remove_columns=dataset.column_names,
            desc=f"Formatting {split}",
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

    def _subsample(self, dataset: datasets.Dataset, n: int | None) -> datasets.Dataset:
        if n is None or n >= len(dataset):
            return dataset
        if self.shuffle_before_subsample:
            indices = np.random.default_rng(self.seed).permutation(len(dataset))[:n]
            return dataset.select(sorted(indices.tolist()))
        return dataset.select(range(n))

    # ----------------------------------------------------------------------------------------- loaders
    def _loader(self, role: str, **kwargs: Any) -> DataLoader:
        if role not in self.data:
            raise RuntimeError(f"No {role!r} data: call setup() for the matching stage first")
        return DataLoader(self.data[role], num_workers=self.num_workers, collate_fn=collate_prompts, **kwargs)

    def train_dataloader(self) -> DataLoader:
        # The order of each epoch is a function of (seed, epoch), and a run resumed mid-epoch skips the batches
        # already trained on (see state_dict). Under DDP the sampler shards itself across ranks.
        self._sampler = ResumableShuffleSampler(len(self.data["train"]), self.seed)
        if self._resume is not None:
            self._sampler.resume(self._resume["epoch"], self._resume["samples_done"])
            self._resume = None
        return self._loader("train", batch_size=self.batch_size, sampler=self._sampler, drop_last=self.drop_last)

    _resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where the training epoch stands (saved in checkpoints, so that a resumed run continues the epoch)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":  # also for checkpoints written at validation end
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "samples_done": batches * self.batch_size * trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict else None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", batch_size=self.val_batch_size)


class ResumableShuffleSampler(DistributedSampler):
    """A seeded permutation per epoch (``seed + epoch``) that can start part-way into an epoch, sharded over ranks.

    It shards by itself (rank ``r`` of ``W`` takes every ``W``-th index), after skipping what the interrupted run
    had already trained on, so the skip is the same on every rank. Being a ``DistributedSampler``, Lightning uses
    it as it is under DDP instead of wrapping it. Its length is a full epoch's; a resumed epoch ends early, when
    its shorter iterator is exhausted.
    """

    def __init__(self, size: int, seed: int = 0) -> None:  # no super().__init__: it needs a dataset and a group
        self.size, self.seed, self.epoch = size, seed, 0
        self._skip_epoch, self._skip = -1, 0

    @staticmethod
    def _layout() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        """Skip the first ``samples_done`` indices (over all ranks) of ``epoch``, trained on before the stop."""
        self._skip_epoch, self._skip = epoch, samples_done

    def __iter__(self):
        rank, world = self._layout()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: (-len(order)) % world]  # pad so that every rank gets as many indices
        if self.epoch == self._skip_epoch:
            order, self._skip_epoch = order[self._skip :], -1
        return iter(order[rank::world])

    def __len__(self) -> int:
        return -(-self.size // self._layout()[1])
