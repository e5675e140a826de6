"""``experiments/reward_correlations.py``: bad inputs refused before the policy loads; an alpha-conditioned policy
scored at the KL strength evaluation gives it; ``--out`` written whole."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_CONFIG, write_config

from clp_lightning.conditioning.config import PolicyConfig

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reward_correlations.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("experiments_reward_correlations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case, message", [
    ("unknown_extra_reward", "--extra-reward 'bleu' is not one this script scores; expected 'rouge' or "
                             "'quality=<head dir>'"),
    ("missing_head", "head directory"),
    ("no_samples", "--samples must be >= 1, got 0"),
    ("no_prompts", "--prompts must be >= 1, got 0"),
    ("out_in_a_file", "--out directory"),
    ("out_is_a_directory", "is a directory; name the JSON file to write"),
    ("missing_config", "not found"),
    ("repeated_extra_reward", "--extra-reward ['coverage', 'coverage'] name ['coverage'] more than once"),
])
def test_bad_inputs_are_refused_before_the_policy_loads(script, tmp_path, capsys, monkeypatch, case, message):
    def build(*args, **kwargs):
        raise AssertionError("the policy was loaded before the bad input was refused")

    monkeypatch.setattr(PolicyConfig, "build", build)
    config = write_config(tmp_path / "config.yaml")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = {"unknown_extra_reward": ["--extra-reward", "bleu"],
            "missing_head": ["--extra-reward", f"quality={tmp_path / 'no_head'}"],
            "no_samples": ["--samples", "0"], "no_prompts": ["--prompts", "0"],
            "out_in_a_file": ["--out", str(blocker / "out.json")], "out_is_a_directory": ["--out", str(tmp_path)],
            "missing_config": ["--config", str(tmp_path / "missing.yaml")],
            "repeated_extra_reward": ["--extra-reward", "rouge", "--extra-reward", "rouge"]}[case]
    with pytest.raises(SystemExit) as exit_:
        script.main(["--config", str(config), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err.splitlines()[-1], err[-2000:]


def test_an_alpha_conditioned_policy_is_scored_at_the_evaluation_alpha(script, tmp_path, capsys, monkeypatch):
    from clp_lightning.conditioning.policy import ConditionalPolicy

    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["init_args"]["policy"]["conditioning"].update(prompt=True, condition_on_alpha=True)
    # the low end differs from kl_coef (0.05) and from the high end: each would be another policy's answers
    config["model"]["init_args"]["alpha_range"] = [0.1, 0.5]
    path = write_config(tmp_path / "config.yaml", config)
    out = tmp_path / "results" / "correlations.json"
    out.parent.mkdir()
    given, encode = [], ConditionalPolicy.encode  # the alpha the policy is given, where it takes it

    def record(self, prompts, weights=None, alpha=None):
        given.extend([] if alpha is None else torch.as_tensor(alpha).reshape(-1).tolist())
        return encode(self, prompts, weights, alpha)

    monkeypatch.setattr(ConditionalPolicy, "encode", record)
    result = script.main(["--config", str(path), "--prompts", "2", "--samples", "2", "--out", str(out)])
    assert given and given == pytest.approx([0.1] * len(given)), given
    assert result["alpha"] == 0.1 and result["prompts"] == 2 and "brevity vs length" in result["pairs"]
    assert json.loads(out.read_text())["alpha"] == 0.1
    assert [p.name for p in out.parent.iterdir()] == ["correlations.json"]  # no temporary file left behind


def test_responses_that_all_stop_early_all_count_as_ended(script, tmp_path, monkeypatch):
    # every response stops before the cap (4 tokens): the longest ones, whose length is the batch's width, too
    import torch

    from clp_lightning.conditioning.policy import ConditionalPolicy

    def generate(self, input_ids, attention_mask, **kwargs):
        mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).repeat(input_ids.shape[0] // 2, 1)  # lengths 3 and 2 of 4
        return torch.full(mask.shape, 5), mask

    monkeypatch.setattr(ConditionalPolicy, "generate", generate)
    result = script.main(["--config", str(write_config(tmp_path / "config.yaml")), "--prompts", "2", "--samples",
                          "2"])
    assert result["ended_before_max_new_tokens"] == 1.0


def test_an_extra_reward_named_as_a_config_reward_is_refused_before_sampling(script, tmp_path, capsys, monkeypatch):
    # the results are keyed by name: one reward's mean would replace the other's, their pair read as a self-pair
    from clp_lightning.conditioning.policy import ConditionalPolicy

    def generate(*args, **kwargs):
        raise AssertionError("sampled before the clashing names were refused")

    monkeypatch.setattr(ConditionalPolicy, "generate", generate)
    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["init_args"]["rewards"][1]["init_args"]["name"] = "coverage"
    with pytest.raises(SystemExit) as exit_:
        script.main(["--config", str(write_config(tmp_path / "config.yaml", config)), "--extra-reward", "rouge"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "['brevity', 'coverage', 'coverage'] name ['coverage'] more than once" in err.splitlines()[-1], err[-2000:]
