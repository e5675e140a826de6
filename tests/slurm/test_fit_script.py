"""``experiments/slurm/fit.sbatch``'s command line, without a cluster: the script runs with a stand-in ``srun`` that
records its arguments, and they go through clp's own parser (parsed and checked, nothing built)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from clp_lightning.cli import parse_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "slurm" / "fit.sbatch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the sbatch script is a bash script")


def launched(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    """The arguments the script gives ``python -m clp_lightning fit`` in a job of 1 node with 2 tasks."""
    stand_in = tmp_path / "bin" / "srun"
    stand_in.parent.mkdir()
    stand_in.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    stand_in.chmod(0o755)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    job = {"PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args"),
           "CLP_REPO": str(ROOT), "CLP_VENV": str(tmp_path / "venv"), "CLP_RUNS": str(tmp_path / "runs"),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", **env}
    subprocess.run(["bash", str(SCRIPT), *args], env=job, check=True, cwd=tmp_path)
    argv = (tmp_path / "args").read_text().splitlines()
    assert argv[:4] == ["python", "-m", "clp_lightning", "fit"]
    return argv[4:]


def test_an_array_task_runs_its_variant_and_seed(tmp_path):
    # task 7 of 6 variants x 3 seeds: variant 7 % 6 (logits), seed 7 // 6; conf/quickstart.yaml does not tie the
    # rollouts' seed to seed_everything, so the seed must set it too, or seeds 0, 1, 2 would draw the same rollouts
    argv = launched(tmp_path, {"SLURM_ARRAY_TASK_ID": "7"}, "conf/quickstart.yaml", "--trainer.accelerator=cpu")
    config = parse_config(argv)
    assert config["seed_everything"] == 1 and config["model"]["init_args"]["weight_seed"] == 1
    assert config["model"]["init_args"]["policy"]["conditioning"]["options"] == {"targets": "logits"}
    run = str(tmp_path / "runs" / "quickstart" / "logits" / "seed1")
    assert config["trainer"]["default_root_dir"] == run
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == run
    assert (config["trainer"]["num_nodes"], str(config["trainer"]["devices"])) == (1, "2")  # from SLURM's layout


def test_the_sharded_job_shards_over_every_task(tmp_path):
    argv = launched(tmp_path, {"CLP_STRATEGY": "fsdp"}, "conf/quickstart.yaml", "--trainer.accelerator=cpu")
    config = parse_config(argv)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"].endswith("ShardedStrategy") and strategy["init_args"]["data_parallel_size"] == 2
