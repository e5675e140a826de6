"""Files and directories written so that a reader never sees half of one: a temporary one beside the target,
renamed into place (a file's data and its rename fsync'ed, so that a crash leaves the old file or the new one)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# what a file system that cannot fsync a directory answers (some network and FUSE file systems); anything else, EIO
# above all, may mean that the rename is not on disk
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable: the file's fsync covers its data, not the directory entry.

    A file system that refuses to fsync a directory is left to make the rename durable by itself (as NFS does on the
    rename's reply): the rename has already happened, so a write must not fail for this."""
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals the rename
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (before a rename makes it visible)."""
    with open(path, "r+b") as f:  # writable: Windows' fsync (FlushFileBuffers) refuses a read-only handle
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (``root`` too), before ``root`` is renamed into place: a
    directory written by another library (``save_pretrained``) is complete on disk once the rename is."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # contents before their folder
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_directory(path)
    fsync_directory(root)


def write_atomic(path: Path, write: Callable[[Path], Any], tmp: Path | None = None) -> None:
    """``write`` a temporary file beside ``path`` (``tmp``, by default ``.<name>.<pid>.tmp``), fsync it, rename it
    over ``path`` and fsync the directory: no half-written file, and after a crash the old file or the new one. The
    temporary file is removed if ``write`` fails or is interrupted."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: that would make it owner-only
    try:
        write(tmp)
        # the data on disk before the rename: after a crash (a node failure that SLURM requeues) the rename may
        # survive without it, and an accumulating file (metrics.csv, run_info.json's "earlier") would lose its history
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it (no half-written file)."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def strict_json(value: Any) -> Any:
    """``value`` with every NaN and infinite float replaced by None (JSON's null), tuples as lists.

    Python writes them as ``NaN`` and ``Infinity``, which JSON does not have: a strict parser (a browser's
    ``JSON.parse``, most other languages' libraries) refuses the whole file. A reward can be NaN (a reward model
    overflowing in half precision), a Spearman correlation of constant values is, and a KL that was not measured is
    recorded as one. Readers take null where a number is expected as NaN (an infinity too: no reader tells them
    apart), :func:`clp_lightning.evaluation.reports.read_report` for grid reports."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_text(value: Any, **kwargs: Any) -> str:
    """``value`` as strict JSON text (:func:`strict_json`): the one way the project writes JSON, a file, a JSONL line or
    an HTTP reply. ``kwargs`` as :func:`json.dumps` takes them (``indent``, ``default``, ...); ``allow_nan=False``
    guards what :func:`strict_json` cannot see (a value that ``default`` turns into a float)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def write_json(path: Path, value: Any, indent: int | None = 2, **kwargs: Any) -> None:
    """Write ``value`` to ``path`` as strict JSON (:func:`json_text`), through a temporary file beside it."""
    write_text_atomic(Path(path), json_text(value, indent=indent, **kwargs) + "\n")


def figure_format(path: Path, what: str = "figure") -> str:
    """The image format a figure at ``path`` is written in, from its extension (``png`` without one); refuses an
    extension matplotlib cannot write, before the figure's work is done."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = path.suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{what} {str(path)!r}: cannot write a figure as {fmt!r}; expected one of the extensions "
                         f"{', '.join('.' + f for f in sorted(supported))}")
    return fmt


def save_figure_atomic(figure: Any, path: Path, **kwargs: Any) -> None:
    """Save a matplotlib ``figure`` (``savefig`` ``kwargs``) to a temporary file beside ``path`` and rename it over
    ``path``, in the format of ``path``'s extension (:func:`figure_format`)."""
    # the format given explicitly: savefig would take it from the temporary name's extension, or append one
    fmt = figure_format(path)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format=fmt, **kwargs))


def publish(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` into place as ``out``, replacing what was there only once ``tmp`` is
    complete (the caller decides what may be replaced), with the permissions of the user's umask. ``out`` may be a
    symbolic link to a directory: that directory is replaced, beside which ``tmp`` must be made
    (``out.resolve().parent``)."""
    # the link itself, moved aside and replaced by tmp, would put the model beside the link and leave the directory
    # it points to (the one a config names through the link, maybe another file system: EXDEV) with the old model
    out = out.resolve()
    # mkdtemp (and safetensors) create owner-only files; an export is for others to read, as under the user's umask
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    # the files' data and their entries on disk before the rename, as write_atomic does for one file: save_pretrained
    # fsyncs nothing, and after a crash the renamed directory could hold a config.json beside empty weights, which
    # loads as a finished model (or fails every later load)
    fsync_tree(tmp)
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        else:
            out.rmdir()
    os.replace(tmp, out)
    fsync_directory(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
