"""The catalogue of bad inputs: each one through the command a user types (``clp ...``, the entry point
``clp_lightning.cli.main``), asserting the message, the exit code, and that nothing was written or lost.

Model loading is made to fail the test where the input must be refused before it (``no_model``). Signals during a
fit are in ``tests/callbacks/test_stop_on_signal.py``; the file-level data checks in ``tests/data/test_bad_files.py``.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_CONFIG, clp, remote_code_model, tampered, write_config

from clp_lightning.callbacks.checkpoint import CHECKPOINT_FORMAT
from clp_lightning.conditioning.config import PolicyConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny logits-mode run's config and its ``last.ckpt`` (one step)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    config = write_config(tmp / "config.yaml", callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / "checkpoints"), "save_last": True}}])
    from clp_lightning.cli import main

    main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp}"])
    return config, tmp / "checkpoints" / "last.ckpt"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the policy's model is built: the input had to be refused before that."""
    def build(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(PolicyConfig, "build", build)


def one_line(err: str) -> str:
    """The error line, after checking that the error is short (no parser dump, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("clp: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "Given value" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------ checkpoints are untrusted

def test_checkpoint_cannot_run_remote_code(trained, tmp_path, capsys):
    config, ckpt = trained
    marker = tmp_path / "marker"
    remote_code_model(tmp_path / "evil", marker)
    evil = tampered(ckpt, tmp_path / "evil.ckpt", model_name_or_path=str(tmp_path / "evil"), trust_remote_code=True)
    code, err = clp(capsys, "validate", "--config", str(config), f"--ckpt_path={evil}",
                    f"--trainer.default_root_dir={tmp_path}")
    assert code == 0 and not marker.exists(), err[-2000:]


def test_checkpoint_of_another_mode_stops_before_its_weights_load(trained, tmp_path, capsys):
    config, ckpt = trained
    code, err = clp(capsys, "validate", "--config", str(config), f"--ckpt_path={ckpt}",
                    "--model.init_args.policy.conditioning.options={targets: attention}",
                    f"--trainer.default_root_dir={tmp_path}")
    line = one_line(err)
    assert code == 2 and str(ckpt) in line
    assert ("conditioning {'options': {'targets': 'logits'}}, the config has {'options': {'targets': 'attention'}}"
            in line)


def make_bad_checkpoints(ckpt: Path, tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:4000])
    state = torch.load(ckpt, weights_only=True)
    newer, not_clp = dict(state), dict(state)
    newer["clp"] = {**state["clp"], "format": CHECKPOINT_FORMAT + 1}
    del not_clp["clp"]
    torch.save(newer, tmp_path / "newer.ckpt")
    torch.save(not_clp, tmp_path / "sft.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    return {"text": text, "truncated": truncated, "newer": tmp_path / "newer.ckpt", "sft": tmp_path / "sft.ckpt",
            "plain": tmp_path / "plain.ckpt", "missing": tmp_path / "nothing.ckpt"}


@pytest.mark.parametrize("kind, message", [
    ("text", "is not a checkpoint: torch.save writes a zip archive"),
    ("truncated", "is truncated or corrupt"),
    ("newer", "was written by a newer clp-lightning"),
    ("sft", "was not written by CLPModule"),
    ("plain", "is not a Lightning checkpoint: it has no 'state_dict'"),
    ("missing", "not found"),
])
def test_bad_checkpoint_files_say_what_they_are_not(trained, tmp_path, capsys, kind, message):
    config, ckpt = trained
    bad = make_bad_checkpoints(ckpt, tmp_path)[kind]
    code, err = clp(capsys, "validate", "--config", str(config), f"--ckpt_path={bad}",
                    f"--trainer.default_root_dir={tmp_path / 'run'}")
    line = one_line(err)
    assert code == 2 and message in line and bad.name in line
    assert not list((tmp_path / "run").rglob("*.json"))  # no evaluation report from a refused checkpoint


def test_resume_from_a_truncated_checkpoint_leaves_the_checkpoints_alone(trained, tmp_path, capsys):
    config, ckpt = trained
    bad = make_bad_checkpoints(ckpt, tmp_path)["truncated"]
    before = {p: p.read_bytes() for p in [bad, *ckpt.parent.iterdir()]}
    code, err = clp(capsys, "fit", "--config", str(config), f"--ckpt_path={bad}", "--trainer.max_steps=2",
                    f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert code == 2 and "truncated" in one_line(err)
    assert {p: p.read_bytes() for p in [bad, *ckpt.parent.iterdir()]} == before  # nothing written over, no .tmp


def test_full_disk_names_the_checkpoint_and_leaves_no_tmp(tmp_path):
    """A file-size limit makes the checkpoint write fail as a full disk does (EFBIG, like ENOSPC, mid-write)."""
    config = write_config(tmp_path / "config.yaml", callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}}])
    script = textwrap.dedent(f"""
        import resource, signal
        from clp_lightning.models import build_tiny_model
        build_tiny_model("t5")  # imports done before the limit: only the run's own writes are limited
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from clp_lightning.cli import main
        main(["fit", "--config", {str(config)!r}, "--trainer.default_root_dir={tmp_path}"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    line = one_line(done.stderr)
    assert done.returncode == 2 and "could not write checkpoint" in line and "checkpoints" in line
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.ckpt"))


def test_unwritable_checkpoint_directory_fails_before_the_model_loads(tmp_path, capsys, no_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = write_config(tmp_path / "config.yaml")
    code, err = clp(capsys, "fit", "--config", str(config), f"--trainer.default_root_dir={blocker / 'run'}")
    line = one_line(err)
    assert code == 2 and "trainer.default_root_dir" in line and "is not writable" in line
    config = write_config(tmp_path / "config2.yaml", callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(blocker / "c")}}])
    code, err = clp(capsys, "fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert code == 2 and "checkpoint directory of lightning.pytorch.callbacks.ModelCheckpoint" in one_line(err)


def test_unwritable_run_directory_fails_validate_before_the_model_loads(tmp_path, capsys, no_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = write_config(tmp_path / "config.yaml")
    code, err = clp(capsys, "validate", "--config", str(config), f"--trainer.default_root_dir={blocker / 'run'}")
    assert code == 2 and "trainer.default_root_dir" in one_line(err) and "is not writable" in one_line(err)


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_unwritable_log_directory_fails_before_the_model_loads(tmp_path, capsys, no_model, stage):
    # every real config logs under its logger's save_dir, not default_root_dir: the run's config.yaml, run_info and
    # evaluation reports go there, and its mkdir came only after the model was built
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(blocker / "logs")}}
    config = write_config(tmp_path / "config.yaml", logger=logger)
    code, err = clp(capsys, stage, "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}")
    line = one_line(err)
    assert code == 2 and "log directory of lightning.pytorch.loggers.CSVLogger" in line and str(blocker) in line
    assert "--trainer.logger.init_args.save_dir" in line


# ------------------------------------------------------------------------------------------------ bad data files

def data_config(tmp_path: Path, train: Path) -> Path:
    config = json.loads(json.dumps(TINY_CONFIG))
    config["data"] = {"class_path": "clp_lightning.data.RedditTLDRDataModule", "init_args": {
        "path": None, "data_files": {"train": str(train), "validation": str(FIXTURES / "tldr_carper_valid.jsonl")},
        "batch_size": 2}}
    return write_config(tmp_path / "config.yaml", config, default_root_dir=str(tmp_path / "run"))


GOOD_ROWS = (FIXTURES / "tldr_carper_train.jsonl").read_text().splitlines()


@pytest.mark.parametrize("case, content, message", [
    ("empty", b"", "has no rows"),
    ("blank", b"  \n\n \t\n", "has no rows"),
    ("latin1", ("\n".join(GOOD_ROWS[:2]) + "\n" + GOOD_ROWS[2].replace("TITLE", "TITL\u00c9")).encode("latin-1",
                                                                                                      "replace"),
     "is not UTF-8, the expected encoding: line 3"),
    ("bad_row", ("\n".join(GOOD_ROWS[:3]) + '\n{"prompt": "cut off", "label": \n').encode(), "line 4"),
])
def test_bad_data_file_is_named_before_the_model_loads(tmp_path, capsys, no_model, case, content, message):
    train = tmp_path / f"{case}.jsonl"
    train.write_bytes(content)
    code, err = clp(capsys, "fit", "--config", str(data_config(tmp_path, train)))
    line = one_line(err)
    assert code == 2 and str(train) in line and message in line
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.ckpt"))


def test_one_bad_row_among_good_ones_is_skipped_and_counted(tmp_path, capsys, caplog):
    train = tmp_path / "train.jsonl"
    rows = GOOD_ROWS[:4] + [json.dumps({"prompt": 42, "label": "a number is not a post"})]
    train.write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="clp_lightning.data"):
        code, err = clp(capsys, "fit", "--config", str(data_config(tmp_path, train)))
    assert code == 0, err[-2000:]
    assert "Split 'train': skipped 1 of 5 rows (non-string prompt: 1)" in caplog.text


