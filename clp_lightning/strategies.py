"""The training strategy of sharded fits (``conf/trainer/fsdp.yaml``); the sharding itself is
:mod:`clp_lightning.sharding`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from clp_lightning.callbacks.checkpoint import read_checkpoint

# what ModelParallelStrategy writes beside the shards of a distributed checkpoint (a directory): everything else
META_FILE = "meta.pt"


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) that checks a checkpoint against the config before its weights
    load.

    ``ModelParallelStrategy`` loads a checkpoint's weights into the sharded model itself, before the
    LightningModule's ``on_load_checkpoint`` sees the file. Here the module's ``check_checkpoint`` (objectives,
    conditioning, base model: :meth:`clp_lightning.module.CLPModule.check_checkpoint`) runs on the file's plain
    values first, so a mismatched checkpoint stops before any of its tensors are read, as it does under DDP.
    """

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        check = getattr(self.lightning_module, "check_checkpoint", None)
        if check is not None:
            path = Path(checkpoint_path)
            if path.is_dir():  # a distributed checkpoint: the plain values sit in its metadata file
                plain = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
            else:
                plain = read_checkpoint(path, mmap=True)  # tensors mapped, not read
            check(plain, f"checkpoint {str(checkpoint_path)!r}")
        return super().load_checkpoint(checkpoint_path, weights_only)
