"""The warm start's loss is the mean over every reference token of the optimizer step, across devices and
accumulated micro-batches: two CPU processes (gloo) get the gradient one process gets from the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("sft_ddp_script.py")


def first_gradients(out: Path, devices: int, batch_size: int, accumulate: int) -> list[dict[str, torch.Tensor]]:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), str(batch_size), str(accumulate)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The gradient of one process, one batch of all four rows."""
    (grads,) = first_gradients(tmp_path_factory.mktemp("sft") / "one", 1, 4, 1)
    return grads


@pytest.mark.ddp
@pytest.mark.parametrize("batch_size, accumulate", [(2, 1), (1, 2)], ids=["one_micro_batch", "accumulated"])
def test_two_processes_get_the_gradient_of_the_whole_batch(tmp_path, whole, batch_size, accumulate):
    ranks = first_gradients(tmp_path / "two", 2, batch_size, accumulate)
    assert whole
    for grads in ranks:
        assert grads.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(grads[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
