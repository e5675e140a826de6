"""The command line end to end on a tiny offline config: fit, validate, steer, compare."""

import json

import pytest
import torch
import yaml

from clp_lightning.cli import main

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "max_steps": 2,
        "val_check_interval": 2,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "plugins": [{"class_path": "clp_lightning.callbacks.SafeCheckpointIO"}],
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "save_on_train_epoch_end": False},
            },
            {
                "class_path": "clp_lightning.callbacks.GridEvaluation",
                "init_args": {
                    "grid_step": 0.5,
                    "sample_prompts": 1,
                    "generation": {"do_sample": False, "max_new_tokens": 4},
                },
            },
        ],
    },
    "model": {
        "class_path": "clp_lightning.module.CLPModule",
        "init_args": {
            "policy": {"model_name_or_path": "tiny:t5", "max_prompt_length": 32,
                       "conditioning": {"mode": "mixing", "options": {"targets": "logits"}}},
            "rewards": [
                {
                    "class_path": "clp_lightning.rewards.RougeReward",
                    "init_args": {"name": "coverage", "target": "source"},
                },
                {"class_path": "clp_lightning.rewards.LengthReward", "init_args": {"name": "brevity"}},
            ],
            "samples_per_prompt": 2,
            "generation": {"max_new_tokens": 4},
        },
    },
    "data": {
        "class_path": "clp_lightning.data.SyntheticTLDRDataModule",
        "init_args": {"num_train": 8, "num_val": 2, "batch_size": 2},
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = json.loads(json.dumps(CONFIG))
    config["trainer"]["default_root_dir"] = str(tmp)
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp), "name": "run", "version": ""},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return tmp, path


@pytest.fixture(scope="module")
def validated(run):
    """``clp validate`` of the run's last checkpoint: its report (for every test that reads it, whichever runs)."""
    tmp, config = run
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    main(["validate", "--config", str(config), "--ckpt_path", str(ckpt)])
    return tmp / "run" / "evaluation" / "validate.json"


def test_fit_then_validate_through_the_cli(run, validated):
    tmp, _ = run
    fit_report = json.loads((tmp / "run" / "evaluation" / "latest.json").read_text())
    report = json.loads(validated.read_text())
    assert torch.allclose(torch.tensor(report["rewards"]), torch.tensor(fit_report["rewards"]), atol=1e-5)
    assert report["step"] == fit_report["step"] == 2
    assert report["parameters"]["trainable_parameters"] > 0


