"""The mixture benchmark (benchmarks/mixture.py): a row per variant, and the cached mixture's tokens equal the
recomputed baseline's."""

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mixture():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("mixture")


def test_rows_per_variant_and_the_cached_mixture_decodes_the_baselines_tokens(mixture, tmp_path):
    out = tmp_path / "out.json"
    mixture.main(["--models", "tiny", "--rows", "3", "--prompt-tokens", "24", "--new-tokens", "5", "--rounds", "2",
                  "--cache", str(tmp_path), "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["recomputed", "mixture", "policy"]
    assert rows["recomputed"]["ratio"] == 1.0
    assert rows["mixture"]["same_tokens"] is True and rows["mixture"]["tokens"] > 3  # past the first token
    assert all(r["seconds"] > 0 for r in rows.values())


def test_same_tokens_compares_responses_of_any_width(mixture):
    import torch

    a = torch.tensor([[5, 6, -1], [7, -1, -1]])
    assert mixture._same_tokens(a, a[:, :2])
    assert not mixture._same_tokens(a, torch.tensor([[5, 6], [8, -1]]))


@pytest.mark.parametrize(("bad", "message"), [
    (["--models", "tiny", "1b"], "--models 1b: expected some of tiny, small, 60m, 100m, smollm2"),
    (["--models", "tiny", "--rounds", "0"], "expected each >= 1"),
    (["--models", "tiny", "--rows", "0"], "expected each >= 1"),
])
def test_bad_models_and_counts_are_refused_before_any_model_runs(mixture, monkeypatch, capsys, bad, message):
    # "tiny 1b" used to run the tiny model's every round and then fail in build_tiny_model; --rounds 0 failed with
    # no median after the untimed calls
    monkeypatch.setattr(mixture, "run", lambda size, args: pytest.fail(f"ran {size} with {bad}"))
    with pytest.raises(SystemExit) as stop:
        mixture.main(bad)
    assert stop.value.code == 2 and message in capsys.readouterr().err
