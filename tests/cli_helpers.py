"""The smallest `clp` run config (tiny T5, two length rewards, synthetic data), and ways to run `clp` as a user does."""

import copy
import json
from pathlib import Path

import torch
import yaml

from clp_lightning.cli import main
from clp_lightning.models import build_byte_tokenizer, build_tiny_model

TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "max_steps": 1, "limit_val_batches": 0, "logger": False,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"class_path": "clp_lightning.module.CLPModule", "init_args": {
        "policy": {"model_name_or_path": "tiny:t5", "max_prompt_length": 32,
                   "conditioning": {"mode": "mixing", "options": {"targets": "logits"}}},
        "rewards": [{"class_path": "clp_lightning.rewards.LengthReward",
                     "init_args": {"name": "brevity", "mode": "brevity", "unit": "chars"}},
                    {"class_path": "clp_lightning.rewards.LengthReward",
                     "init_args": {"name": "length", "mode": "target", "target_length": 10, "unit": "chars"}}],
        "samples_per_prompt": 2, "kl_coef": 0.05, "generation": {"max_new_tokens": 4}}},
    "data": {"class_path": "clp_lightning.data.SyntheticTLDRDataModule",
             "init_args": {"num_train": 4, "num_val": 2, "batch_size": 2, "seed": 0}},
}


def write_config(path: Path, config: dict | None = None, **trainer) -> Path:
    """Write ``config`` (default: a copy of the tiny one), with ``trainer`` entries updated, as YAML at ``path``."""
    config = copy.deepcopy(TINY_CONFIG if config is None else config)
    config["trainer"].update(trainer)
    path.write_text(yaml.safe_dump(config))
    return path


def clp(capsys, *argv: str) -> tuple[int, str]:
    """Run ``clp <argv>`` in this process; return its exit code and what it wrote to standard error."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def remote_code_model(directory: Path, marker: Path) -> None:
    """A model directory whose config maps to Python code that writes ``marker`` when imported."""
    build_tiny_model("t5").save_pretrained(directory)
    build_byte_tokenizer("seq2seq").save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSeq2SeqLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import T5Config as EvilConfig\n"
                                       "from transformers import T5ForConditionalGeneration as EvilModel\n")


def tampered(path: Path, out: Path, **policy) -> Path:
    """A copy of checkpoint ``path`` whose stored hyper-parameters set ``policy`` fields and ``kl_coef=0.9``."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["policy"].update(policy)
    ckpt["hyper_parameters"]["kl_coef"] = 0.9
    torch.save(ckpt, out)
    return out
