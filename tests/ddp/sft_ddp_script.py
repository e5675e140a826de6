"""The warm start's first gradient in one process or in two (gloo DDP), with or without accumulation. Each rank
saves the gradient its optimizer got (after DDP's averaging, before clipping). Run by test_ddp_sft.py."""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from clp_lightning.conditioning.config import PolicyConfig
from clp_lightning.sft import SFTModule

ROWS = [  # references of very different lengths: per-device and per-token means differ
    {"prompt": "POST: my cat sat on the mat all day.\nTL;DR:", "reference": "cat sits"},
    {"prompt": "POST: rain again, the garden is flooded.\nTL;DR:", "reference": "moved to a new city for a new job"},
    {"prompt": "POST: I moved to a new city for work.\nTL;DR:", "reference": "rain"},
    {"prompt": "POST: my code fails only on Fridays.\nTL;DR:", "reference": "a bug that shows up on one weekday, odd"},
]


class FirstGradients(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def main(out_dir: str, devices: int, batch_size: int, accumulate: int) -> None:
    torch.manual_seed(0)
    module = SFTModule(PolicyConfig("tiny:t5", max_prompt_length=48), max_response_length=32)
    loader = DataLoader(ROWS, batch_size=batch_size, collate_fn=lambda rows: {k: [r[k] for r in rows] for k in rows[0]})
    grads = FirstGradients()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[grads], default_root_dir=out_dir)
    trainer.fit(module, train_dataloaders=loader)
    torch.save(grads.grads, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:5]))
