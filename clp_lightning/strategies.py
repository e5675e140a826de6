"""The training strategy of sharded fits (``conf/trainer/fsdp.yaml``); the sharding itself is
:mod:`clp_lightning.sharding`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from clp_lightning.callbacks.checkpoint import CheckpointError, read_checkpoint

# what ModelParallelStrategy writes beside the shards of a distributed checkpoint (a directory): everything else
META_FILE = "meta.pt"


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) that checks a checkpoint against the config before its weights
    load.

    ``ModelParallelStrategy`` loads a checkpoint's weights into the sharded model itself, before the
    LightningModule's ``on_load_checkpoint`` sees the file. Here the module's ``check_checkpoint`` (objectives,
    conditioning, base model: :meth:`clp_lightning.module.CLPModule.check_checkpoint`) runs on the file's plain
    values first, so a mismatched checkpoint stops before any of its tensors are read, as it does under DDP.

    A distributed checkpoint (a directory, ``save_distributed_checkpoint: true``) is refused unless the config trusts
    it: ``torch.distributed.checkpoint`` reads its ``.metadata`` with ``pickle.load`` and its non-tensor entries with
    ``torch.load(weights_only=False)``, so such a directory decides which code runs. The preset writes one file.

    Args:
        trust_distributed_checkpoints: load distributed checkpoint directories (only ones you wrote yourself).
        args, kwargs: passed to ``ModelParallelStrategy``.
    """

    def __init__(self, *args: Any, trust_distributed_checkpoints: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trust_distributed_checkpoints = trust_distributed_checkpoints

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_dir() and not self.trust_distributed_checkpoints:
            raise CheckpointError(
                f"checkpoint {str(checkpoint_path)!r} is a distributed checkpoint directory, which "
                "torch.distributed.checkpoint unpickles (its .metadata runs whatever code it names): load only one "
                "you wrote, with --trainer.strategy.init_args.trust_distributed_checkpoints=true, or resume from a "
                "checkpoint file (save_distributed_checkpoint: false, as conf/trainer/fsdp.yaml writes)")
        check = getattr(self.lightning_module, "check_checkpoint", None)
        if check is not None:
            if path.is_dir():  # a distributed checkpoint: the plain values sit in its metadata file
                plain = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
            else:
                plain = read_checkpoint(path, mmap=True)  # tensors mapped, not read
            check(plain, f"checkpoint {str(checkpoint_path)!r}")
        # a checkpoint file loads with weights_only=True whatever the caller or the environment's default says, as
        # SafeCheckpointIO loads it under DDP (a trusted distributed directory is read as the caller asks)
        return super().load_checkpoint(checkpoint_path, weights_only if path.is_dir() else True)