# ------------------------------------------------------------------------------------------------- command line

@pytest.mark.parametrize("override, message", [
    ("--model.init_args.policy.model_name_or_path=no-such-org/no-such-model", "could not load 'no-such-org/no-such"),
    ("--model.init_args.kl_coeff=0.1", "Option 'kl_coeff' is not accepted"),
    ("--model.init_args.samples_per_prompt=1", "samples_per_prompt=1: the leave-one-out baseline needs k >= 2"),
])
def test_config_errors_are_one_line(tmp_path, capsys, override, message):
    code, err = clp(capsys, "validate", "--config", str(write_config(tmp_path / "config.yaml")), override,
                    f"--trainer.default_root_dir={tmp_path}")
    assert code == 2 and message in one_line(err)


def test_missing_reward_model_is_one_line(tmp_path, capsys):
    config = json.loads(json.dumps(TINY_CONFIG))
    config["model"]["init_args"]["rewards"][0] = {
        "class_path": "clp_lightning.rewards.EmbeddingSimilarityReward",
        "init_args": {"name": "relevance", "model": str(tmp_path / "no_encoder")}}
    code, err = clp(capsys, "validate", "--config", str(write_config(tmp_path / "config.yaml", config)))
    assert code == 2 and "no_encoder" in one_line(err)


