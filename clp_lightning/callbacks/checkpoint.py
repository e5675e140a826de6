"""Checkpoint I/O: atomic writes (temporary file, then rename), ``weights_only=True`` loads, and errors that say what
a bad file is not.

Every checkpoint the project reads goes through :func:`read_checkpoint` (the trainer's ``--ckpt_path``, ``clp steer``,
Rewarded Soups' expert checkpoints), so a fix to how files are checked lands everywhere at once.
"""

from __future__ import annotations

import pickle
import re
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from clp_lightning.config import plain
from clp_lightning.files import write_atomic

# torch.save writes a zip archive; its first bytes are a local file header
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one this project can load; the message says what it is not."""


# version of the ``clp`` section of checkpoints (what the weights depend on); raise it when its meaning changes
# 2: conditioning as ``mode`` + resolved ``options``; 1 named the built-in modes by ``targets`` / ``lora`` fields
CHECKPOINT_FORMAT = 2


def _conditioning_from_format_1(old: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``conditioning`` record in format 2's terms: ``targets: X`` was ``mode: mixing`` with ``{targets:
    X}``, ``lora: {...}`` was ``mode: lora`` with the same (complete) fields, neither was ``mode: none``. The weights'
    names did not change, so a format-1 checkpoint loads under the equivalent format-2 config."""
    new = {k: v for k, v in old.items() if k not in ("targets", "lora")}
    if old.get("targets") is not None:
        new["mode"], new["options"] = "mixing", {"targets": old["targets"]}
    elif old.get("lora") is not None:
        new["mode"], new["options"] = "lora", old["lora"]
    elif old.get("mode") is None:
        new["mode"], new["options"] = "none", {}
    else:
        new["options"] = old.get("options") or {}
    return new


