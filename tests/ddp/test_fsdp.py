"""conf/trainer/fsdp.yaml in two CPU processes (gloo): the sharded fit takes the same steps as DDP, its checkpoint
resumes exactly under FSDP and loads into a single process for ``clp validate``. Through ``clp`` as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import TINY_CONFIG

REPO = Path(__file__).resolve().parents[2]
FSDP = REPO / "conf" / "trainer" / "fsdp.yaml"
MODES = {
    "all": {"mode": "mixing", "options": {"targets": "all"}},
    "lora": {"mode": "lora", "options": {"r": 2, "target_modules": "attention"}},
}
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true"]


def clp(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CLP_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-m", "clp_lightning", *argv], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]


def fit(config: Path, out: Path, steps: int, *extra: str) -> Path:
    clp("fit", "--config", str(config), *extra, f"--trainer.default_root_dir={out}", f"--trainer.max_steps={steps}")
    (checkpoint,) = (out / "checkpoints").glob(f"*step={steps}.ckpt")
    return checkpoint


def policy_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.model.")}


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp_fit_equals_ddp_resumes_exactly_and_validates_in_one_process(mode, tmp_path):
    config = tmp_path / "config.yaml"
    settings = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    settings["model"]["init_args"]["policy"]["conditioning"] = MODES[mode]
    settings["model"]["init_args"]["samples_per_prompt"] = 2
    # 4 batches per rank and epoch, and a checkpoint after every step: the resume below starts mid-epoch from the
    # checkpoint of step 1 of the same run
    settings["data"]["init_args"]["num_train"] = 16
    settings["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"every_n_train_steps": 1, "save_top_k": -1}}]
    config.write_text(yaml.safe_dump(settings))
    fsdp = ["--config", str(FSDP), *CPU, "--trainer.strategy.init_args.data_parallel_size=2"]

    ddp_ckpt = fit(config, tmp_path / "ddp", 2, *CPU, "--trainer.strategy=ddp")
    fsdp_ckpt = fit(config, tmp_path / "fsdp", 2, *fsdp)
    ddp, sharded = policy_state(ddp_ckpt), policy_state(fsdp_ckpt)
    # the same trained parameters, gathered whole into one file (only the trained ones: frozen weights are left out)
    assert ddp.keys() == sharded.keys() and ddp
    for name, value in ddp.items():
        assert torch.allclose(sharded[name], value, atol=1e-5, rtol=1e-4), name

    # resume from the gathered checkpoint of step 1 under FSDP: the same step 2 as the run that did not stop
    first = next((tmp_path / "fsdp" / "checkpoints").glob("*step=1.ckpt"))
    resumed = policy_state(fit(config, tmp_path / "resumed", 2, *fsdp, f"--ckpt_path={first}"))
    assert resumed.keys() == sharded.keys()  # the loop below checks every parameter, not those of an empty file
    for name, value in resumed.items():
        assert torch.allclose(value, sharded[name], atol=1e-6), name
    assert any(not torch.equal(v, sharded[k]) for k, v in policy_state(first).items())  # the second step trained

    # the FSDP checkpoint is a plain CLP checkpoint: a single process validates it
    clp("validate", "--config", str(config), f"--ckpt_path={fsdp_ckpt}", f"--trainer.default_root_dir={tmp_path / 'v'}",
        "--trainer.limit_val_batches=1")
