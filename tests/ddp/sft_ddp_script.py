"""The warm start's first gradient in one process or in two (gloo DDP), with or without accumulation. Each rank
saves the gradient its optimizer got (after DDP's averaging, before clipping). Run by test_ddp_sft.py."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for sft_helpers
from sft_helpers import first_gradients  # noqa: E402


def main(out_dir: str, devices: int, batch_size: int, accumulate: int) -> None:
    grads, rank = first_gradients(batch_size, accumulate, devices, out_dir)
    torch.save(grads, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:5]))
