"""The grid evaluation's per-prompt rows under DDP: 2 processes give every rank the rows of one process, in the same
order, each prompt once (the distributed sampler's repeat removed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_validate_script.py")


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_report_the_rows_of_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for devices in (1, 2):
        done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(devices)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "devices1_rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"devices2_rank{r}.json").read_text()) for r in (0, 1)]
    rows = torch.tensor(one["per_prompt_rewards"])
    assert rows.shape == (3, 5, 2) and len(rows.unique()) > 3  # the prompts' rows differ: their order matters
    for two in ranks:
        assert two["prompts_sha256"] == one["prompts_sha256"] and two["evaluation"]["num_prompts"] == 5
        assert torch.allclose(torch.tensor(two["per_prompt_rewards"]), rows, atol=1e-5)
        assert torch.allclose(torch.tensor(two["kl"]), torch.tensor(one["kl"]), atol=1e-4)
        # the reference's rows too (the sampler's repeated prompt counted once), so the paired SEs agree
        reference = torch.tensor(one["reference_per_prompt_rewards"])
        assert reference.shape == (5, 2)
        assert torch.allclose(torch.tensor(two["reference_per_prompt_rewards"]), reference, atol=1e-5)
        assert two["vertex_gain_se"] == pytest.approx(one["vertex_gain_se"], abs=1e-5)
    assert ranks[0]["per_prompt_rewards"] == ranks[1]["per_prompt_rewards"] and ranks[0]["kl"] == ranks[1]["kl"]
    # the means count each prompt once too (5 prompts, not the 6 the two shards evaluated), so they are the means of
    # the rows, and the same as one process's: rewards, the reference policy's, and all that is measured from them
    assert torch.allclose(rows.mean(1), torch.tensor(one["rewards"], dtype=rows.dtype), atol=1e-5)
    assert torch.allclose(reference.mean(0), torch.tensor(one["reference_rewards"], dtype=reference.dtype), atol=1e-5)
    for two in ranks:
        for key in ("rewards", "reference_rewards", "ref_point"):
            assert torch.allclose(torch.tensor(two[key]), torch.tensor(one[key]), atol=1e-5), key
        for key in ("hypervolume", "reference_hypervolume", "vertex_gain", "steerability"):
            assert two[key] == pytest.approx(one[key], abs=1e-5, nan_ok=True), key
    # max_prompts counts the loader's prompts, not each rank's: 2 processes evaluate the same first 3 as one
    capped = json.loads((tmp_path / "capped1_rank0.json").read_text())
    assert capped["evaluation"]["num_prompts"] == 3
    for rank in (0, 1):
        two = json.loads((tmp_path / f"capped2_rank{rank}.json").read_text())
        assert two["evaluation"]["num_prompts"] == 3 and two["prompts_sha256"] == capped["prompts_sha256"]
        assert torch.allclose(torch.tensor(two["per_prompt_rewards"]), torch.tensor(capped["per_prompt_rewards"]))