def check_setup(stored: Any, current: dict[str, Any], name: str) -> None:
    """Refuse a checkpoint whose weights depend on other objectives, conditioning or base model than the config's.

    Args:
        stored: the checkpoint's ``clp`` section (what its weights depend on, as ``CLPModule`` wrote it).
        current: the same record of the module built from the config.
        name: the checkpoint in error messages.

    Raises:
        CheckpointError: not a CLPModule checkpoint, written by a newer version, or trained with another setup (the
            message names the fields that differ).
    """
    if not isinstance(stored, dict):
        raise CheckpointError(f"{name} was not written by CLPModule (it has no 'clp' section); a warm-start (SFT) "
                              "checkpoint is loaded through policy.model_name_or_path, not --ckpt_path")
    version = stored.get("format", 1)
    if type(version) is not int:  # untrusted content: a string here would fail the comparison with a TypeError
        raise CheckpointError(f"{name} has checkpoint format {version!r}; expected an integer (clp writes "
                              f"{CHECKPOINT_FORMAT})")
    if version < 1:  # no clp wrote it: read as the current format, its fields would be trusted as that format's
        raise CheckpointError(f"{name} has checkpoint format {version}; clp writes formats 1 to {CHECKPOINT_FORMAT}")
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{name} was written by a newer clp-lightning (checkpoint format "
                              f"{version}; this version reads format {CHECKPOINT_FORMAT}): upgrade")
    if version == 1 and isinstance(stored.get("conditioning"), dict):
        stored = {**stored, "conditioning": _conditioning_from_format_1(stored["conditioning"])}
    for key, what in (("objective_names", "objectives"), ("conditioning", "conditioning"),
                      ("base_model", "base model")):
        saved, configured = plain(stored.get(key)), plain(current[key])
        if key in stored and saved != configured:
            if isinstance(saved, dict) and isinstance(configured, dict):  # name only the fields that differ
                fields = sorted(k for k in saved.keys() | configured.keys() if saved.get(k) != configured.get(k))
                saved, configured = ({k: d.get(k) for k in fields} for d in (saved, configured))
            raise CheckpointError(f"{name} was trained with {what} {saved}, the config has {configured}: "
                                  "load it with the config it was trained with")


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects, with a clear error for a file that is not one.

    Args:
        path: a file written by ``torch.save`` (Lightning's ``.ckpt``).
        map_location: passed to ``torch.load``.
        mmap: map the tensors' storage instead of reading it (for a caller that reads only the plain values).

    Returns:
        The checkpoint dictionary; it has a ``state_dict``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not a torch zip archive, truncated or corrupt, objects that ``weights_only`` refuses, or no
            ``state_dict``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: torch.save writes a zip archive, and this file "
                              f"starts with {head!r} ({path.stat().st_size} bytes)")
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # is_zipfile lets some damaged indexes through as this error
        is_zip = False
    if not is_zip:
        raise CheckpointError(f"{str(path)!r} is truncated or corrupt: it starts like a checkpoint but its zip index "
                              f"is missing ({path.stat().st_size} bytes; was the write interrupted?)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{str(path)!r} holds objects that weights_only loading refuses ({_first_line(err)}); "
                              "checkpoints written by clp hold only tensors and plain values") from None
    except (OSError, MemoryError):  # the file could not be read, which says nothing about what it holds
        raise
    except Exception as err:
        # damaged bytes fail the zip reader and the unpickler in many ways (RuntimeError, EOFError, BadZipFile,
        # UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError, ...)
        raise CheckpointError(f"{str(path)!r} is truncated or corrupt: {_first_line(err)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        # keys as text: a dict of mixed key types (1, "a") cannot be sorted as it is
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint: it has no 'state_dict' (found {found})")
    return checkpoint


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when it has none (``EOFError()``)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def policy_state(path: str | Path, checkpoint: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The policy's model parameters from a CLPModule checkpoint (read with :func:`read_checkpoint`, unless the caller
    passes it already read as ``checkpoint``), named as in the model (Rewarded Soups loads its experts' from these)."""
    prefix = "policy.model."
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def check_expert(checkpoint: dict[str, Any], index: int, num_objectives: int, name: str) -> None:
    """Refuse Rewarded Soups' expert ``index`` when its checkpoint records training at a fixed weighting other than
    ``e_index``: its copy ``index`` would be the untrained starting point (the experts given in another order).

    Only compares (the recorded sampler is never applied); a checkpoint that records no fixed weighting passes.

    Raises:
        CheckpointError: naming ``name``, the weighting it was trained at and the one expected.
    """
    sampler = (checkpoint.get("hyper_parameters") or {}).get("sampler")
    if not isinstance(sampler, dict):
        return
    trained, stored_index = None, sampler.get("index")
    if sampler.get("kind") == "one_hot" and type(stored_index) is int and 0 <= stored_index < num_objectives:
        trained = [1.0 if i == stored_index else 0.0 for i in range(num_objectives)]
    elif sampler.get("kind") == "fixed" and isinstance(sampler.get("weights"), (list, tuple)):
        trained = list(sampler["weights"])
    expected = [1.0 if i == index else 0.0 for i in range(num_objectives)]
    if trained is not None and trained != expected:
        raise CheckpointError(f"{name} was trained at the weighting {trained}, and expert_checkpoints[{index}] must be "
                              f"the expert of objective {index}, trained at {expected}: list the experts in objective "
                              "order")


def check_writable(directory: str | Path, what: str = "checkpoint directory", hint: str | None = None) -> None:
    """Fail now, not after hours of training, if files cannot be created in ``directory`` (created if missing).

    Probes by creating a file, since permission bits say nothing for root or on a read-only mount. ``hint`` says how
    to choose another directory when neither a flag at the start of ``what`` nor the run's directories do.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".clp-write-check-"):
            pass
    except OSError as err:
        # a tool's flag (`--output directory`) names the flag to change; a run's directories come from its config
        flag = re.match(r"--[\w-]+", what)
        if hint is None:
            hint = flag.group() if flag else "with --trainer.default_root_dir or the checkpoint callback's dirpath"
        raise PermissionError(f"{what} {str(directory)!r} is not writable ({err.strerror or err}); choose another "
                              f"{hint}") from None


def check_output_file(path: str | Path, flag: str, kind: str) -> None:
    """Fail before the work, not after it, when the file a tool's ``flag`` names cannot be written: a directory there,
    or a parent that cannot be written (created if missing).

    Raises:
        IsADirectoryError: ``path`` is a directory.
        PermissionError: its parent cannot be written (:func:`check_writable`).
    """
    if Path(path).is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a directory; name the {kind} file to write")
    check_writable(Path(path).resolve().parent, f"{flag} directory")


class SafeCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file beside the target and rename it into place; load through
    :func:`read_checkpoint`.

    The temporary file's name (``.clp-partial-<random>.tmp``) holds nothing of the target's: a write killed midway
    (SIGKILL at the end of a SLURM grace period) leaves a file that neither ``--ckpt_path last`` (``last*.ckpt``) nor
    Lightning's SLURM resume (any name containing ``hpc_ckpt_``, numbered by the digits after it) takes for a
    checkpoint. Any other interruption (an error, a second Ctrl+C) removes it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def save(tmp: Path) -> None:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)

        try:  # readers see the old file or the complete new one, and the rename survives a node crash
            write_atomic(path, save, tmp=path.parent / f".clp-partial-{uuid.uuid4().hex}.tmp")
        except (OSError, RuntimeError) as err:
            # torch reports a failed write as "[enforce fail at inline_container.cc...]"; say which file and why
            raise OSError(f"could not write checkpoint {str(path)!r} (disk full or file size limit?): "
                          f"{str(err).splitlines()[0]}; the previous checkpoint, if any, is unchanged") from err

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = True) -> dict:
        return read_checkpoint(path, map_location=map_location or "cpu")


def install_safe_checkpoint_io(strategy: Any) -> None:
    """Make ``strategy`` write and read checkpoints through :class:`SafeCheckpointIO` where it would use Lightning's
    plain ``TorchCheckpointIO``: as its checkpoint IO, or as the one a wrapper (``AsyncCheckpointIO``, which writes
    in a thread through the IO it wraps) delegates to. A checkpoint IO of another class was chosen on purpose and
    is kept."""
    io = strategy.checkpoint_io  # the strategy gives a wrapper without an inner IO a TorchCheckpointIO here
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
        return
    wrapper = None
    while isinstance(io, _WrappingCheckpointIO):
        wrapper, io = io, io.checkpoint_io
    if wrapper is not None and (io is None or type(io) is TorchCheckpointIO):
        # the wrapper's public setter keeps an inner IO once one is set; this one is Lightning's default
        wrapper._checkpoint_io = SafeCheckpointIO()
