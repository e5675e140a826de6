"""Files written through clp_lightning.files are atomic and durable: the data and the rename are both fsync'ed."""

import os
import stat

import pytest

from clp_lightning.files import write_text_atomic


@pytest.mark.skipif(os.name != "posix", reason="directories are fsync'ed on POSIX only")
def test_write_text_atomic_fsyncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def recording_replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    write_text_atomic(path, "old\nnew\n")
    # a crash leaves the old file or the complete new one, never an empty one (metrics.csv holds the run's history)
    assert events == ["file", "rename", "directory"]
    assert path.read_text() == "old\nnew\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


@pytest.mark.skipif(os.name != "posix", reason="reads a descriptor's access mode with fcntl")
def test_write_text_atomic_fsyncs_the_data_through_a_writable_descriptor(tmp_path, monkeypatch):
    """Windows' fsync (FlushFileBuffers) fails with EBADF on a file opened read-only: every atomic write would fail."""
    import errno
    import fcntl

    real_fsync = os.fsync

    def windows_like_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_like_fsync)
    write_text_atomic(tmp_path / "report.json", "{}\n")
    assert (tmp_path / "report.json").read_text() == "{}\n"


def _directory_fsync_fails_with(monkeypatch, code: int) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(os.name != "posix", reason="directories are fsync'ed on POSIX only")
@pytest.mark.parametrize("code", ["EINVAL", "ENOTSUP", "EOPNOTSUPP", "EBADF"])
def test_a_file_system_that_refuses_to_fsync_a_directory_does_not_fail_the_write(tmp_path, monkeypatch, code):
    """Some network file systems (and FUSE mounts) refuse fsync on a directory; the rename has already happened, so
    the checkpoint is in place and the write must not fail (SafeCheckpointIO would report it as 'could not write')."""
    import errno

    from clp_lightning.callbacks import SafeCheckpointIO

    _directory_fsync_fails_with(monkeypatch, getattr(errno, code))
    write_text_atomic(tmp_path / "report.json", "{}\n")
    assert (tmp_path / "report.json").read_text() == "{}\n"
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "report.json"]


@pytest.mark.skipif(os.name != "posix", reason="directories are fsync'ed on POSIX only")
def test_an_io_error_when_fsyncing_the_directory_is_raised(tmp_path, monkeypatch):
    """EIO means the rename may not be on disk: that is reported, not swallowed."""
    import errno

    _directory_fsync_fails_with(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as raised:
        write_text_atomic(tmp_path / "report.json", "{}\n")
    assert raised.value.errno == errno.EIO


@pytest.mark.skipif(os.name != "posix", reason="directories are fsync'ed on POSIX only")
def test_publish_fsyncs_every_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, fsync_events):
    """publish (the warm-start model, exports) renamed a directory of files that save_pretrained never fsync'ed: after
    a crash the published directory could hold a config.json beside empty weights, and load as a finished model."""
    from clp_lightning.files import publish

    tmp = tmp_path / ".model.tmp"
    (tmp / "sub").mkdir(parents=True)
    for name in ["config.json", "model.safetensors", "sub/tokenizer.json"]:
        (tmp / name).write_text(name)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("old")
    events, real_replace = fsync_events, os.replace

    def recording_replace(src, dst) -> None:
        events.append(("rename", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    files = {(tmp / name).stat().st_ino for name in ["config.json", "model.safetensors", "sub/tokenizer.json"]}
    tmp_ino = tmp.stat().st_ino
    publish(tmp, tmp_path / "model")
    published = events.index(("rename", tmp_ino))
    assert files <= {ino for kind, ino in events[:published] if kind == "file"}  # the data, before the rename
    assert ("directory", tmp_ino) in events[:published]
    assert ("directory", tmp_path.stat().st_ino) in events[published:]  # the rename itself, after it
    assert (tmp_path / "model" / "model.safetensors").read_text() == "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