def test_steer_generates_at_each_weighting(run, tmp_path, capsys):
    from clp_lightning.steer import steer

    tmp, config = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("SUBREDDIT: r/cooking\\n\\nPOST: my soup is too salty\\n\\nTL;DR:\nanother prompt\n")
    out = tmp_path / "steered.jsonl"
    results = steer(
        [
            "--config",
            str(config),
            "--ckpt_path",
            str(tmp / "run" / "checkpoints" / "last.ckpt"),
            "--weights",
            "1,0",
            "--weights",
            "0.25,0.75",
            "--prompts",
            str(prompts),
            "--output",
            str(out),
            "--max_new_tokens",
            "4",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(results) == 4
    assert rows[0]["prompt"].startswith("SUBREDDIT: r/cooking\n\n")
    assert [r["weights"] for r in rows] == [[1.0, 0.0]] * 2 + [[0.25, 0.75]] * 2
    assert set(rows[0]["rewards"]) == {"coverage", "brevity"}
    # bad weightings, prompts and checkpoints: tests/test_bad_inputs.py


def test_steer_reads_prompts_from_standard_input_and_leaves_it_open(monkeypatch):
    """Reading the prompts closed sys.stdin, so a second call in the same process (a notebook, a script steering
    twice) failed with "I/O operation on closed file"."""
    import io

    from clp_lightning.steer import read_prompts

    for path in (None, "-"):
        stdin = io.StringIO("POST: one\\n\\nTL;DR:\n\nPOST: two\n")
        monkeypatch.setattr("sys.stdin", stdin)
        assert read_prompts(path) == [{"prompt": "POST: one\n\nTL;DR:"}, {"prompt": "POST: two"}]
        assert not stdin.closed and read_prompts(path) == []


def test_steer_refuses_a_config_of_another_conditioning_before_loading_a_model(run, tmp_path, capsys, monkeypatch):
    # the module build loads the policy and every reward model: a config that does not fit the checkpoint is found
    # from the parsed config first, as clp export does
    import clp_lightning.steer as steer

    def load_module(*args, **kwargs):
        raise AssertionError("clp steer loaded the model before refusing the config")

    monkeypatch.setattr(steer, "load_module", load_module)
    tmp, config = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a post\n")
    with pytest.raises(SystemExit) as exit_:
        main(["steer", "--config", str(config), "--ckpt_path", str(tmp / "run" / "checkpoints" / "last.ckpt"),
              "--weights", "1,0", "--prompts", str(prompts),
              "--set=--model.init_args.policy.conditioning.options={targets: attention}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "was trained with conditioning" in err, err[-2000:]


def test_steer_output_interrupted_mid_write_keeps_the_old_file(run, tmp_path, monkeypatch):
    """A write that dies half-way (disk full, a kill) leaves the previous --output whole, not half a JSONL file."""
    from pathlib import Path

    from clp_lightning.steer import steer

    tmp, config = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a post\n")
    out = tmp_path / "steered.jsonl"
    out.write_text('{"old": 1}\n')
    write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        steer(["--config", str(config), "--ckpt_path", str(tmp / "run" / "checkpoints" / "last.ckpt"),
               "--weights", "1,0", "--prompts", str(prompts), "--output", str(out), "--max_new_tokens", "4"])
    monkeypatch.undo()
    assert out.read_text() == '{"old": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == [
        "prompts.txt", "steered.jsonl"]


STEER_SETUPS = {
    # prompt + alpha conditioning: generation must write alpha into the prefix, or the policy refuses the prompt
    "alpha": ({"policy": {"conditioning": {"prompt": True, "mode": "mixing", "options": {"targets": "logits"},
                                           "condition_on_alpha": True}},
               "alpha_range": [0.1, 0.5]}, []),  # its low end is not kl_coef (0.05): which one is given shows
    # the evaluation-only baseline: steer must decode with the experts' mixed logits, as validate does
    "logit_mixture": ({"policy": {"conditioning": {"mode": "mixing", "options": {"targets": "attention"}}}},
                      ["--set=--model.init_args.decoding=logit_mixture"]),
}


@pytest.mark.parametrize("setup", sorted(STEER_SETUPS))
def test_steer_generates_as_the_module_does_for_every_kind_of_checkpoint(tmp_path, capsys, monkeypatch, setup):
    """clp steer decodes as the module's own evaluation path does, for alpha-conditioned policies (at the lower end
    of alpha_range) and for decoding-time logit mixing; a copy of the generation loop would miss either."""
    from cli_helpers import TINY_CONFIG, write_config

    from clp_lightning.conditioning.mixture import mixture_generate
    from clp_lightning.steer import load_module, steer

    changes, overrides = STEER_SETUPS[setup]
    config = json.loads(json.dumps(TINY_CONFIG))
    policy = config["model"]["init_args"]["policy"]
    policy["conditioning"] = changes["policy"]["conditioning"]
    config["model"]["init_args"].update({k: v for k, v in changes.items() if k != "policy"})
    path = write_config(tmp_path / "config.yaml", config, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}}])
    main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    # `path` is now the run's own saved config (fit writes config.yaml into its log dir), as a user would pass it
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first post about soup\nsecond post about bikes\n")
    # the one-step policy answers alike at every alpha: the alpha it is given is read where it takes it
    from clp_lightning.conditioning.policy import ConditionalPolicy

    given, encode = [], ConditionalPolicy.encode

    def record(self, prompts, weights=None, alpha=None):
        given.append(None if alpha is None else alpha.tolist())
        return encode(self, prompts, weights, alpha)

    with monkeypatch.context() as patch:
        patch.setattr(ConditionalPolicy, "encode", record)
        rows = steer(["--config", str(path), "--ckpt_path", ckpt, "--weights", "1,0", "--weights", "0.3,0.7",
                      "--prompts", str(prompts), "--max_new_tokens", "4", *overrides])
    if setup == "alpha":
        assert given and all(a == pytest.approx([0.1] * 4) for a in given if a is not None), given
        assert any(a is not None for a in given)

    module = load_module([str(path)], ckpt, [o.removeprefix("--set=") for o in overrides])
    texts = ["first post about soup", "second post about bikes"]
    w = torch.tensor([[1.0, 0.0]] * 2 + [[0.3, 0.7]] * 2)
    alpha = torch.full((4,), 0.1) if setup == "alpha" else None
    enc = module.policy.encode(texts * 2, w, alpha)
    if setup == "logit_mixture":
        ids, mask = mixture_generate(module.policy, **enc, weights=w, do_sample=False, max_new_tokens=4)
    else:
        ids, mask = module.policy.generate(**enc, weights=w, alpha=alpha, do_sample=False, max_new_tokens=4)
    assert [r["response"] for r in rows] == module.policy.decode(ids, mask)
    assert [r["weights"] for r in rows] == w.tolist()
    if setup == "alpha":
        # --alpha steers the KL strength within alpha_range, and every row says which one it was given
        assert [r["alpha"] for r in rows] == [0.1] * 4
        capsys.readouterr()
        given.clear()
        with monkeypatch.context() as patch:
            patch.setattr(ConditionalPolicy, "encode", record)
            rows = steer(["--config", str(path), "--ckpt_path", ckpt, "--weights", "1,0", "--weights", "0.3,0.7",
                          "--prompts", str(prompts), "--max_new_tokens", "4", "--alpha", "0.4"])
        assert given and all(a == pytest.approx([0.4] * 4) for a in given if a is not None), given
        assert any(a is not None for a in given)
        alpha = torch.full((4,), 0.4)
        ids, mask = module.policy.generate(**module.policy.encode(texts * 2, w, alpha), weights=w, alpha=alpha,
                                           do_sample=False, max_new_tokens=4)
        assert [r["response"] for r in rows] == module.policy.decode(ids, mask)
        assert [r["alpha"] for r in rows] == [0.4] * 4
        # printed rows (no --output) say it too
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("w=")]
        assert len(printed) == 4 and all(" alpha=0.4: " in line for line in printed), printed
        import clp_lightning.steer as steer_module

        monkeypatch.setattr(steer_module, "load_module", lambda *a, **k: pytest.fail("loaded before refusing"))
        for bad in ("0.9", "nan"):
            with pytest.raises(ValueError, match=rf"--alpha={bad} is outside alpha_range \[0.1, 0.5\]"):
                steer(["--config", str(path), "--ckpt_path", ckpt, "--weights", "1,0", "--prompts", str(prompts),
                       "--alpha", bad])
    else:
        assert "alpha" not in rows[0]


