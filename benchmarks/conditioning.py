"""Conditioning overhead: time and parameter memory of each conditioning mode against the unconditioned model.

For each architecture x size x number of objectives ``m`` this builds, from one seed, the unconditioned policy
(``ConditioningConfig()``) and one policy per conditioning mode, then measures in this one process:

- ``fwd+bwd``: ``policy(input_ids, attention_mask, response_ids, response_mask, w).log_probs.sum().backward()``,
  (a) with one weighting shared by the whole batch and (b) with a different Dirichlet weighting per row;
- ``generate``: greedy decoding of exactly ``T`` new tokens (``min_new_tokens = max_new_tokens``) with a weighting
  per row;
- parameter memory: total parameters and the extra megabytes that ``policy.report()`` counts.

Timing is paired: each measurement first runs every policy ``--warmup`` times, then ``repeats`` rounds in which the
unconditioned policy and every mode run once each, in an order shuffled per round. A mode's ratio is the median over
rounds of ``time(mode) / time(unconditioned)`` within the round, so drifts in machine load (shared CPUs) cancel.

Prompt conditioning lengthens the input by the prefix ``<w 0.23,0.77> ``; with the byte-level tokenizer of the
``tiny:`` models that is one token per character (the ``prefix`` column), far more than a subword tokenizer needs.

Usage (defaults in ``--help``; the default grid takes about 9 minutes on one core of an idle machine)::

    python benchmarks/conditioning.py --out conditioning.json
    python benchmarks/conditioning.py --sizes tiny --archs gpt2 --objectives 2 --modes attention lora --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import check_out

from clp_lightning.conditioning.config import ConditioningConfig
from clp_lightning.conditioning.policy import ConditionalPolicy
from clp_lightning.conditioning.weights import DirichletSampler
from clp_lightning.files import write_json
from clp_lightning.models import TINY_SIZES

MODES: dict[str, Callable[[], ConditioningConfig]] = {
    "prompt": lambda: ConditioningConfig(prompt=True),
    "logits": lambda: ConditioningConfig(mode="mixing", options={"targets": "logits"}),
    "attention": lambda: ConditioningConfig(mode="mixing", options={"targets": "attention"}),
    "all": lambda: ConditioningConfig(mode="mixing", options={"targets": "all"}),
    "lora": lambda: ConditioningConfig(mode="lora", options={"r": 8, "target_modules": "attention"}),
    "prompt+attention": lambda: ConditioningConfig(prompt=True, mode="mixing", options={"targets": "attention"}),
}

# Rounds per measurement when --repeats is not given: tiny models run in milliseconds and are noisy, 60m in seconds.
DEFAULT_REPEATS = {"tiny": 20, "small": 10, "60m": 5}

# Values of m when --objectives is not given: the 60m cells take about two minutes each on one core.
DEFAULT_OBJECTIVES = {"tiny": [2, 3, 4], "small": [2, 3, 4], "60m": [2, 4]}

MEASUREMENTS = ("fwd_bwd_shared", "fwd_bwd_rows", "generate")

# Targets on the ratio to the unconditioned model, per measurement; modes not listed share "default".
TARGETS: dict[str, dict[str, float]] = {
    "fwd_bwd_shared": {"default": 1.10},
    "fwd_bwd_rows": {"default": 1.10, "attention": 1.5, "all": 1.5, "prompt+attention": 1.5},
    "generate": {"default": 1.2},
}


def target(measurement: str, mode: str) -> float:
    limits = TARGETS[measurement]
    return limits.get(mode, limits["default"])


@dataclass
class Variant:
    """One policy under test and its inputs: ``(input_ids, attention_mask)`` per weighting kind."""

    name: str
    policy: ConditionalPolicy
    inputs: dict[str, dict[str, torch.Tensor]]


def random_prompts(batch: int, length: int, generator: torch.Generator) -> list[str]:
    """``batch`` strings of ``length`` lowercase letters (one byte token each)."""
    codes = torch.randint(ord("a"), ord("z") + 1, (batch, length), generator=generator)
    return ["".join(map(chr, row)) for row in codes.tolist()]


def build_variant(
    name: str, policy: ConditionalPolicy, prompts: list[str], weights: dict[str, torch.Tensor]
) -> Variant:
    # the unconditioned policy gets no prefix (it has no prompt conditioner), prompt modes get theirs per row
    inputs = {kind: policy.encode(prompts, w) for kind, w in weights.items()}
    return Variant(name, policy, inputs)


def fwd_bwd(variant: Variant, kind: str, weights: torch.Tensor, response: torch.Tensor) -> float:
    policy = variant.policy
    policy.zero_grad(set_to_none=True)  # every run allocates its gradients: same work each time
    batch = variant.inputs[kind]
    start = time.perf_counter()
    out = policy(batch["input_ids"], batch["attention_mask"], response, torch.ones_like(response), weights)
    out.log_probs.sum().backward()
    return time.perf_counter() - start


def generate(variant: Variant, weights: torch.Tensor, new_tokens: int) -> float:
    batch = variant.inputs["rows"]
    start = time.perf_counter()
    ids, _ = variant.policy.generate(
        batch["input_ids"],
        batch["attention_mask"],
        weights,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    elapsed = time.perf_counter() - start
    if ids.shape[1] != new_tokens:
        raise RuntimeError(f"{variant.name} generated {ids.shape[1]} tokens, expected exactly {new_tokens}")
    return elapsed


def paired_timings(
    variants: list[Variant], run: Callable[[Variant], float], repeats: int, warmup: int, rng: random.Random
) -> dict[str, list[float]]:
    """Seconds per run of each variant: ``warmup`` untimed runs each, then ``repeats`` shuffled rounds."""
    for variant in variants:
        for _ in range(warmup):
            run(variant)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        order = list(variants)
        rng.shuffle(order)
        for variant in order:
            times[variant.name].append(run(variant))
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median seconds, and the median over rounds of the per-round ratio to ``baseline``."""
    base = times[baseline]
    return {
        name: {
            "median_s": statistics.median(ts),
            "ratio": statistics.median(t / b for t, b in zip(ts, base)),
            "ratio_min": min(t / b for t, b in zip(ts, base)),
            "ratio_max": max(t / b for t, b in zip(ts, base)),
            "ratio_of_min": min(ts) / min(base),  # less sensitive to runs slowed by other processes
        }
        for name, ts in times.items()
    }


