"""The static-cache benchmark (benchmarks/generate_cache.py): its variants generate the same tokens, its JSON."""

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = ["--models", "tiny", "--prompts", "2", "--samples", "2", "--prompt-tokens", "16", "--spread", "4",
         "--new-tokens", "4", "--rounds", "2"]


@pytest.fixture(scope="module")
def generate_cache():
    """The script, imported as the scripts import each other: as a module of the benchmarks/ folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("generate_cache")


def _run(generate_cache, tmp_path, *variants: str) -> dict:
    out = tmp_path / "out.json"
    generate_cache.main([*SMALL, "--cache", str(tmp_path), "--out", str(out), "--variants", *variants])
    return json.loads(out.read_text())


def test_eager_variants_write_a_row_each_and_agree_on_greedy_and_sampled_tokens(generate_cache, tmp_path):
    results = _run(generate_cache, tmp_path, "static", "shared")  # dynamic, the baseline, is always added
    assert set(results) == {"machine", "argv", "settings", "rows", "table"}
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["dynamic", "static", "shared"]
    for row in rows.values():
        # times are measured, not asserted on: only that each was taken
        assert len(row["times"]) == 2 and row["first_call"] > 0 and row["seconds_per_call"] > 0
        assert row["compile_s"] is None and row["break_even_calls"] is None  # nothing compiled
        assert row["greedy_match"] == 1.0 and row["sampled_match"] == 1.0
        assert len(row["padded_lengths"]) == 3 and max(row["padded_lengths"]) <= 16  # the first call and 2 rounds
    assert rows["dynamic"]["ratio_to_baseline"] == 1.0
    assert "| tiny | static |" in results["table"] and "| tiny | shared |" in results["table"]


def test_prompts_end_in_the_cue_and_change_padded_length_between_calls(generate_cache, tmp_path):
    _, tokenizer = generate_cache.load_model("tiny", tmp_path)
    batches = generate_cache.prompt_batches(tokenizer, 4, 40, 8, 6, seed=0)
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert all(32 <= n <= 40 for n in lengths) and len(set(lengths)) > 1
    for batch in batches:
        assert batch["attention_mask"][:, -1].all()  # left padded
        ends = tokenizer.batch_decode(batch["input_ids"][:, -6:])
        assert all(end == "TL;DR:" for end in ends)


def test_prefilled_static_cache_continues_as_the_shared_dynamic_cache(generate_cache, tmp_path):
    from clp_lightning.conditioning.lm import _cache_argument, generate_responses

    model, tokenizer = generate_cache.load_model("tiny", tmp_path)
    batch = generate_cache.prompt_batches(tokenizer, 2, 16, 4, 1, seed=0)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    shared, _ = generate_responses(model, tokenizer, ids, mask, num_return_sequences=3, **greedy)
    cache = generate_cache.shared_static_cache(model, ids, mask, 3, max_cache_len=16 + 5)
    static = model.generate(input_ids=ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                            **{_cache_argument(model): cache}, **greedy)[:, ids.shape[1]:]
    torch.testing.assert_close(static, shared, rtol=0, atol=0)


def test_uncached_weighting_generates_the_cached_tokens_under_lora(generate_cache, tmp_path):
    # the variant's plumbing; the cache's exactness with adapters that change the tokens is tested in
    # tests/conditioning/test_policy.py (here lora_B starts at zero)
    out = tmp_path / "out.json"
    generate_cache.main([*SMALL, "--cache", str(tmp_path), "--out", str(out), "--mode", "lora",
                         "--variants", "shared", "shared-uncached"])
    results = json.loads(out.read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["dynamic", "shared", "shared-uncached"]
    assert rows["shared-uncached"]["greedy_match"] == 1.0 and rows["shared-uncached"]["sampled_match"] == 1.0
    assert rows["shared-uncached"]["cached_over_uncached"] > 0 and "shared / shared-uncached" in results["table"]


def test_uncached_variant_without_a_conditioning_mode_is_refused(generate_cache, capsys):
    with pytest.raises(SystemExit):
        generate_cache.main(["--variants", "shared-uncached"])
    assert "--variants shared-uncached: needs a conditioning --mode" in capsys.readouterr().err


def test_spread_at_least_the_prompt_length_is_refused(generate_cache, capsys):
    with pytest.raises(SystemExit):
        generate_cache.main(["--prompt-tokens", "8", "--spread", "8"])
    assert "--spread 8 must be below --prompt-tokens 8" in capsys.readouterr().err


@pytest.mark.parametrize(("bad", "message"), [
    (["--spread", "-1"], "--spread -1: expected >= 0"),
    (["--prompts", "0", "--new-tokens", "0"], "--prompts 0, --new-tokens 0: expected >= 1"),
])
def test_negative_spread_and_empty_calls_are_refused_before_the_model_loads(generate_cache, monkeypatch, capsys, bad,
                                                                           message):
    # a negative --spread used to load the model and then fail in random.randint
    monkeypatch.setattr(generate_cache, "measure", lambda name, args: pytest.fail(f"measured with {bad}"))
    with pytest.raises(SystemExit) as stop:
        generate_cache.main(["--models", "tiny", *bad])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_variants_compile_once_and_generate_the_eager_tokens(generate_cache, tmp_path):
    # about 30 s on one CPU core: Inductor compiles the decode step from scratch (a fresh cache directory)
    results = _run(generate_cache, tmp_path, "static+compile", "shared+static+compile")
    rows = {r["variant"]: r for r in results["rows"]}
    for variant in ("static+compile", "shared+static+compile"):
        assert rows[variant]["greedy_match"] == 1.0
        assert rows[variant]["graphs_rounds"] == 0  # the cache is sized once: new prompt lengths do not recompile
        # break-even: calls to repay the compilation, or null where the compiled step saved nothing in these rounds
        # (infinitely many; the file is strict JSON, the printed table says never), which on a tiny model depends on
        # the machine's load
        even = rows[variant]["break_even_calls"]
        assert rows[variant]["compile_s"] >= 0 and (even is None or even >= 0)
    # the two share the model's compiled decode step: the second reuses the first one's graph
    assert rows["static+compile"]["graphs_first"] == 1 and rows["shared+static+compile"]["graphs_first"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "all"])
def test_compiled_step_follows_the_weighting_of_each_call(generate_cache, tmp_path, mode):
    # the conditioning (LoRA's stacked adapters, mixed copies) reads per-call weights: a compiled step that baked the
    # first call's in would still run, with the wrong policy
    import argparse

    from common import conditioning

    from clp_lightning.conditioning.policy import ConditionalPolicy

    model, tokenizer = generate_cache.load_model("tiny", tmp_path)
    policy = ConditionalPolicy(model, tokenizer, 2, conditioning(mode))
    torch.manual_seed(0)
    with torch.no_grad():  # the objectives' adapters / copies apart, so that the weighting changes the tokens
        for name, p in policy.model.named_parameters():
            if "lora_B" in name or (p.dim() >= 2 and p.shape[0] == 2 and "lora" not in name):
                p.add_(torch.randn_like(p))
    args = argparse.Namespace(prompts=2, samples=2, prompt_tokens=16, new_tokens=4, device="cpu", compile_mode=None)
    runner = generate_cache.Runner(policy.model.eval(), tokenizer, args)
    batches = generate_cache.prompt_batches(tokenizer, 2, 16, 4, 2, seed=0)
    tokens = {}
    for call, w in enumerate([[[1.0, 0.0], [0.8, 0.2]], [[0.0, 1.0], [0.1, 0.9]], [[1.0, 0.0], [0.8, 0.2]]]):
        for variant in ("dynamic", "static+compile"):
            with policy.conditioned(torch.tensor(w), cache=True):
                tokens[call, variant] = runner.call(variant, batches[0], sample=False, seed=0)
        assert torch.equal(tokens[call, "static+compile"], tokens[call, "dynamic"])
    assert not torch.equal(tokens[0, "dynamic"], tokens[1, "dynamic"])  # the weighting mattered


@pytest.mark.parametrize("mode", ["prompt", "prompt+attention"])
def test_prompt_conditioning_modes_are_refused(generate_cache, monkeypatch, capsys, mode):
    # the variants generate from prompt_batches' raw ids, without the policy's <w ...> prefix: a prompt mode's rows
    # would time a model that never saw its weighting
    monkeypatch.setattr(generate_cache, "measure", lambda name, args: pytest.fail(f"measured --mode {mode}"))
    with pytest.raises(SystemExit):
        generate_cache.main(["--mode", mode])
    assert f"--mode {mode}: prompt conditioning is not measured here" in capsys.readouterr().err
