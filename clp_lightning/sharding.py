"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for a policy that does not fit one
device: each rank holds ``1/W`` of every parameter, gradient and optimizer state, and gathers a transformer block's
parameters only while the block runs.

:class:`~clp_lightning.strategies.ShardedStrategy` (Lightning's ``ModelParallelStrategy``, ``conf/trainer/fsdp.yaml``)
builds the device mesh and calls ``CLPModule.configure_model``, which shards the policy's model and its frozen
reference copy with :func:`shard_transformer`. Lightning's ``FSDPStrategy`` wraps the older FSDP and refuses a CPU
accelerator; FSDP2 runs on CPU with gloo, which the tests use. Every call into a sharded model goes through its own
forward (see :func:`clp_lightning.conditioning.lm.encode`), and generation keeps the ranks in step
(:func:`generation_sync`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the modules of the classes Hugging Face marks as never to be split across
    devices (``_no_split_modules``: ``T5Block``, ``GPT2Block``, ``LlamaDecoderLayer``, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer block to shard by (_no_split_modules: "
                         f"{sorted(names)})")
    return blocks


def shard_transformer(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` in place over the 1-D data-parallel ``mesh``: one FSDP unit per transformer block (the
    block's conditioned copies and LoRA adapters are inside it and shard with it), and the root unit for the rest
    (embeddings, output layer, final norm). Frozen and trainable parameters may share a unit."""
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def generation_sync(model: nn.Module) -> dict[str, bool]:
    """``generate`` keyword for a sharded model on several ranks: ``synced_gpus`` keeps every rank running forward
    passes until all are done (each pass gathers parameters from every rank, so a rank that stopped early would
    leave the others waiting). Transformers detects this for its own FSDP integration, not for ``fully_shard``."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {"synced_gpus": True} if is_sharded(model) and distributed and torch.distributed.get_world_size() > 1 else {}
