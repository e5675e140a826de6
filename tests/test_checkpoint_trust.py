"""A checkpoint is untrusted input: it supplies state, never configuration (``clp validate --ckpt_path``)."""

import json

import pytest
import torch
import yaml

from clp_lightning.cli import CLPCLI
from clp_lightning.models import build_byte_tokenizer, build_tiny_model

CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "logger": False,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"class_path": "clp_lightning.module.CLPModule", "init_args": {
        "policy": {"model_name_or_path": "tiny:t5", "max_prompt_length": 32, "conditioning": {"targets": "logits"}},
        "rewards": [{"class_path": "clp_lightning.rewards.LengthReward",
                     "init_args": {"name": "brevity", "mode": "brevity", "unit": "chars"}},
                    {"class_path": "clp_lightning.rewards.LengthReward",
                     "init_args": {"name": "length", "mode": "target", "target_length": 10, "unit": "chars"}}],
        "samples_per_prompt": 2, "kl_coef": 0.05, "generation": {"max_new_tokens": 4}}},
    "data": {"class_path": "clp_lightning.data.SyntheticTLDRDataModule",
             "init_args": {"num_train": 4, "num_val": 2, "batch_size": 2, "seed": 0}},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    cli = CLPCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp}"])
    path = tmp / "model.ckpt"
    cli.trainer.save_checkpoint(path)
    return config, path


def remote_code_model(directory, marker):
    """A model directory whose config maps to Python code that writes ``marker`` when imported."""
    build_tiny_model("t5").save_pretrained(directory)
    build_byte_tokenizer("seq2seq").save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSeq2SeqLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import T5Config as EvilConfig\n"
                                       "from transformers import T5ForConditionalGeneration as EvilModel\n")


def tampered(path, out, **policy):
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["policy"].update(policy)
    ckpt["hyper_parameters"]["kl_coef"] = 0.9
    torch.save(ckpt, out)
    return out


def test_checkpoint_cannot_turn_on_remote_code_or_change_the_model(trained, tmp_path):
    config, path = trained
    marker = tmp_path / "marker"
    remote_code_model(tmp_path / "evil", marker)
    evil = tampered(path, tmp_path / "evil.ckpt", model_name_or_path=str(tmp_path / "evil"), trust_remote_code=True)
    cli = CLPCLI(args=["validate", "--config", str(config), f"--ckpt_path={evil}",
                       f"--trainer.default_root_dir={tmp_path}"])
    assert not marker.exists(), "the checkpoint made the CLI run code from its model directory"
    assert cli.model.hparams.policy["model_name_or_path"] == "tiny:t5" and cli.model.kl_coef == 0.05
    assert not cli.model.hparams.policy["trust_remote_code"]


def test_explicit_override_wins_over_the_checkpoint(trained, tmp_path):
    config, path = trained
    cli = CLPCLI(args=["validate", "--config", str(config), f"--ckpt_path={path}", "--model.init_args.kl_coef=0.2",
                       f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.kl_coef == 0.2


@pytest.mark.parametrize("override, what", [
    ("--model.init_args.policy.conditioning.targets=attention", "conditioning"),
    ("--model.init_args.policy.model_name_or_path=tiny:gpt2", "base model"),
])
def test_a_checkpoint_of_another_setup_stops_before_its_weights_load(trained, tmp_path, override, what):
    config, path = trained
    with pytest.raises(ValueError, match=f"the checkpoint was trained with {what} .* the config has"):
        CLPCLI(args=["validate", "--config", str(config), f"--ckpt_path={path}", override,
                     f"--trainer.default_root_dir={tmp_path}"])
