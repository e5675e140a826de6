"""SafeCheckpointIO's writes are durable: the file's data and the rename that puts it in place are both fsync'ed."""

import os
import stat

import pytest

from clp_lightning.callbacks import SafeCheckpointIO


@pytest.mark.skipif(os.name != "posix", reason="directories are fsync'ed on POSIX only")
def test_the_rename_is_fsynced_with_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    # the data before the rename, then the directory entry after it: a crash leaves the old or the new file
    assert synced == ["file", "directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
