"""Test-wide settings (nothing reaches a model or dataset hub) and fixtures shared across the test packages."""

import os
import stat

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fsync_events(monkeypatch) -> list[tuple[str, int]]:
    """Records every ``os.fsync`` as ``("file" | "directory", inode)``, in order; a test appends its renames to the
    same list to check that data reached the disk before a rename made it visible."""
    events: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("directory" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return events
