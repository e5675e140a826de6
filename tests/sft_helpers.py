"""The warm start's first gradient on four rows whose references differ in length, for the tests that compare how
micro-batches and devices split them (tests/test_sft.py, tests/ddp/sft_ddp_script.py)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from clp_lightning.conditioning.config import PolicyConfig
from clp_lightning.sft import SFTModule

# reference lengths 1, 2, 8 and 20 words: every way these tests split them (rows 0-1 | 2-3 in one process; rows 0, 2 |
# 1, 3 on two ranks) gives parts of different token counts, so per-part means differ from the per-token mean
ROWS = [
    {"prompt": "POST: rain again, the garden is flooded.\nTL;DR:", "reference": "rain"},
    {"prompt": "POST: my cat sat on the mat all day.\nTL;DR:", "reference": "cat sits"},
    {"prompt": "POST: my code fails only on Fridays.\nTL;DR:", "reference": "a bug that shows up on one weekday only"},
    {"prompt": "POST: I moved to a new city for work.\nTL;DR:",
     "reference": "I moved to a new city for a new job and I miss my friends, my family and my old home"},
]


class FirstGradients(L.Callback):
    """The gradients the optimizer's first step gets (after DDP's averaging, before clipping)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_gradients(batch_size: int, accumulate: int, devices: int = 1, root: str | None = None) -> tuple[
        dict[str, torch.Tensor], int]:
    """The first step's gradients of a tiny T5 warm start on ``ROWS``, and this process's rank."""
    torch.manual_seed(0)
    module = SFTModule(PolicyConfig("tiny:t5", max_prompt_length=48), max_response_length=32)
    loader = DataLoader(ROWS, batch_size=batch_size, collate_fn=lambda rows: {k: [r[k] for r in rows] for k in rows[0]})
    grads = FirstGradients()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[grads], default_root_dir=root)
    trainer.fit(module, train_dataloaders=loader)
    return grads.grads, trainer.global_rank