def test_verbose_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="leave-one-out baseline needs k >= 2"):
        clp(capsys, "validate", "--verbose", "--config", str(write_config(tmp_path / "config.yaml")),
            "--model.init_args.samples_per_prompt=1")


# ---------------------------------------------------------------------------------------------------- clp steer

@pytest.fixture
def no_steer_model(monkeypatch):
    import clp_lightning.steer as steer

    def load_module(*args, **kwargs):
        raise AssertionError("clp steer loaded the model before refusing the input")

    monkeypatch.setattr(steer, "load_module", load_module)


@pytest.mark.parametrize("weights, message", [
    (["--weights", "-1,2"], "has negative entries"),
    (["--weights", "1 0"], "weighting '1 0' is not a comma-separated list of numbers"),
    (["--weights", "0.2,0.3,0.5"], "has 3 entries, expected 2 (one per objective)"),
    (["--weights", "0.5,0.6"], "sums to 1.1, expected 1"),
    (["--weights=0.5,0.5", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--weights=0.5,0.5", "--alpha=0.1"], "--alpha 0.1 given, but the config's policy is not conditioned on alpha"),
])
def test_steer_refuses_bad_weights_before_loading_a_model(trained, tmp_path, capsys, no_steer_model, weights,
                                                           message):
    config, ckpt = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a post\n")
    code, err = clp(capsys, "steer", "--config", str(config), "--ckpt_path", str(ckpt), *weights,
                    "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"))
    assert code == 2 and message in one_line(err) and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("case, message", [
    ("no_prompts", "No such file or directory"),
    ("bad_jsonl", "row 2 is not JSON"),
    ("no_prompt_field", "row 1 has no 'prompt' text field"),
    ("empty_prompt", "row 2 has an empty 'prompt'; expected the post or article"),
    ("lone_surrogate", "row 1 has a 'prompt' with an unpaired UTF-16 surrogate at character 1 ('\\ud800')"),
    ("source_not_text", "row 1 has a 'source' field that is not text (got int 5); expected a string"),
    ("reference_not_text", "row 2 has a 'reference' field that is not text (got list [\"x\"]); expected a string "
                           "or null"),
    ("bad_checkpoint", "is not a checkpoint"),
    ("bad_output", "--output directory"),
    ("output_is_a_directory", "is a directory; name the JSONL file to write"),
])
def test_steer_refuses_bad_files_before_loading_a_model(trained, tmp_path, capsys, no_steer_model, case, message):
    config, ckpt = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text({"bad_jsonl": '{"prompt": "a"}\n{"prompt": \n', "no_prompt_field": '{"text": "a"}\n',
                        "empty_prompt": '{"prompt": "a"}\n{"prompt": " "}\n',
                        "lone_surrogate": '{"prompt": "a\\ud800b"}\n',
                        "source_not_text": '{"prompt": "a", "source": 5}\n',
                        # a null reference is none; a list is refused
                        "reference_not_text": '{"prompt": "a", "reference": null}\n'
                                              '{"prompt": "b", "reference": ["x"]}\n'}.get(case, '{"prompt": "a"}\n'))
    if case == "no_prompts":
        prompts = tmp_path / "missing.txt"
    if case == "bad_checkpoint":
        ckpt = tmp_path / "notes.ckpt"
        ckpt.write_text("not weights")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = {"bad_output": blocker / "out.jsonl", "output_is_a_directory": tmp_path}.get(case, tmp_path / "out.jsonl")
    code, err = clp(capsys, "steer", "--config", str(config), "--ckpt_path", str(ckpt), "--weights", "1,0",
                    "--prompts", str(prompts), "--output", str(output))
    assert code == 2 and message in one_line(err)


def test_steer_names_the_checkpoint_of_another_mode(trained, tmp_path, capsys):
    config, ckpt = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a post\n")
    code, err = clp(capsys, "steer", "--config", str(config), "--ckpt_path", str(ckpt), "--weights", "1,0",
                    "--prompts", str(prompts),
                    "--set=--model.init_args.policy.conditioning.options={targets: attention}")
    line = one_line(err)
    assert code == 2 and str(ckpt) in line
    assert "was trained with conditioning {'options': {'targets': 'logits'}}" in line


@pytest.mark.parametrize("case", ["no_validation_split", "missing_column"])
def test_a_split_or_column_the_stage_needs_is_named_before_the_model_loads(tmp_path, capsys, no_model, case):
    config = json.loads(json.dumps(TINY_CONFIG))
    files = {"train": str(FIXTURES / "tldr_carper_train.jsonl")}
    if case == "missing_column":
        files["validation"] = str(FIXTURES / "tldr_missing_column.jsonl")
    config["data"] = {"class_path": "clp_lightning.data.RedditTLDRDataModule",
                      "init_args": {"path": None, "data_files": files, "batch_size": 2}}
    path = write_config(tmp_path / "config.yaml", config, default_root_dir=str(tmp_path / "run"))
    code, err = clp(capsys, "fit", "--config", str(path))
    line = one_line(err)
    if case == "no_validation_split":
        assert code == 2 and "Split 'validation' is not in data_files (has ['train'])" in line
    else:
        assert code == 2 and "Cannot detect the TL;DR schema of split 'validation' from columns ['prompt']" in line


def test_a_relative_dataset_folder_that_is_missing_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from clp_lightning.data import CNNDailyMailDataModule

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # `clp data` writes under data/, but not this one yet
    with pytest.raises(FileNotFoundError, match="Dataset directory not found: 'data/cnndm_blanc'"):
        CNNDailyMailDataModule(path="data/cnndm_blanc", name=None).check_files("fit")
