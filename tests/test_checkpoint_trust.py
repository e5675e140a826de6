"""A checkpoint is untrusted input: it supplies state, never configuration (``clp validate --ckpt_path``)."""

import re

import pytest
import torch
from cli_helpers import TINY_CONFIG, remote_code_model, tampered, write_config

from clp_lightning.cli import CLPCLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    config = write_config(tmp / "config.yaml", TINY_CONFIG)
    cli = CLPCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp}"])
    path = tmp / "model.ckpt"
    cli.trainer.save_checkpoint(path)
    return config, path


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
    stored = tampered(path, tmp_path / "stored.ckpt")
    ckpt = torch.load(stored, weights_only=True)
    ckpt["hyper_parameters"]["predict_weights"] = [[0.5, 0.5]]
    torch.save(ckpt, stored)
    cli = CLPCLI(args=["predict", "--config", str(config), f"--ckpt_path={stored}",
                       "--model.init_args.predict_weights=[[1, 0]]", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.predict_weights == [[1, 0]] and cli.model.kl_coef == 0.05
    rows = [row for batch in cli.trainer.predict_loop.predictions for row in batch]
    assert rows and all(row["weights"] == [1.0, 0.0] for row in rows)  # what predict generated at


@pytest.mark.parametrize("override, what", [
    ("--model.init_args.policy.conditioning.options={targets: attention}", "conditioning"),
    ("--model.init_args.policy.model_name_or_path=tiny:gpt2", "base model"),
])
def test_a_checkpoint_of_another_setup_stops_before_its_weights_load(trained, tmp_path, override, what):
    config, path = trained
    with pytest.raises(ValueError, match=f"checkpoint .*model.ckpt. was trained with {what} .* the config has"):
        CLPCLI(args=["validate", "--config", str(config), f"--ckpt_path={path}", override,
                     f"--trainer.default_root_dir={tmp_path}"])


def _as_format_1(path, out, **conditioning):
    """A copy of ``path`` whose ``clp`` section is format 1's: built-in modes named by ``targets`` / ``lora``."""
    ckpt = torch.load(path, weights_only=True)
    new = ckpt["clp"]["conditioning"]
    old = {k: v for k, v in new.items() if k not in ("mode", "options")}
    ckpt["clp"] = {**ckpt["clp"], "format": 1,
                   "conditioning": {**old, "targets": None, "lora": None, "mode": None, "options": None,
                                    **conditioning}}
    torch.save(ckpt, out)
    return out


def test_a_format_1_checkpoint_loads_under_the_equivalent_mode_config(trained, tmp_path):
    config, path = trained
    assert torch.load(path, weights_only=True)["clp"]["conditioning"]["mode"] == "mixing"  # written as format 2
    old = _as_format_1(path, tmp_path / "old.ckpt", targets="logits")
    cli = CLPCLI(args=["validate", "--config", str(config), f"--ckpt_path={old}",
                       f"--trainer.default_root_dir={tmp_path}"])
    state = torch.load(path, weights_only=True)["state_dict"]
    loaded = cli.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # every stored weight reached the module
    # the translation is not a pass: a format-1 checkpoint of another mode still stops, naming the difference
    for fields, shown in (({"targets": "attention"}, "'options': {'targets': 'attention'}"),
                          ({"lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "attention"}},
                           "'mode': 'lora'"),
                          ({}, "'mode': 'none'")):
        other = _as_format_1(path, tmp_path / "other.ckpt", **fields)
        with pytest.raises(ValueError, match=f"was trained with conditioning {{.*{shown}.*}}, the config has"):
            CLPCLI(args=["validate", "--config", str(config), f"--ckpt_path={other}",
                         f"--trainer.default_root_dir={tmp_path}"])


def test_the_sharded_strategy_checks_a_checkpoint_before_loading_its_weights(trained, tmp_path, monkeypatch):
    """ModelParallelStrategy loads weights before on_load_checkpoint: ShardedStrategy checks the file first."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from clp_lightning.callbacks.checkpoint import CheckpointError
    from clp_lightning.strategies import ShardedStrategy

    config, path = trained
    other = CLPCLI(args=["--config", str(config), "--model.init_args.policy.model_name_or_path=tiny:gpt2"],
                   run=False).model
    loads = []
    monkeypatch.setattr(ModelParallelStrategy, "load_checkpoint", lambda self, p, weights_only=None: loads.append(p))
    strategy = ShardedStrategy()
    strategy._lightning_module = other
    with pytest.raises(CheckpointError, match="model.ckpt. was trained with base model .* the config has"):
        strategy.load_checkpoint(path)
    assert loads == []  # refused before the strategy read a tensor
    strategy._lightning_module = CLPCLI(args=["--config", str(config)], run=False).model
    strategy.load_checkpoint(path)
    assert loads == [path]


def test_the_sharded_strategy_loads_a_checkpoint_file_weights_only(trained, monkeypatch):
    """Whatever the caller passes (None: torch's default, which an environment variable can turn off; False), the
    file is read with weights_only=True, as SafeCheckpointIO reads it under DDP."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from clp_lightning.strategies import ShardedStrategy

    config, path = trained
    seen = []
    monkeypatch.setattr(ModelParallelStrategy, "load_checkpoint",
                        lambda self, p, weights_only=None: seen.append(weights_only))
    strategy = ShardedStrategy()
    strategy._lightning_module = CLPCLI(args=["--config", str(config)], run=False).model
    strategy.load_checkpoint(path)
    strategy.load_checkpoint(path, weights_only=False)
    assert seen == [True, True]


def test_the_sharded_strategy_refuses_a_distributed_checkpoint_it_is_not_told_to_trust(tmp_path, monkeypatch):
    """torch.distributed.checkpoint unpickles a checkpoint directory's .metadata: a planted one would run code."""
    import os
    import pickle

    from lightning.pytorch.strategies import ModelParallelStrategy

    from clp_lightning.callbacks.checkpoint import CheckpointError
    from clp_lightning.strategies import ShardedStrategy

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    directory = tmp_path / "step=1.ckpt"
    directory.mkdir()
    (directory / ".metadata").write_bytes(pickle.dumps(Payload()))
    torch.save({"global_step": 1}, directory / "meta.pt")
    loads = []
    monkeypatch.setattr(ModelParallelStrategy, "load_checkpoint", lambda self, p, weights_only=None: loads.append(p))
    with pytest.raises(CheckpointError, match="is a distributed checkpoint directory, which torch.distributed"):
        ShardedStrategy().load_checkpoint(directory)
    assert loads == [] and not marker.exists()
    ShardedStrategy(trust_distributed_checkpoints=True).load_checkpoint(directory)  # the config's choice
    assert loads == [directory]


@pytest.mark.parametrize("version", ["2", 2.5, None, [2]])
def test_a_checkpoint_format_that_is_not_an_integer_is_named_in_a_checkpoint_error(version):
    from clp_lightning.callbacks.checkpoint import CheckpointError, check_setup

    current = {"objective_names": ["a", "b"], "conditioning": {"mode": "none", "options": {}}, "base_model": "tiny"}
    with pytest.raises(CheckpointError, match=re.escape(f"has checkpoint format {version!r}; expected an integer")):
        check_setup({**current, "format": version}, current, "checkpoint 'x.ckpt'")


def test_a_corrupt_checkpoint_file_gives_a_checkpoint_error_whatever_torch_load_raises(tmp_path):
    """A checkpoint is untrusted bytes: the zip reader and the weights_only unpickler fail on damaged ones with
    BadZipFile, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError... each must read as "truncated or
    corrupt", naming the file, not as a traceback from inside torch."""
    import random

    from clp_lightning.callbacks.checkpoint import CheckpointError, read_checkpoint

    original = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0), "n": torch.ones(2, dtype=torch.int64)}, "epoch": 1,
                "loops": {"names": ["a", "b"]}}, original)
    data, damaged = original.read_bytes(), tmp_path / "damaged.ckpt"
    rng = random.Random(0)
    for _ in range(300):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        damaged.write_bytes(corrupt)
        try:
            read_checkpoint(damaged)  # a flipped byte in a tensor's data loads (torch keeps no checksum)
        except CheckpointError as err:
            assert "damaged.ckpt" in str(err)


