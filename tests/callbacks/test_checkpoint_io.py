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


@pytest.mark.parametrize("inner", [None, "lightning.pytorch.plugins.io.TorchCheckpointIO"])
def test_clp_writes_and_reads_through_safe_checkpoint_io_under_async_checkpoint_io(tmp_path, inner):
    """Lightning's AsyncCheckpointIO writes through the checkpoint IO it wraps (a plain TorchCheckpointIO when it is
    given none): a run that chose asynchronous writes must still get atomic writes and weights_only loads."""
    import sys
    from pathlib import Path

    import torch
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli_helpers import write_config

    from clp_lightning.callbacks.checkpoint import CheckpointError
    from clp_lightning.cli import run_cli

    plugin = {"class_path": "lightning.pytorch.plugins.io.AsyncCheckpointIO"}
    if inner is not None:
        plugin["init_args"] = {"checkpoint_io": {"class_path": inner}}
    config = write_config(tmp_path / "config.yaml", default_root_dir=str(tmp_path), plugins=[plugin])
    io = run_cli(["--config", str(config)], run=False).trainer.strategy.checkpoint_io
    assert isinstance(io, AsyncCheckpointIO) and isinstance(io.checkpoint_io, SafeCheckpointIO)

    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    io.teardown()  # waits for the write
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(2))
    torch.save({"state_dict": {}, "code": SafeCheckpointIO}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        io.load_checkpoint(tmp_path / "pickled.ckpt")