def benchmark_cell(arch: str, size: str, m: int, modes: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """All modes of one architecture x size x ``m``: one record per variant (the unconditioned one first)."""
    repeats = args.repeats or DEFAULT_REPEATS.get(size, 5)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    sampler = DirichletSampler(m)
    # T5's tokenizer appends </s>: keep the prompt at exactly --prompt-len tokens either way
    prompts = random_prompts(args.batch, args.prompt_len - (arch == "t5"), gen)
    weights = {
        "shared": sampler.sample(1, gen).expand(args.batch, -1).contiguous(),
        "rows": sampler.sample(args.batch, gen),
    }
    response = torch.randint(3, 259, (args.batch, args.response_len), generator=gen)
    name = f"tiny:{arch}-{size}"
    variants = [build_variant("none", ConditionalPolicy.from_pretrained(name, m, seed=args.seed), prompts, weights)]
    for mode in modes:
        policy = ConditionalPolicy.from_pretrained(name, m, MODES[mode](), seed=args.seed)
        variants.append(build_variant(mode, policy, prompts, weights))

    rng = random.Random(args.seed)
    for v in variants:
        v.policy.train()
    results = {
        kind: summarise(
            paired_timings(variants, lambda v, k=kind: fwd_bwd(v, k, weights[k], response), repeats, args.warmup, rng),
            "none",
        )
        for kind in ("shared", "rows")
    }
    for v in variants:
        v.policy.zero_grad(set_to_none=True)
        v.policy.eval()
    results["generate"] = summarise(
        paired_timings(variants, lambda v: generate(v, weights["rows"], args.response_len), repeats, args.warmup, rng),
        "none",
    )

    records = []
    base_tokens = variants[0].inputs["rows"]["input_ids"].shape[1]
    for v in variants:
        report = v.policy.report()
        timing = {
            "fwd_bwd_shared": results["shared"][v.name],
            "fwd_bwd_rows": results["rows"][v.name],
            "generate": results["generate"][v.name],
        }
        missed = [] if v.name == "none" else [k for k in MEASUREMENTS if timing[k]["ratio"] > target(k, v.name)]
        records.append(
            {
                "arch": arch,
                "size": size,
                "num_objectives": m,
                "mode": v.name,
                "repeats": repeats,
                "prefix_tokens": v.inputs["rows"]["input_ids"].shape[1] - base_tokens,
                "total_parameters": report["total_parameters"],
                "trainable_parameters": report["trainable_parameters"],
                "extra_parameters": report["extra_parameters"],
                "extra_megabytes": report["extra_megabytes"],
                "conditioned_modules": report["conditioned_modules"],
                **timing,
                "targets": {k: target(k, v.name) for k in MEASUREMENTS} if v.name != "none" else {},
                "missed": missed,
            }
        )
    del variants
    gc.collect()
    return records


HEADER = (
    "| arch | size | m | mode | params (M) | extra MB | prefix tok | fwd+bwd, shared w | fwd+bwd, w per row "
    "| generate, w per row |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|"
)


def table_row(r: dict[str, Any]) -> str:
    def cell(key: str) -> str:
        if r["mode"] == "none":  # the reference row shows absolute times
            return f"{r[key]['median_s'] * 1e3:.1f} ms"
        text = f"{r[key]['ratio']:.2f}x"
        return f"**{text}**" if key in r["missed"] else text

    return (
        f"| {r['arch']} | {r['size']} | {r['num_objectives']} | {r['mode']} | {r['total_parameters'] / 1e6:.3g} "
        f"| {r['extra_megabytes']:.3g} | {r['prefix_tokens']} | {cell('fwd_bwd_shared')} | {cell('fwd_bwd_rows')} "
        f"| {cell('generate')} |"
    )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        revision = ""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_revision": revision,
        "args": vars(args),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "60m"], choices=list(TINY_SIZES["t5"]))
    parser.add_argument("--archs", nargs="+", default=["t5", "gpt2"], choices=["t5", "gpt2"])
    parser.add_argument(
        "--objectives", nargs="+", type=int, default=None, help=f"values of m; default per size {DEFAULT_OBJECTIVES}"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed rounds per measurement; default per size {DEFAULT_REPEATS}"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every policy before each measurement")
    parser.add_argument("--batch", type=int, default=4, help="rows B")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens L (before any conditioning prefix)")
    parser.add_argument("--response-len", type=int, default=32, help="response tokens T (also tokens generated)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 1 because on a shared machine an intra-op thread that loses its core stalls "
        "every op at the next barrier (a 20k-parameter GPT-2 step went from 8 ms to 640 ms with 2 threads)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = parser.parse_args(argv)
    if args.objectives is not None and min(args.objectives) < 2:
        parser.error(f"--objectives must all be >= 2 (one objective needs no conditioning), got {args.objectives}")
    if args.prompt_len < 2 or args.response_len < 1 or args.batch < 1:
        parser.error("--prompt-len must be >= 2, --response-len and --batch >= 1")
    # --repeats 0 was read as "not given" (the per-size default ran instead) and a negative one timed no round, which
    # failed with no median after the policies were built; a negative --warmup ran as 0
    if (args.repeats is not None and args.repeats < 1) or args.warmup < 0:
        parser.error(f"--repeats {args.repeats} --warmup {args.warmup}: expected --repeats >= 1 (or left out for the "
                     "per-size default) and --warmup >= 0")
    check_out(parser, args.out)  # written after the first cell, minutes in: a bad path would fail only there
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore")  # generation-config and peft notices would break the table
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    env = environment(args)
    print(f"<!-- {env['cpu']}, {env['threads']} threads, torch {env['torch']} -->", flush=True)
    print(HEADER, flush=True)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for size in args.sizes:
        for arch in args.archs:
            for m in args.objectives or DEFAULT_OBJECTIVES.get(size, [2, 3, 4]):
                for record in benchmark_cell(arch, size, m, args.modes, args):
                    records.append(record)
                    print(table_row(record), flush=True)
                if args.out is not None:  # keep what is done if a long run is interrupted
                    write_json(args.out, {"environment": env, "records": records}, indent=1, default=str)
    env["wall_s"] = time.perf_counter() - start
    missed = sum(bool(r["missed"]) for r in records)
    print(f"\nwall time {env['wall_s']:.0f} s; bold ratios miss their target ({missed} rows)", flush=True)
    if args.out is not None:
        write_json(args.out, {"environment": env, "records": records}, indent=1, default=str)
    return records


if __name__ == "__main__":
    main()