def test_an_error_without_a_message_while_loading_is_named_by_its_type(tmp_path, monkeypatch):
    from clp_lightning.callbacks.checkpoint import CheckpointError, read_checkpoint

    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {}}, path)

    def cut_short(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr(torch, "load", cut_short)
    with pytest.raises(CheckpointError, match="cut.ckpt' is truncated or corrupt: EOFError"):
        read_checkpoint(path)


def test_a_checkpoint_without_a_state_dict_and_with_mixed_keys_is_named_in_a_checkpoint_error(tmp_path):
    from clp_lightning.callbacks.checkpoint import CheckpointError, read_checkpoint

    torch.save({1: torch.ones(1), "model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=re.escape("has no 'state_dict' (found ['1', 'model'])")):
        read_checkpoint(tmp_path / "other.ckpt")


@pytest.mark.parametrize("version", [0, -3])
def test_a_checkpoint_format_below_1_is_refused(version):
    from clp_lightning.callbacks.checkpoint import CheckpointError, check_setup

    current = {"objective_names": ["a", "b"], "conditioning": {"mode": "none", "options": {}}, "base_model": "tiny"}
    with pytest.raises(CheckpointError, match=re.escape(f"has checkpoint format {version}; clp writes formats 1 to")):
        check_setup({**current, "format": version}, current, "checkpoint 'x.ckpt'")
