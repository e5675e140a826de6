"""A real one-node SLURM cluster on loopback runs the fit script with 2 tasks (DDP over gloo on CPU).

Needs Debian's slurm-wlm and munge (`.ci/run` installs them) and root, to start munged, slurmctld and slurmd. When
the cluster cannot start, the test is skipped with the reason.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_helpers import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[2]

# what the job's checks read: last.ckpt (resumed from, evaluated alone) and the grid evaluation's reports
JOB_TRAINER = {
    "limit_val_batches": 1,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_on_train_epoch_end": False}},
        {"class_path": "clp_lightning.callbacks.GridEvaluation",
         "init_args": {"grid_step": 0.5, "sample_prompts": 1, "generation": {"do_sample": False, "max_new_tokens": 4}}},
    ],
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "unused", "name": "", "version": ""},
    },
}

SLURM_CONF = """\
ClusterName=clptest
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
FirstJobId={first_job}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _skip(reason: str) -> None:
    print(f"SLURM test skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "sinfo") if shutil.which(b) is None]
    if missing:
        _skip(f"SLURM binaries not installed: {missing} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _skip("starting munged, slurmctld and slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    # job ids set Lightning's DDP port (SLURMEnvironment: 10000 + the id's last 4 digits), so a fresh cluster must
    # not reuse the ids of processes a failed earlier run may have left behind
    conf.write_text(SLURM_CONF.format(d=d, first_job=1000 + os.getpid() % 8000))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", shutil.which("munged")], capture_output=True)
    started = [
        subprocess.run([shutil.which(b), *args], env=env, capture_output=True, text=True)
        for b, args in (("slurmctld", ["-i"]), ("slurmd", []))
    ]
    deadline = time.time() + 30
    while time.time() < deadline:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if info.returncode == 0 and info.stdout.strip() in ("idle", "mix", "alloc"):
            break
        time.sleep(1)
    else:
        logs = [(d / f).read_text()[-500:] for f in ("slurmctld.log", "slurmd.log") if (d / f).exists()]
        _skip(f"the local SLURM cluster did not come up: {[s.stderr[-300:] for s in started]} {logs}")
    yield d, env
    # cancel what is left (a failed test's job), then stop the daemons and any job step they left running
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    time.sleep(3)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        pid = (d / pid_file).read_text().strip() if (d / pid_file).exists() else ""
        if pid:
            subprocess.run(["kill", pid], capture_output=True)
    subprocess.run(["pkill", "-9", "-f", str(d)], capture_output=True)  # job scripts run from its spool


def _job(tmp_path: Path, env: dict, name: str, **trainer) -> tuple[Path, Path, dict]:
    """The tiny run config with the job's checkpoints, evaluation, logger and ``trainer`` settings, and the job's
    environment."""
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(JOB_TRAINER, **trainer)
    config["data"]["init_args"]["num_train"] = 8  # 2 batches per rank and epoch
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    job_env = {
        **env,
        "CLP_REPO": str(ROOT),
        "CLP_VENV": str(Path(sys.executable).parents[1]),
        "CLP_RUNS": str(runs),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return config_path, runs, job_env


def _two_task_job(tmp_path: Path, config_path: Path) -> list[str]:
    """sbatch options for one node with 2 tasks on CPU, the fit script, and its arguments."""
    return ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
            f"--chdir={tmp_path}", str(ROOT / "experiments/slurm/fit.sbatch"), str(config_path),
            "--trainer.accelerator=cpu", "--trainer.precision=32-true"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_fit_script_runs_two_tasks_and_matches_single_process_evaluation(cluster, tmp_path, strategy):
    d, env = cluster
    config_path, runs, job_env = _job(tmp_path, env, "tiny", max_steps=4, val_check_interval=2)
    # fsdp: the sharded variant of the script (conf/trainer/fsdp.yaml), whose grid evaluations at steps 2 and 4 run
    # on the sharded policy (generation kept in step across the ranks) and must equal one process's on its checkpoint
    job_env["CLP_STRATEGY"] = strategy
    done = subprocess.run(
        [
            "sbatch",
            "--wait",
            f"--output={tmp_path}/job.out",
            *_two_task_job(tmp_path, config_path),
        ],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + out[-3000:]
    run = runs / "tiny"
    fit_report = json.loads((run / "evaluation" / "latest.json").read_text())
    assert fit_report["step"] == 4
    assert "Starting with 2 processes" in out  # two SLURM tasks, one DDP process each
    saved = [f.read_text() for f in run.rglob("config.yaml")]  # the resolved config the run saved
    assert saved and all(("ShardedStrategy" in text) == (strategy == "fsdp") for text in saved)
    # the same checkpoint evaluated by one process gives the numbers the two ranks computed together
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "clp_lightning",
            "validate",
            "--config",
            str(config_path),
            f"--trainer.default_root_dir={tmp_path / 'single'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'single'}",
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
        ],
        env={k: v for k, v in job_env.items() if not k.startswith("SLURM")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    report = json.loads((tmp_path / "single" / "evaluation" / "validate.json").read_text())
    assert report["step"] == 4
    for a, b in zip(report["rewards"], fit_report["rewards"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert report["hypervolume"] == pytest.approx(fit_report["hypervolume"], abs=1e-5)


def _job_state(job: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")


@pytest.mark.slow
def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    d, env = cluster
    # long enough to be signalled mid-run (800 steps take about a minute here)
    config_path, runs, job_env = _job(tmp_path, env, "long", max_steps=800, val_check_interval=800)
    log = tmp_path / "job.out"
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--open-mode=append",
            f"--output={log}",
            *_two_task_job(tmp_path, config_path),
        ],
        env=job_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.time() + 120  # wait until training runs (its TensorBoard file appears), then signal it
    while time.time() < deadline and not list((runs / "long").glob("events.out.tfevents.*")):
        time.sleep(1)
    time.sleep(5)
    # what SLURM sends 90 s before the time limit (--signal=SIGUSR1@90): SlurmRequeue checkpoints, then requeues
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline and "Requeued SLURM job" not in (log.read_text() if log.exists() else ""):
        time.sleep(1)
    assert (runs / "long" / "hpc_ckpt_1.ckpt").exists(), log.read_text()[-3000:]
    # a requeued job waits out a begin time; make it eligible now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
    deadline = time.time() + 420
    while time.time() < deadline and _job_state(job, env) not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(2)
    text = log.read_text()
    assert _job_state(job, env) == "COMPLETED", text[-3000:]
    saved = text.index("SLURM signal SIGUSR1: saving")
    step = int(text[saved:].split(" at step ")[1].split()[0])
    assert 0 < step < 800  # stopped part-way, then restarted from that checkpoint, not from step 0
    assert "Restored all states from the checkpoint" in text[saved:] and "hpc_ckpt_1.ckpt" in text[saved:]
    assert "`Trainer.fit` stopped: `max_steps=800` reached." in text