def test_compare_overlays_and_tabulates(run, validated, tmp_path, capsys):
    from clp_lightning.compare import compare

    tmp, _ = run
    figure = tmp_path / "compare.png"
    table = compare(
        [
            str(tmp / "run"),
            str(validated),
            "--labels",
            "fit",
            "validate",
            "--output",
            str(figure),
        ]
    )
    assert figure.exists() and figure.stat().st_size > 1000
    lines = table.splitlines()
    assert lines[0].startswith("| run | hypervolume | steer coverage | steer brevity | steps")
    assert lines[2].startswith("| fit |") and lines[3].startswith("| validate |")
    with pytest.raises(FileNotFoundError, match="no grid-evaluation report"):
        compare([str(tmp_path / "nowhere")])


def test_test_and_predict_subcommands(run, tmp_path):
    tmp, config = run
    ckpt = str(tmp / "run" / "checkpoints" / "last.ckpt")
    main(["test", "--config", str(config), "--ckpt_path", ckpt, "--data.init_args.num_test=2"])
    report = json.loads((tmp / "run" / "evaluation" / "test.json").read_text())
    assert len(report["grid"]) == 3 and report["step"] == 2
    from clp_lightning.cli import CLPCLI

    cli = CLPCLI(args=["--config", str(config), "--model.init_args.predict_weights=[[1.0, 0.0], [0.0, 1.0]]",
                       "--data.init_args.num_test=2"], run=False)
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    rows = [row for batch in predictions for row in batch]
    assert len(rows) == 2 * 2  # 2 test prompts x 2 weightings
    assert {tuple(r["weights"]) for r in rows} == {(1.0, 0.0), (0.0, 1.0)}
    assert set(rows[0]["rewards"]) == {"coverage", "brevity"}


def test_info_logs_go_to_the_stderr_of_the_moment(monkeypatch):
    """The package's log handler, installed by the first `clp` call in a process, writes to sys.stderr as it is when
    a record is logged: a stream captured for an earlier call may be closed by then."""
    import io
    import logging

    from clp_lightning.cli import _show_info_logs

    logger = logging.getLogger("clp_lightning")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    _show_info_logs()
    first.close()
    monkeypatch.setattr("sys.stderr", later)
    logging.getLogger("clp_lightning.data").info("Split %r: %d examples", "validation", 2)
    assert later.getvalue() == "Split 'validation': 2 examples\n"


def test_help_and_an_unknown_command_name_every_command(capsys):
    """LightningCLI's help and its 'invalid choice' error named only fit, validate, test and predict: the seven
    other commands of `clp` appeared nowhere, and the usage line said `__main__.py` under `python -m`."""
    from cli_helpers import clp

    code, err = clp(capsys, "bogus", "--config", "x.yaml")
    assert code == 2 and err.startswith("clp: error: unknown command 'bogus'; expected one of fit, validate, test, "
                                        "predict, quickstart, steer, compare, data, reward, export, serve")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and out.startswith("usage: clp ")
    for command in ("quickstart", "steer", "compare", "data", "reward", "export", "serve"):
        assert f" {command} (" in out, command
